"""The relay end to end: the proxy in-process, the fake DeepSeek upstream, a plain HTTP client."""

import http.client
import json
import os
import time
import unittest

from helpers import API_KEY, Proxy, ProxyTestCase, assemble_stream, chat_body, sse_data
from fake_deepseek import Answer

TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                           "parameters": {"type": "object", "properties": {
                                               "path": {"type": "string"}}}}}]


class NonStreaming(ProxyTestCase):
    def test_answer_and_usage_come_back_unchanged(self):
        status, headers, answer = self.proxy.chat(chat_body())
        self.assertEqual(status, 200)
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["choices"][0]["message"]["content"], "Answer 1.")
        self.assertTrue(answer["choices"][0]["message"]["reasoning_content"].startswith("Reasoning 1"))
        usage = answer["usage"]
        self.assertEqual(usage["prompt_tokens"], usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"])
        self.assertEqual(answer["model"], "deepseek-v4-flash", "the model echoed is DeepSeek's")
        self.assertEqual(headers["X-Proxy-Cache-Hit-Tokens"], str(usage["prompt_cache_hit_tokens"]))
        self.assertIn("X-Proxy-Tokens-In-Estimate", headers)

    def test_forced_configuration_and_dropped_fields(self):
        status, _, _ = self.proxy.chat(chat_body(
            temperature=0.1, top_p=1, n=1, logprobs=True, top_logprobs=2, seed=7, store=True,
            metadata={"a": "b"}, parallel_tool_calls=True, user="me", max_completion_tokens=50,
            max_tokens=60, reasoning_effort="low", frequency_penalty=0.5, presence_penalty=0.5,
            thinking=False, stop=["END"], response_format={"type": "text"}))
        self.assertEqual(status, 200)
        sent = self.fake.requests[-1]
        self.assertEqual(sent["model"], "deepseek-v4-flash")
        self.assertEqual(sent["max_tokens"], 128000)
        self.assertEqual(sent["thinking"], {"type": "enabled"})
        for dropped in ("temperature", "top_p", "n", "logprobs", "top_logprobs", "seed", "store", "metadata",
                        "parallel_tool_calls", "user", "max_completion_tokens", "reasoning_effort",
                        "frequency_penalty", "presence_penalty", "stream", "stream_options"):
            self.assertNotIn(dropped, sent)
        self.assertEqual(sent["stop"], ["END"])
        self.assertEqual(sent["response_format"], {"type": "text"})

    def test_both_path_prefixes(self):
        for path in ("/v1/chat/completions", "/chat/completions", "/v1/chat/completions/"):
            status, _, answer = self.proxy.chat(chat_body(), path=path)
            self.assertEqual(status, 200, path)

    def test_developer_role_and_unknown_keys(self):
        body = chat_body(messages=[
            {"role": "developer", "content": "Be brief.", "copilot_cache_control": {"type": "ephemeral"}},
            {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}],
             "cot_id": "x", "cot_summary": "y"}])
        status, _, _ = self.proxy.chat(body)
        self.assertEqual(status, 200)
        sent = self.fake.requests[-1]["messages"]
        self.assertEqual(sent[0], {"role": "system", "content": "Be brief."})
        self.assertEqual(sent[1], {"role": "user", "content": [{"type": "text", "text": "Hi"}]})

    def test_thinking_auto_disables_for_forced_tool_choice(self):
        body = chat_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "read_file"}})
        status, _, answer = self.proxy.chat(body)
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.fake.requests[-1]["thinking"], {"type": "disabled"})
        status, _, _ = self.proxy.chat(chat_body(tools=TOOLS, tool_choice="required"))
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.requests[-1]["thinking"], {"type": "disabled"})
        self.proxy.chat(chat_body(tools=TOOLS, tool_choice="auto"))
        self.assertEqual(self.fake.requests[-1]["thinking"], {"type": "enabled"})

    def test_thinking_mode_disabled_flag(self):
        proxy = self.start_proxy(["--thinking-mode", "disabled", "--default-model", "deepseek-v4-pro",
                                  "--max-output-tokens", "4096"])
        status, _, answer = proxy.chat(chat_body())
        self.assertEqual(status, 200)
        sent = self.fake.requests[-1]
        self.assertEqual((sent["thinking"], sent["model"], sent["max_tokens"]),
                         ({"type": "disabled"}, "deepseek-v4-pro", 4096))
        self.assertNotIn("reasoning_content", answer["choices"][0]["message"])


