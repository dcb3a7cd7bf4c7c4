"""Hardening: bad input, upstream faults, client disconnects, load, disk trouble, access, shutdown."""

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

from helpers import (PROXY_COMMAND, API_KEY, ProxyProcess, ProxyTestCase, raw_exchange, assemble_stream, run_in_threads,
                     sse_data, wait_for)
from fake_deepseek import Answer, is_summary_request

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}}}}]


def malformed_bodies(rng):
    """Generated bad and edge-case request bodies, as bytes."""
    good = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
    values = [None, 0, -1, 1.5, "", "x", [], {}, [1], [None], {"a": 1}, True, "\udcff", "😀" * 3, "a" * 5000]
    mutations = [
        lambda b: b.__setitem__("messages", rng.choice(values)),
        lambda b: b["messages"].append(rng.choice(values)),
        lambda b: b["messages"][0].__setitem__("content", rng.choice(values)),
        lambda b: b["messages"][0].__setitem__("role", rng.choice(values + ["developer", "tool", "assistant", "bot"])),
        lambda b: b["messages"][0].__setitem__("content", [rng.choice(values), {"type": "text"},
                                                           {"type": "image_url", "image_url": rng.choice(values)}]),
        lambda b: b["messages"].append({"role": "assistant", "content": rng.choice(values),
                                        "tool_calls": rng.choice(values + [[{"id": 1}], [{"function": {}}]])}),
        lambda b: b["messages"].append({"role": "tool", "content": "r", "tool_call_id": rng.choice(values)}),
        lambda b: b.__setitem__("tools", rng.choice(values + [[{"type": "function"}]])),
        lambda b: b.__setitem__("tool_choice", rng.choice(values + ["required", "none"])),
        lambda b: b.__setitem__("stream", rng.choice(values)),
        lambda b: b.__setitem__("stream_options", rng.choice(values)),
        lambda b: b.__setitem__("response_format", rng.choice(values)),
        lambda b: b.__setitem__("stop", rng.choice(values)),
        lambda b: b["messages"][0].__setitem__("reasoning_content", rng.choice(values)),
        lambda b: b["messages"].insert(0, {"role": "system", "content": rng.choice(values)}),
    ]
    raw_forms = [b"", b"{", b"[]", b"null", b"42", b'"text"', b"\xff\xfe\x00", b'{"messages": [}',
                 b'{"messages": "\xc3\x28"}', b"{" * 2000 + b"}" * 2000]
    while True:
        if rng.random() < 0.1:
            yield rng.choice(raw_forms)
            continue
        body = json.loads(json.dumps(good))
        for _ in range(rng.randint(1, 3)):
            try:
                rng.choice(mutations)(body)
            except (TypeError, AttributeError, IndexError, KeyError):
                pass
        yield json.dumps(body).encode("utf-8", "surrogatepass")


