"""First use: start-up checks, files where they belong, errors that say what to do, explain, check."""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import unittest

from helpers import PROXY_COMMAND, API_KEY, ROOT, ProxyProcess, ProxyTestCase, chat_body, patched_environ
import deepseek_proxy as dp

SCRIPT = os.path.join(ROOT, "deepseek_proxy.py")


def run_cli(*args, literal=False):
    """The command line; with literal=True exactly as the README writes it (python deepseek_proxy.py)."""
    command = [sys.executable, SCRIPT] if literal else PROXY_COMMAND
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, DEEPSEEK_API_KEY=API_KEY))


class CommandLine(unittest.TestCase):
    def test_bad_values_are_one_line_each_and_exit_2(self):
        result = run_cli("--port", "99999", "--upstream", "not-a-url", "--summary-ratio", "2")
        self.assertEqual(result.returncode, 2)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 3, result.stderr)
        self.assertIn("--port must be between 0 and 65535", lines[0])
        self.assertNotIn("Traceback", result.stderr)

    def test_help_is_grouped_and_says_where_the_key_comes_from(self):
        result = run_cli("--help", literal=True)
        self.assertEqual(result.returncode, 0)
        for words in ("Upstream and model", "Conversation summarisation", "Server and security", "DEEPSEEK_API_KEY",
                      "K.dat", "PROXY_API_KEY", "--explain", "--check"):
            self.assertIn(words, result.stdout)
        self.assertEqual(run_cli("--version").stdout.strip(), "deepseek-proxy " + dp.__version__)

    def test_urls_a_user_can_paste(self):
        self.assertEqual(dp.url_host("::1"), "[::1]")
        self.assertEqual(dp.url_host("0.0.0.0"), "127.0.0.1")
        self.assertEqual(dp.url_host("127.0.0.1"), "127.0.0.1")

    @unittest.skipUnless(socket.has_ipv6, "no IPv6 on this machine")
    def test_listening_on_ipv6_prints_bracketed_urls(self):
        data = tempfile.mkdtemp()
        try:
            proxy = ProxyProcess("http://127.0.0.1:9", data, ["--host", "::1", "--log-level", "INFO"])
        except RuntimeError as error:
            self.skipTest("cannot listen on ::1 here: %s" % str(error)[:100])
        self.addCleanup(proxy.stop)
        log = proxy.log()
        self.assertIn("http://[::1]:%d/v1" % proxy.port, log)
        self.assertIn("dashboard http://[::1]:%d/" % proxy.port, log)

    def test_files_go_beside_the_script_by_default(self):
        self.assertEqual(dp.ProxyState(dp.Config(DATA_DIR=""), persist=False, api_key="").data_dir, dp.SCRIPT_DIR)

    def test_explain_a_saved_request_without_a_key(self):
        path = os.path.join(tempfile.mkdtemp(), "request.json")
        output = "line %d of a file that an agent reads twice\n" * 40
        with open(path, "w") as handle:
            json.dump({"model": "x", "messages": [
                {"role": "user", "content": "Read it."},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "read_file", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": output},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c2", "type": "function", "function": {
                    "name": "read_file", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c2", "content": output}]}, handle)
        stdout = io.StringIO()
        with patched_environ({"DEEPSEEK_API_KEY": None}), contextlib.redirect_stdout(stdout):
            self.assertEqual(dp.explain_file(path, dp.Config()), 0)
        result = json.loads(stdout.getvalue())
        stages = {stage["stage"]: stage for stage in result["stages"]}
        self.assertGreater(stages["dedup_tool_outputs"]["chars_removed"], 1000)
        self.assertIn("[Repeat of the output of the", result["would_send"]["messages"][4]["content"])
        self.assertEqual(result["budget"]["decision"], "under the budget")
        self.assertEqual(dp.explain_file(path + ".missing", dp.Config()), 2)


class Routes(ProxyTestCase):
    def test_no_folder_is_made_that_nothing_is_written_to(self):
        self.assertEqual(self.proxy.chat(chat_body())[0], 200)
        self.proxy.stop()
        self.assertEqual(sorted(os.listdir(self.data_dir)), ["reasoning_cache.jsonl", "stats.json"])

    def test_health_says_when_it_is_not_ready(self):
        proxy = self.start_proxy(key="")
        status, _, raw = proxy.request("GET", "/health")
        self.assertEqual(status, 503)
        health = json.loads(raw)
        self.assertEqual(health["status"], "not_ready")
        self.assertIn("DEEPSEEK_API_KEY", health["reason"])

    def test_explain_endpoint_calls_nobody_and_needs_no_key(self):
        proxy = self.start_proxy(key="")
        system = "You are a careful agent. " * 600
        body = {"model": "x", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
        status, _, raw = proxy.request("POST", "/v1/proxy/explain", json.dumps(body).encode())
        self.assertEqual(status, 200)
        result = json.loads(raw)
        self.assertEqual(result["would_send"]["model"], dp.DEFAULT_MODEL)
        self.assertEqual([stage["stage"] for stage in result["stages"]], [stage.name for stage in dp.PIPELINE])
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(proxy.state.system_prompts.flight.in_flight, {}, "no summary started")

    def test_model_by_id_json_schema_and_n(self):
        status, _, raw = self.proxy.request("GET", "/v1/models/gpt-4o")
        self.assertEqual((status, json.loads(raw)["id"]), (200, "gpt-4o"))
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        status, headers, _ = self.proxy.chat(chat_body(response_format={
            "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
        self.assertEqual(status, 200)
        sent = self.fake.requests[-1]
        self.assertEqual(sent["response_format"], {"type": "json_object"})
        self.assertIn(json.dumps(schema, sort_keys=True), sent["messages"][-1]["content"])
        self.assertIn("json_schema sent as json_object", headers["X-Proxy-Notes"])
        status, _, answer = self.proxy.chat(chat_body(n=2))
        self.assertEqual(status, 400)
        self.assertEqual((answer["error"]["code"], answer["error"]["param"]), ("unsupported_n", "n"))


class Check(ProxyTestCase):
    def run_check(self, key):
        config = dp.Config(DEEPSEEK_BASE=self.fake.url, DATA_DIR=self.data_dir)
        stdout = io.StringIO()
        with patched_environ({"DEEPSEEK_API_KEY": key}), contextlib.redirect_stdout(stdout):
            code = dp.run_check(config)
        return code, stdout.getvalue()

    def test_every_belief_holds_against_the_fake(self):
        code, output = self.run_check(API_KEY)
        self.assertEqual(code, 0, output)
        self.assertEqual(output.count("\nok  "), 7, output)
        self.assertIn("rejects a turn without reasoning_content", output)
        self.assertIn("cache hits", output)

    def test_a_refused_key_says_what_to_do(self):
        code, output = self.run_check("sk-wrong")
        self.assertEqual(code, 1)
        self.assertIn("FAIL", output)
        self.assertIn("DEEPSEEK_API_KEY", output)


if __name__ == "__main__":
    unittest.main()