class Streaming(ProxyTestCase):
    def test_text_stream_is_relayed_with_usage_on_the_finish_chunk(self):
        status, headers, events = self.proxy.chat(chat_body(stream=True))
        self.assertEqual(status, 200)
        self.assertEqual(headers["X-Accel-Buffering"], "no")
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events[0]["choices"][0]["delta"],
                         {"role": "assistant", "content": None, "reasoning_content": ""})
        message, usage, finish = assemble_stream(events)
        self.assertEqual(message["content"], "Answer 1.")
        self.assertEqual(finish, "stop")
        self.assertIsNotNone(events[-2]["usage"])
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(self.fake.requests[-1]["stream_options"], {"include_usage": True})

    def test_streamed_tool_calls_reassemble_to_the_upstream_calls(self):
        self.fake.responder = lambda body, n: Answer(
            content="", reasoning="Need two files.",
            tool_calls=[("read_file", {"path": "src/main.py"}), ("read_file", {"path": "README.md"})])
        status, _, events = self.proxy.chat(chat_body(stream=True, tools=TOOLS,
                                                      stream_options={"include_usage": True}))
        self.assertEqual(status, 200)
        message, usage, finish = assemble_stream(events)
        self.assertEqual(finish, "tool_calls")
        self.assertEqual(message["tool_calls"], self.fake.answers[-1]["tool_calls"])
        self.assertEqual(message["reasoning_content"], "Need two files.")

    def test_events_are_not_buffered(self):
        self.fake.chunk_delay = 0.06
        self.fake.responder = lambda body, n: Answer(content="abcdefghij", reasoning="r")
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
        connection.request("POST", "/v1/chat/completions", json.dumps(chat_body(stream=True)),
                           {"Content-Type": "application/json", "Authorization": "Bearer x"})
        response = connection.getresponse()
        arrivals = []
        while True:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                arrivals.append((time.monotonic(), line))
        connection.close()
        gaps = [later[0] - earlier[0] for earlier, later in zip(arrivals, arrivals[1:-1])]
        self.assertGreaterEqual(len(gaps), 4)
        # Each event arrives as the fake sends it, ~0.06 s apart; a buffering relay delivers them together.
        self.assertTrue(all(gap > 0.035 for gap in gaps), gaps)

    def test_keepalive_comments_are_relayed(self):
        self.fake.keepalive_comments = 2
        status, _, raw = self.proxy.request("POST", "/v1/chat/completions", chat_body(stream=True))
        self.assertEqual(status, 200)
        self.assertTrue(raw.startswith(b": keep-alive\n\n: keep-alive\n\ndata: "), raw[:60])
        self.assertEqual(assemble_stream(sse_data(raw))[0]["content"], "Answer 1.")

    def test_upstream_dying_mid_stream_ends_with_an_error_event(self):
        self.fake.failures.append(("break", 3))
        status, _, events = self.proxy.chat(chat_body(stream=True))
        self.assertEqual(status, 200)
        self.assertIn("error", events[-1])
        self.assertEqual(events[-1]["error"]["code"], "upstream_stream_error")
        # and the proxy still serves the next request
        self.assertEqual(self.proxy.chat(chat_body())[0], 200)