class BadInput(ProxyTestCase):
    proxy_args = ("--max-request-bytes", "100000", "--client-timeout", "0.3", "--log-level", "WARNING")

    def test_fuzz_never_gets_a_5xx_from_the_proxy(self):
        rng = random.Random(1234)
        bodies = malformed_bodies(rng)
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
        statuses = {}
        for _ in range(600):
            body = next(bodies)
            try:
                connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                raw = response.read()
            except (ConnectionError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
                continue
            statuses[response.status] = statuses.get(response.status, 0) + 1
            self.assertLess(response.status, 500, (body[:300], raw[:300]))
            if response.status != 200:
                self.assertIn("error", json.loads(raw), raw[:300])
            if response.getheader("Connection", "") == "close":
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
        self.assertGreater(statuses.get(400, 0), 150)
        self.assertNotIn("Traceback", self.proxy.log())
        status, _, _ = self.proxy.chat({"model": "x", "messages": [{"role": "user", "content": "still there?"}]})
        self.assertEqual(status, 200)

    def test_wrong_types_get_clear_messages(self):
        cases = [({"messages": [{"role": "user", "content": 5}]}, "content' must be a string"),
                 ({"messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]}, "tool_calls' must be"),
                 ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text must be a string"),
                 ({"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
                 ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
                 ({"messages": "hi"}, "non-empty array"), ([], "JSON object")]
        for body, message in cases:
            status, _, answer = self.proxy.chat(body)
            self.assertEqual(status, 400, body)
            self.assertIn(message, answer["error"]["message"])

    def test_oversized_body_is_refused_before_it_is_read(self):
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000000\r\n\r\n")
        status, response = raw_exchange(self.proxy.port, head + b"{")
        self.assertIn(b" 413 ", status)
        self.assertIn(b"request_too_large", response)

    def test_missing_and_lying_content_length_and_slow_clients(self):
        start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        status, _ = raw_exchange(self.proxy.port, start + b"\r\n")
        self.assertIn(b" 411 ", status)
        started = time.monotonic()
        status, response = raw_exchange(self.proxy.port, start + b"Content-Length: 100\r\n\r\n{\"messages\"")
        self.assertIn(b" 408 ", status, "the body never came: cut off at --client-timeout")
        self.assertLess(time.monotonic() - started, 4)
        status, _ = raw_exchange(self.proxy.port, start + b"Content-Length: abc\r\n\r\n")
        self.assertIn(b" 400 ", status)

    def test_unpaired_surrogates_become_replacement_characters(self):
        raw = b'{"model": "x", "messages": [{"role": "user", "content": "cut \\ud83d here \\ud83d\\ude00"}]}'
        status, _, _ = self.proxy.request("POST", "/v1/chat/completions", raw)
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.requests[-1]["messages"][0]["content"], "cut \ufffd here \U0001F600")

    def test_http_level_refusals_are_json_too(self):
        for request, status in ((b"FOO / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b" 501 "),
                                (b"DELETE /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b" 405 "),
                                (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b" 414 ")):
            line, response = raw_exchange(self.proxy.port, request)
            self.assertIn(status, line)
            self.assertIn(b'{"error": {', response)

    def test_invalid_utf8(self):
        status, _, raw = self.proxy.request("POST", "/v1/chat/completions", b'{"messages": "\xff"}')
        self.assertEqual(status, 400)
        self.assertIn(b"UTF-8", raw)


class UpstreamFaults(ProxyTestCase):
    def test_connection_drop_before_any_byte_is_retried(self):
        self.fake.failures.append(("drop",))
        status, _, answer = self.proxy.chat({"model": "x", "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200)
        self.assertEqual(len(self.fake.requests), 2)

    def test_client_disconnects_mid_stream_leak_nothing(self):
        self.fake.chunk_delay = 0.05
        self.fake.responder = lambda body, n: Answer(content="x" * 200, reasoning="r" * 50)
        body = json.dumps({"model": "x", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        baseline = threading.active_count()
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", self.proxy.port)) as sock:
                sock.sendall(request)
                sock.recv(100)  # headers have started: the stream is under way
        self.assertTrue(wait_for(lambda: threading.active_count() <= baseline + 2, timeout=15),
                        "threads: %d, baseline %d" % (threading.active_count(), baseline))
        self.assertTrue(wait_for(lambda: self.proxy.log().count("client went away mid-stream") >= 100, timeout=10))
        self.assertEqual(self.proxy.chat({"model": "x", "messages": [{"role": "user", "content": "hi"}]})[0], 200)


class Load(ProxyTestCase):
    proxy_args = ("--log-level", "WARNING")  # default cache sizes: no reasoning may be lost

    def test_32_concurrent_streaming_tool_loops(self):
        """(bench/load.py runs 64 sessions for a minute; this is its short, asserted form.)"""
        def responder(body, number):
            rounds = sum(1 for m in body["messages"] if m["role"] == "assistant")
            first = body["messages"][0]["content"]
            if rounds < 3:
                return Answer(reasoning="%s round %d" % (first, rounds), tool_calls=[("read_file", {"path": first})])
            return Answer(content="done " + first, reasoning="%s final" % first)
        self.fake.responder = responder

        def session(index):
            messages = [{"role": "user", "content": "session-%d" % index}]
            for _ in range(4):
                status, _, events = self.proxy.chat({"model": "x", "messages": messages, "tools": TOOLS, "stream": True})
                assert status == 200, events
                message, _, _ = assemble_stream(events)
                if not message["tool_calls"]:
                    return message["content"]
                messages.append({"role": "assistant", "content": message["content"], "tool_calls": message["tool_calls"]})
                for call in message["tool_calls"]:
                    assert json.loads(call["function"]["arguments"])["path"] == "session-%d" % index, "cross-talk"
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": "ok"})
            return None
        results = run_in_threads(session, 32)
        self.assertEqual(results, ["done session-%d" % i for i in range(32)])
        for request in self.fake.requests:  # every restored reasoning belongs to its own session
            first = request["messages"][0]["content"]
            for message in request["messages"]:
                if message["role"] == "assistant":
                    self.assertTrue(message["reasoning_content"].startswith(first + " "), message)
        stats = json.loads(self.proxy.request("GET", "/stats")[2])
        self.assertEqual(stats["reasoning"]["filled_empty"], 0, "no reasoning lost under load")
        self.assertEqual(stats["reasoning"]["cache_conversations"], 32)
        self.assertEqual(stats["requests"]["failed"], 0)


class DiskTrouble(ProxyTestCase):
    def start_proxy(self, args=None, **kwargs):
        with open(os.path.join(self.data_dir, "reasoning_cache.jsonl"), "w"):
            pass
        os.chmod(self.data_dir, 0o755)
        return super().start_proxy(args, **kwargs)

    def test_unwritable_cache_file_warns_once(self):
        path = os.path.join(self.data_dir, "reasoning_cache.jsonl")
        os.remove(path)
        os.mkdir(path)  # a folder where the file should be: every append fails
        for i in range(3):
            self.assertEqual(self.proxy.chat({"model": "x", "messages": [{"role": "user", "content": "q%d" % i}]})[0], 200)
        self.assertTrue(wait_for(lambda: "reasoning_cache.jsonl" in self.proxy.log()))
        self.assertEqual(self.proxy.log().count("writing " + path), 1)


class NoLockAcrossUpstreamCalls(ProxyTestCase):
    proxy_args = ("--system-min-chars", "1000")

    def test_requests_go_on_while_a_summary_call_is_slow(self):
        gate = self.fake.summary_gate = threading.Event()  # the summary call hangs until the end
        self.addCleanup(gate.set)
        long_system = {"role": "system", "content": "Always do the right thing. " * 100}
        statuses = run_in_threads(lambda i: self.proxy.chat({"model": "x", "messages": [
            long_system, {"role": "user", "content": "q%d" % i}]})[0], 8)
        self.assertEqual(statuses, [200] * 8, "all answered while the summary call still hangs")
        # the summary call starts in the background; on a busy machine it may arrive after the answers
        self.assertTrue(wait_for(lambda: any(is_summary_request(r) for r in list(self.fake.requests)), 10),
                        "the summary call was made")
        self.assertFalse(gate.is_set())
        gate.set()


class AtomicFiles(ProxyTestCase):
    def test_concurrent_writers_of_one_file_leave_one_whole_version(self):
        import deepseek_proxy
        path = os.path.join(self.data_dir, "post_sys", "same.txt")
        versions = ["version %d " % i * 20000 for i in range(16)]
        run_in_threads(lambda i: [deepseek_proxy.atomic_write(path, versions[i]) for _ in range(20)], 16)
        with open(path) as handle:
            self.assertIn(handle.read(), versions)
        self.assertEqual([name for name in os.listdir(os.path.dirname(path)) if name.startswith(".tmp-")], [])


class Access(ProxyTestCase):
    def test_proxy_key_is_required_when_set(self):
        proxy = self.start_proxy(["--proxy-key", "local-secret"])
        body = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
        status, _, answer = proxy.chat(body)
        self.assertEqual(status, 401)
        self.assertEqual(answer["error"]["code"], "invalid_api_key")
        self.assertEqual(proxy.chat(body, headers={"Authorization": "Bearer wrong"})[0], 401)
        self.assertEqual(proxy.chat(body, headers={"Authorization": "Bearer local-secret"})[0], 200)
        self.assertEqual(self.fake.headers[-1]["Authorization"], "Bearer " + API_KEY, "the client's key stays here")
        env_proxy = self.start_proxy(env={"PROXY_API_KEY": "env-secret"})
        self.assertEqual(env_proxy.chat(body)[0], 401)
        self.assertEqual(env_proxy.chat(body, headers={"Authorization": "Bearer env-secret"})[0], 200)

    def test_open_bind_refused_without_a_key(self):
        command = PROXY_COMMAND + ["--host", "0.0.0.0", "--port", "0",
                   "--data-dir", self.data_dir]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=20,
                                 env=dict(os.environ, DEEPSEEK_API_KEY=API_KEY))
        self.assertEqual(refused.returncode, 2)
        self.assertIn("--allow-open", refused.stderr)
        allowed = ProxyProcess(self.fake.url, self.data_dir, ["--host", "0.0.0.0", "--allow-open"])
        self.addCleanup(allowed.stop)
        self.assertIn("WITHOUT a proxy key", allowed.log())

    def test_the_key_is_never_written_anywhere(self):
        proxy = self.start_proxy(["--save-prepost-msgs", "--proxy-key", "local-secret",
                                  "--system-min-chars", "100", "--system-wait", "5"])
        headers = {"Authorization": "Bearer local-secret"}
        system = {"role": "system", "content": "Rules. " * 100}
        proxy.chat({"model": "x", "messages": [system, {"role": "user", "content": "hi"}]}, headers=headers)
        proxy.chat({"model": "x", "stream": True, "messages": [system, {"role": "user", "content": "hi"}]},
                   headers=headers)
        self.fake.failures.append(("status", 401, {"error": {"message": "bad key", "type": "authentication_error"}}))
        _, _, error_answer = proxy.chat({"model": "x", "messages": [{"role": "user", "content": "hi"}]}, headers=headers)
        seen = [json.dumps(error_answer), proxy.request("GET", "/stats", headers=headers)[2].decode(),
                proxy.request("GET", "/health", headers=headers)[2].decode()]
        proxy.stop()
        seen.append(proxy.log())
        for folder, _, files in os.walk(self.data_dir):
            for name in files:
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as handle:
                    seen.append(handle.read())
        written = "\n".join(seen)
        self.assertIn("POST /v1/chat/completions", written, "the log was read")
        self.assertNotIn(API_KEY, written)
        self.assertNotIn("local-secret", written)


class Shutdown(ProxyTestCase):
    def test_sigterm_lets_a_stream_finish(self):
        self.proxy = self.start_proxy(process=True)
        self.fake.chunk_delay = 0.04
        self.fake.responder = lambda body, n: Answer(content="abcdefghijklmno", reasoning="r")
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "x", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
            {"Content-Type": "application/json"})
        response = connection.getresponse()
        self.proxy.process.send_signal(signal.SIGTERM)
        message, _, _ = assemble_stream(sse_data(response.read()))
        self.assertEqual(message["content"], "abcdefghijklmno")
        self.assertEqual(self.proxy.process.wait(10), 0)
        self.assertIn("stopped", self.proxy.log())

    def test_sigterm_closes_what_outlives_the_grace(self):
        proxy = self.start_proxy(["--shutdown-grace", "0.2"], process=True)
        self.fake.chunk_delay = 1.0
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "x", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
            {"Content-Type": "application/json"})
        connection.getresponse()
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        self.assertEqual(proxy.process.wait(10), 0)
        self.assertLess(time.monotonic() - started, 3)
