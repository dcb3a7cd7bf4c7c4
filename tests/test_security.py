"""Safe to leave running: browser-borne requests, linear-time stages, isolation, bounded resources,
upstream hygiene, HTTP details. Each test fails without the fix it names."""

import http.client
import json
import os
import socket
import threading
import time
import unittest

from helpers import (API_KEY, AT_ONCE, NOT_QUADRATIC, FakeDeepSeek, ProxyTestCase, assemble_stream, chat_body, raw_exchange,
                     run_in_threads, wait_for)
import deepseek_proxy as dp
from fake_deepseek import Answer, is_summary_request
from test_summarise import ARGS as SUMMARY_ARGS, Conversation, agent_responder as summary_agent

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}}}}]


def raw_request(port, data, timeout=5.0):
    """Raw bytes in, everything that came back out."""
    return raw_exchange(port, data, timeout)[1]


class BrowserRequests(ProxyTestCase):
    def post(self, headers, path="/v1/chat/completions", body=None):
        return self.proxy.request("POST", path, json.dumps(body or chat_body()).encode(), headers)

    def test_a_simple_cross_site_post_is_refused_before_the_upstream(self):
        status, headers, raw = self.post({"Content-Type": "text/plain;charset=UTF-8",
                                          "Origin": "http://evil.example"})
        self.assertEqual(status, 403)
        status, _, raw = self.post({"Content-Type": "text/plain"})
        self.assertEqual(status, 415)
        self.assertIn(b"application/json", raw)
        status, _, _ = self.post({"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 415)
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.post({"Content-Type": "application/json; charset=utf-8"})[0], 200)

    def test_dns_rebinding_host_is_refused_everywhere(self):
        host = {"Host": "evil.example:%d" % self.proxy.port}
        for method, path in (("GET", "/stats"), ("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"),
                             ("POST", "/v1/chat/completions")):
            status, headers, raw = self.proxy.request(method, path, json.dumps(chat_body()).encode()
                                                      if method == "POST" else None, host)
            self.assertEqual(status, 403, path)
            self.assertNotIn(b"cost_usd", raw)
        self.assertEqual(self.fake.requests, [])
        for good in ("127.0.0.1:%d" % self.proxy.port, "localhost:%d" % self.proxy.port, "localhost",
                     "[::1]:%d" % self.proxy.port):
            self.assertEqual(self.proxy.request("GET", "/health", headers={"Host": good})[0], 200, good)
        self.assertEqual(self.proxy.request("GET", "/health", headers={"Host": "127.0.0.1:1"})[0], 403,
                         "another port is another origin")

    def test_origins_and_fetch_metadata(self):
        own = "http://127.0.0.1:%d" % self.proxy.port
        status, headers, _ = self.post({"Origin": own, "Content-Type": "application/json"})
        self.assertEqual(status, 200, "the dashboard's own origin")
        self.assertNotIn("Access-Control-Allow-Origin", headers)
        for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
            self.assertEqual(self.post({"Origin": origin})[0], 403, origin)
        self.assertEqual(self.post({"Sec-Fetch-Site": "cross-site"})[0], 403)
        self.assertEqual(self.post({"Sec-Fetch-Site": "same-site"})[0], 403)
        self.assertEqual(self.proxy.request("GET", "/stats", headers={"Sec-Fetch-Site": "same-origin"})[0], 200)
        status, headers, _ = self.proxy.request("OPTIONS", "/v1/chat/completions",
                                                headers={"Origin": "http://evil.example"})
        self.assertEqual(status, 403)
        self.assertNotIn("Access-Control-Allow-Origin", headers)
        self.assertEqual(len(self.fake.requests), 1)

    def test_explicitly_allowed_origin_and_host(self):
        proxy = self.start_proxy(["--allow-origin", "https://my.app", "--allowed-host", "proxy.lan"])
        status, headers, _ = proxy.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "https://my.app", "Access-Control-Request-Headers": "authorization, content-type"})
        self.assertEqual(status, 204)
        self.assertEqual(headers["Access-Control-Allow-Origin"], "https://my.app")
        status, headers, _ = proxy.request("POST", "/v1/chat/completions", json.dumps(chat_body()).encode(),
                                           {"Origin": "https://my.app", "Sec-Fetch-Site": "cross-site"})
        self.assertEqual(status, 200)
        self.assertEqual(headers["Access-Control-Allow-Origin"], "https://my.app")
        self.assertEqual(proxy.request("GET", "/health", headers={"Host": "proxy.lan:%d" % proxy.port})[0], 200)