class Errors(ProxyTestCase):
    def test_upstream_errors_pass_through_with_status_and_body(self):
        for status, body in ((400, {"error": {"message": "bad thing", "type": "invalid_request_error",
                                              "param": None, "code": "invalid_request_error"}}),
                             (422, {"error": {"message": "expected struct ThinkingOptions",
                                              "type": "invalid_request_error", "param": None,
                                              "code": "invalid_request_error"}})):
            self.fake.failures.append(("status", status, body))
            got_status, _, got = self.proxy.chat(chat_body())
            self.assertEqual((got_status, got), (status, body))

    def test_refused_deepseek_key_is_named_as_the_proxys_and_not_echoed(self):
        proxy = self.start_proxy(key="sk-wrong-key-wxyz")
        status, _, body = proxy.chat(chat_body())
        self.assertEqual(status, 401)
        self.assertIn("proxy's DeepSeek API key", body["error"]["message"])
        self.assertIn("DEEPSEEK_API_KEY", body["error"]["message"])
        self.assertNotIn("wxyz", json.dumps(body))
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertIn("WARNING DeepSeek refused the proxy's DeepSeek API key", proxy.log())

    def test_insufficient_balance_says_whose(self):
        self.fake.failures.append(("status", 402, {"error": {"message": "Insufficient Balance",
                                                             "type": "unknown_error"}}))
        status, _, body = self.proxy.chat(chat_body())
        self.assertEqual(status, 402)
        self.assertIn("insufficient balance", body["error"]["message"])
        self.assertIn("DEEPSEEK_API_KEY", body["error"]["message"])
        self.assertIn("WARNING DeepSeek reports insufficient balance", self.proxy.log())

    def test_429_is_retried_then_passed_through(self):
        for _ in range(3):
            self.fake.failures.append(("status", 429, {"error": {"message": "Too many requests",
                                                                 "type": "rate_limit_error"}}))
        status, _, body = self.proxy.chat(chat_body())
        self.assertEqual(status, 429)
        self.assertEqual(body["error"]["message"], "Too many requests")
        self.assertEqual(len(self.fake.requests), 3, "one call and two retries")

    def test_transient_503_is_retried_transparently(self):
        self.fake.failures.append(("status", 503, {"error": {"message": "busy", "type": "server_error"}}))
        status, _, body = self.proxy.chat(chat_body(stream=True))
        self.assertEqual(status, 200)
        self.assertEqual(body[-1], "[DONE]")

    def test_upstream_down_gives_502(self):
        proxy = Proxy("http://127.0.0.1:9", self.data_dir, ["--upstream-max-retries", "0"])
        self.addCleanup(proxy.stop)
        status, _, body = proxy.chat(chat_body())
        self.assertEqual(status, 502)
        self.assertEqual(body["error"]["type"], "upstream_unreachable")

    def test_upstream_timeout_gives_504(self):
        proxy = self.start_proxy(["--upstream-timeout", "0.15", "--upstream-max-retries", "0"])
        self.fake.failures.append(("sleep", 1.0))
        status, _, body = proxy.chat(chat_body())
        self.assertEqual(status, 504)
        self.assertEqual(body["error"]["type"], "upstream_timeout")

    def test_no_api_key_gives_a_401_that_says_how_to_set_one(self):
        proxy = self.start_proxy(key="")
        status, _, body = proxy.chat(chat_body())
        self.assertEqual(status, 401)
        self.assertIn("DEEPSEEK_API_KEY", body["error"]["message"])
        self.assertEqual(len(self.fake.requests), 0)

    def test_key_from_k_dat(self):
        with open(self.data_dir + "/K.dat", "w") as handle:
            handle.write("# my key\n\n%s\n" % API_KEY)
        proxy = self.start_proxy(key="")
        self.assertEqual(proxy.chat(chat_body())[0], 200)

    def test_client_errors(self):
        status, _, raw = self.proxy.request("POST", "/v1/chat/completions", b"{not json")
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(raw)["error"]["code"], "invalid_json")
        status, _, raw = self.proxy.request("POST", "/v1/chat/completions", {"messages": []})
        self.assertEqual(status, 400)
        status, _, raw = self.proxy.request("GET", "/v1/chat/completions")
        self.assertEqual(status, 405)
        status, _, raw = self.proxy.request("GET", "/v1/nothing")
        self.assertEqual(status, 404)
        self.assertIn("error", json.loads(raw))
        self.assertEqual(len(self.fake.requests), 0)