PATHOLOGICAL = {
    "unclosed attachment tags": "<attachment " * 90000,
    "unclosed tags with attributes": '<attachment filePath="a.py">x ' * 30000,
    "fence openers": "```python\ncode\n" * 70000,
    "one huge line": "x" * 1000000,
    "blank-line runs": "\n \n" * 300000,
    "CJK": "中文文本测试" * 170000,
    "nested boilerplate": "<environment_details><userMemory>" * 30000,
    "closed boilerplate blocks": "<userMemory>a</userMemory>\n" * 36000,
}


class LinearStages(ProxyTestCase):
    proxy_args = ("--min-segment-chars", "100", "--markdown-dedup", "auto", "--max-context", "100000000")

    def test_pathological_megabyte_inputs_finish_fast_and_health_answers_meanwhile(self):
        state = self.proxy.state
        for name, text in PATHOLOGICAL.items():
            messages = [{"role": "system", "content": "s"}, {"role": "user", "content": text},
                        {"role": "assistant", "content": text}, {"role": "user", "content": text}]
            started = time.monotonic()
            dp.prepare({"model": "x", "messages": messages}, state)
            self.assertLess(time.monotonic() - started, NOT_QUADRATIC, name)

        def big_request(index):
            text = list(PATHOLOGICAL.values())[index % len(PATHOLOGICAL)]
            return self.proxy.chat({"model": "x", "messages": [{"role": "user", "content": text}]})[0]
        worker = threading.Thread(target=run_in_threads, args=(big_request, 2))
        worker.start()
        started = time.monotonic()
        self.assertEqual(self.proxy.request("GET", "/health")[0], 200)
        self.assertLess(time.monotonic() - started, AT_ONCE)
        worker.join(30)

    def test_deep_nesting_with_a_lone_surrogate_is_a_400(self):
        body = b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}], "x": ' + \
            b"[" * 1000 + b"]" * 1000 + b"}"
        status, _, raw = self.proxy.request("POST", "/v1/chat/completions", body)
        self.assertEqual(status, 400, raw)
        deep_tools = b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}], "tools": [' + \
            b'{"a":' * 900 + b"1" + b"}" * 900 + b"]}"
        status, _, raw = self.proxy.request("POST", "/v1/chat/completions", deep_tools)
        self.assertLess(status, 500, raw)


class Isolation(ProxyTestCase):
    proxy_args = SUMMARY_ARGS

    def test_conversations_opened_alike_do_not_wait_for_each_others_summaries(self):
        self.fake.responder = summary_agent
        self.fake.summary_delay = 0.1
        conversations = [Conversation(self.proxy, task="Same task.") for _ in range(2)]
        for _ in range(40):
            for conversation in conversations:
                conversation.step()
            if any(is_summary_request(r) for r in self.fake.requests):
                break
        summaries = [r for r in self.fake.requests if is_summary_request(r)]
        self.assertEqual(len(summaries), 2, "one per conversation, neither skipped")
        sent = [r for r in self.fake.requests if not is_summary_request(r)][-2:]
        for request in sent:
            self.assertIn("<conversation-summary>", json.dumps(request["messages"]))


class BoundedResources(ProxyTestCase):
    proxy_args = ("--max-connections", "4", "--client-timeout", "0.3", "--idle-timeout", "5")

    def test_connections_over_the_cap_get_a_quick_503(self):
        # a long client timeout: the half-sent bodies must still be open when the fifth arrives, however
        # slow the machine (with 0.3 s a loaded CI box cut them off first and the fifth got in)
        proxy = self.start_proxy(["--max-connections", "4", "--client-timeout", "30", "--idle-timeout", "5"])
        busy = []  # connections in the middle of sending a request body: not idle, not evictable
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", proxy.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            busy.append(sock)
        self.addCleanup(lambda: [sock.close() for sock in busy])
        self.assertTrue(wait_for(lambda: proxy.server.connections == 4 and not proxy.server.idle))
        started = time.monotonic()
        answer = raw_request(proxy.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertIn(b" 503 ", answer.split(b"\r\n")[0])
        self.assertIn(b"Retry-After", answer)
        self.assertLess(time.monotonic() - started, AT_ONCE)
        for sock in busy:
            sock.close()
        self.assertTrue(wait_for(lambda: proxy.request("GET", "/health")[0] == 200, timeout=3))

    def test_a_trickling_client_is_cut_off_at_the_total_deadline(self):
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=5) as sock:
            answer = b""
            try:
                for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.05)
            except OSError:
                pass
            try:
                answer = sock.recv(1000)
            except OSError:
                pass
        self.assertLess(time.monotonic() - started, 2.0, "one byte at a time does not extend the deadline")
        self.assertNotIn(b"200", answer)

    def test_request_bodies_held_at_once_are_bounded(self):
        proxy = self.start_proxy(["--max-body-bytes-in-flight", str(5 * 1024 * 1024 // 2), "--client-timeout", "30"])
        size = 2 * 1024 * 1024
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % size)
        first = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        self.addCleanup(first.close)
        first.sendall(head + b"{" + b" " * (size - 2))  # one byte short: holds its first MiB, waits for the rest
        self.assertTrue(wait_for(lambda: proxy.server.body_bytes >= 1024 * 1024))
        answer = raw_request(proxy.port, head + b"{" + b" " * (size - 1), timeout=3)
        self.assertIn(b" 503 ", answer.split(b"\r\n")[0])
        self.assertIn(b"Retry-After: 1", answer)

    def test_an_endless_upstream_line_is_an_error_not_memory(self):
        proxy = self.start_proxy(["--max-upstream-event-bytes", "100000"])
        self.fake.failures.append(("huge_line", 1000000))
        status, _, events = proxy.chat(chat_body(stream=True))
        self.assertEqual(status, 200)
        self.assertIn("error", events[-1])
        self.assertIn("over 100000 bytes", events[-1]["error"]["message"])


class SystemPromptSpend(ProxyTestCase):
    proxy_args = ("--system-min-chars", "1000", "--no-system-payback", "--system-wait", "5", "--system-summaries-per-hour", "2",
                  "--max-system-prompts", "2")

    def summary_calls(self):
        return [r for r in self.fake.requests if is_summary_request(r)]

    def ask(self, system):
        self.assertEqual(self.proxy.chat({"model": "x", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": "hi"}]})[0], 200)

    def test_a_prompt_seen_once_costs_nothing_and_the_cap_holds(self):
        os.makedirs(os.path.join(self.data_dir, "post_sys"), exist_ok=True)
        foreign = os.path.join(self.data_dir, "post_sys", "notes.txt")
        with open(foreign, "w") as handle:
            handle.write("mine")
        prompts = ["Prompt %d. " % i + "Follow the rules. " * 100 for i in range(40)]
        for prompt in prompts:
            self.ask(prompt)
        self.assertEqual(self.summary_calls(), [], "40 prompts seen once: no paid summary")
        for prompt in prompts[:3]:
            self.ask(prompt)
            self.ask(prompt)
        self.proxy.state.wait_idle()
        self.assertEqual(len(self.summary_calls()), 2, "capped at 2 an hour")
        self.assertIn("sent unsummarised", self.proxy.log())
        names = sorted(os.listdir(os.path.join(self.data_dir, "post_sys")))
        self.assertEqual(len([n for n in names if n.endswith(".txt") and n != "notes.txt"]), 2)
        self.assertTrue(os.path.exists(foreign), "files the proxy did not make are never deleted")


class Files(ProxyTestCase):
    def test_caches_are_private(self):
        self.fake.responder = lambda body, n: Answer(reasoning="r", tool_calls=[("read_file", {"path": "a"})])
        self.proxy.chat({"model": "x", "messages": [{"role": "user", "content": "go"}], "tools": TOOLS})
        self.proxy.state.flush()
        path = os.path.join(self.data_dir, "reasoning_cache.jsonl")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.join(self.data_dir, "stats.json")).st_mode & 0o777, 0o600)

    def test_reasoning_is_cached_before_the_answers_last_byte(self):
        """A client may send its next request the moment the finish chunk arrives."""
        self.fake.done_delay = 0.3
        self.fake.responder = lambda body, n: Answer(reasoning="thought %d" % n,
                                                     tool_calls=[("read_file", {"path": "a"})])
        messages = [{"role": "user", "content": "go"}]
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "x", "messages": messages, "tools": TOOLS, "stream": True}),
            {"Content-Type": "application/json"})
        response = connection.getresponse()
        events = []
        while True:
            line = response.fp.readline()
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
                if events[-1]["choices"][0]["finish_reason"]:
                    break
        message, _, _ = assemble_stream(events)
        follow_up = messages + [{"role": "assistant", "content": "", "tool_calls": message["tool_calls"]},
                                {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "x"}]
        self.assertEqual(self.proxy.chat({"model": "x", "messages": follow_up, "tools": TOOLS})[0], 200)
        self.assertEqual(self.fake.requests[-1]["messages"][1]["reasoning_content"], "thought 1")
        connection.close()


class UpstreamHygiene(ProxyTestCase):
    def test_redirects_are_never_followed(self):
        thief = FakeDeepSeek("anything").start()
        self.addCleanup(thief.stop)
        for code in (301, 302, 307, 308):
            self.fake.failures.append(("redirect", code, thief.url + "/v1/chat/completions"))
            status, _, body = self.proxy.chat(chat_body())
            self.assertEqual(status, 502, code)
            self.assertEqual(body["error"]["code"], "upstream_redirect")
        self.assertEqual(thief.requests, [])
        self.assertEqual(thief.headers, [])

    def test_non_json_error_bodies_are_excerpted_and_redacted(self):
        page = ("<html><body>Bad gateway. Your request: Authorization: Bearer %s; key %s %s</body></html>"
                % (API_KEY, API_KEY, "filler " * 500)).encode()
        self.fake.failures.extend([("raw", 502, page)] * 3)
        status, _, raw = self.proxy.request("POST", "/v1/chat/completions", json.dumps(chat_body()).encode())
        self.assertEqual(status, 502)
        self.assertNotIn(API_KEY.encode(), raw)
        self.assertNotIn(b"sk-test", raw)
        self.assertLess(len(raw), 600)

    def test_retry_after_is_honoured_capped_and_passed_on(self):
        proxy = self.start_proxy(["--upstream-retry-after-max", "0.2", "--upstream-max-retries", "1"])
        self.fake.failures.extend([("status", 429, {"error": {"message": "slow down"}}, {"Retry-After": "7"})] * 2)
        started = time.monotonic()
        status, headers, _ = proxy.chat(chat_body())
        self.assertEqual(status, 429)
        self.assertGreaterEqual(time.monotonic() - started, 0.2, "waited what Retry-After asked, capped")
        self.assertEqual(headers.get("Retry-After"), "7")


class HttpDetails(ProxyTestCase):
    def test_head_gets_headers_only_and_keeps_the_connection_usable(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=5)
        connection.request("HEAD", "/health")
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.read(), b"")
        connection.request("HEAD", "/v1/chat/completions")
        response = connection.getresponse()
        self.assertEqual(response.status, 405)
        response.read()
        connection.request("GET", "/health")
        response = connection.getresponse()
        self.assertEqual(json.loads(response.read())["status"], "ok")
        connection.close()

    def test_ambiguous_lengths_are_refused(self):
        body = json.dumps(chat_body()).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        answer = raw_request(self.proxy.port, head + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n%s"
                             % (len(body), body))
        self.assertIn(b" 400 ", answer.split(b"\r\n")[0])
        answer = raw_request(self.proxy.port, head + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
        self.assertIn(b" 400 ", answer.split(b"\r\n")[0])
        self.assertEqual(self.fake.requests, [])

    def test_a_reset_connection_is_one_line_not_a_traceback(self):
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", self.proxy.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        time.sleep(0.2)
        self.assertEqual(self.proxy.request("GET", "/health")[0], 200)
        self.assertNotIn("Traceback", self.proxy.log())

    def test_a_broken_stream_counts_as_failed(self):
        self.fake.failures.append(("break", 3))
        status, _, events = self.proxy.chat(chat_body(stream=True))
        self.assertEqual(status, 200)
        self.assertIn("error", events[-1])
        stats = json.loads(self.proxy.request("GET", "/stats")[2])
        self.assertEqual(stats["requests"]["failed"], 1)
        self.assertIn("status=502", self.proxy.log())


if __name__ == "__main__":
    unittest.main()