class Documentation(unittest.TestCase):
    def test_readme_documents_every_flag(self):
        import os
        import deepseek_proxy
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as handle:
            readme = handle.read()
        for name in deepseek_proxy.config_help():
            flag = "--" + deepseek_proxy.FLAG_NAMES.get(name, name.lower()).replace("_", "-")
            self.assertTrue("`" + flag + "`" in readme, "%s (%s) is not in README.md" % (flag, name))
        self.assertIn("python -m unittest discover -s tests -v", readme)

    def test_readme_tables_are_the_codes(self):
        import os
        import subprocess
        import sys
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run([sys.executable, os.path.join(root, "bench", "docs.py"), "--check"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_every_stage_declares_its_flags_docs_and_stats(self):
        import os
        import deepseek_proxy
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as handle:
            readme = handle.read()
        config = deepseek_proxy.Config()
        state = deepseek_proxy.ProxyState(config, persist=False, api_key="")
        caches = state.stats.snapshot(state)["caches"]
        for stage in deepseek_proxy.PIPELINE:
            self.assertTrue(stage.doc, stage.name)
            self.assertIn("| `%s` |" % stage.name, readme)
            for name in stage.flag_names():
                self.assertTrue(hasattr(config, name), "%s: %s" % (stage.name, name))
                self.assertIn("`%s`" % deepseek_proxy.flag_name(name), readme, "%s: %s" % (stage.name, name))
            if stage.store:
                self.assertIn(stage.name, state.stores)
            if stage.stats:
                for key in stage.stats(state.stores.get(stage.name)):
                    self.assertIn(key, caches, stage.name)

    def test_the_repository_stands_on_its_own(self):
        import os
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for folder, folders, names in os.walk(root):
            folders[:] = [name for name in folders if not name.startswith(".") and name != "__pycache__"]  # .git,
            # .venv, bench/.clients (installed clients): not the repository's own files
            for name in names:
                if name.endswith((".py", ".md", ".txt", ".example")) or name == "run":
                    with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as handle:
                        self.assertNotIn(".." + "/shared", handle.read(), os.path.join(folder, name))

    def test_the_fake_deepseek_runs_by_hand(self):
        import subprocess
        import sys
        from helpers import HERE
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_deepseek.py"), "--port", "0"],
                                   stdout=subprocess.PIPE, text=True)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        line = process.stdout.readline()
        self.assertIn("fake DeepSeek on http://127.0.0.1:", line)
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/v1/models")
        self.assertEqual(connection.getresponse().status, 200)
        connection.close()


class Routes(ProxyTestCase):
    def test_models_and_health(self):
        for path in ("/v1/models", "/models"):
            status, _, raw = self.proxy.request("GET", path)
            self.assertEqual(status, 200)
            self.assertEqual(json.loads(raw)["data"][0]["id"], "deepseek-v4-flash")
        status, _, raw = self.proxy.request("GET", "/health")
        self.assertEqual((status, json.loads(raw)["status"]), (200, "ok"))
        self.assertEqual(self.fake.requests, [], "models and health never call upstream")

    def test_keep_alive_connection_serves_several_requests(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
        for _ in range(3):
            connection.request("POST", "/v1/chat/completions", json.dumps(chat_body(stream=True)),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            self.assertEqual(response.status, 200)
            self.assertTrue(response.read().endswith(b"data: [DONE]\n\n"))
        connection.close()

    def test_sigterm_stops_cleanly(self):
        proxy = self.start_proxy(process=True)
        self.assertEqual(proxy.chat(chat_body())[0], 200)
        self.assertEqual(proxy.stop(), 0)
        self.assertIn("stopped", proxy.log())


if __name__ == "__main__":
    unittest.main()
