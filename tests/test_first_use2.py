"""First use, round 2 (issue 25): what a newcomer tripped over, each with a test."""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import unittest

from helpers import PROXY_COMMAND, ProxyTestCase, chat_body, patched_environ
from fake_deepseek import Answer, demo_agent, scripted
import deepseek_proxy as dp

KEY = "sk-0123456789abcdef"


class PortInUse(unittest.TestCase):
    def test_one_line_naming_the_port(self):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        result = subprocess.run(PROXY_COMMAND + ["--port", str(port), "--data-dir", tempfile.mkdtemp()],
                                capture_output=True, text=True, timeout=30, env=dict(os.environ, DEEPSEEK_API_KEY=KEY))
        self.assertEqual(result.returncode, 1)
        self.assertIn("Port %d on 127.0.0.1 is already in use" % port, result.stderr)
        self.assertIn("--port", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class KeyFile(unittest.TestCase):
    def write(self, data, folder=None):
        folder = folder or tempfile.mkdtemp()
        with open(os.path.join(folder, "K.dat"), "wb") as handle:
            handle.write(data)
        return folder

    def test_what_editors_and_powershell_save(self):
        for name, data in (("utf-8", KEY.encode()), ("BOM", b"\xef\xbb\xbf" + KEY.encode() + b"\r\n"),
                           ("UTF-16 (PowerShell 5 >)", ("\ufeff" + KEY + "\r\n").encode("utf-16-le")),
                           ("UTF-16 big-endian", ("\ufeff" + KEY).encode("utf-16-be")),
                           ("comment, blank lines, spaces", b"# my key\r\n\r\n   " + KEY.encode() + b"  \r\n")):
            folder = self.write(data)
            with patched_environ({"DEEPSEEK_API_KEY": None}):
                self.assertEqual(dp.load_api_key(folder), KEY, name)

    def test_something_that_is_no_key_is_refused_naming_the_file(self):
        folder = self.write("sk-abc def ghi jkl".encode())
        with patched_environ({"DEEPSEEK_API_KEY": None}), self.assertRaises(ValueError) as caught:
            dp.load_api_key(folder)
        self.assertIn(os.path.join(folder, "K.dat"), str(caught.exception))
        result = subprocess.run(PROXY_COMMAND + ["--data-dir", folder, "--port", "0"], capture_output=True,
                                text=True, timeout=30, env={k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"})
        self.assertEqual(result.returncode, 2)
        self.assertIn("does not look like an API key", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_the_folder_it_is_started_from_counts_and_the_log_says_which_file(self):
        started_in = self.write(KEY.encode())
        data = tempfile.mkdtemp()
        env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"}
        process = subprocess.Popen(PROXY_COMMAND + ["--data-dir", data, "--port", "0", "--upstream",
                                    "http://127.0.0.1:9"], cwd=started_in, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            self.assertTrue(process.stdout.readline().startswith("LISTENING"))
        finally:
            process.terminate()
            _, err = process.communicate(timeout=20)
        self.assertIn("DeepSeek key read from %s" % os.path.join(started_in, "K.dat"), err)
        self.assertNotIn(KEY, err)

    def test_the_missing_key_warning_says_where(self):
        data = tempfile.mkdtemp()
        env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"}
        process = subprocess.Popen(PROXY_COMMAND + ["--data-dir", data, "--port", "0"], cwd=data, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            process.stdout.readline()
        finally:
            process.terminate()
            _, err = process.communicate(timeout=20)
        self.assertIn("create %s" % os.path.join(data, "K.dat"), err)


class TrialKeptApart(unittest.TestCase):
    def test_a_local_upstream_gets_its_own_data_folder(self):
        trial = dp.ProxyState(dp.Config(DEEPSEEK_BASE="http://127.0.0.1:9000"), persist=False, api_key="")
        self.assertEqual(trial.data_dir, os.path.join(dp.SCRIPT_DIR, "trial"))
        real = dp.ProxyState(dp.Config(), persist=False, api_key="")
        self.assertEqual(real.data_dir, dp.SCRIPT_DIR)
        chosen = dp.ProxyState(dp.Config(DEEPSEEK_BASE="http://127.0.0.1:9000", DATA_DIR="/tmp/x"), persist=False,
                               api_key="")
        self.assertEqual(chosen.data_dir, "/tmp/x", "--data-dir always wins")


class WhatTheDashboardShows(ProxyTestCase):
    def test_the_model_the_client_asked_for(self):
        self.proxy.chat({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
                        path="/v1/messages")
        self.proxy.chat({"model": "gpt-5.5", "input": "hi"}, path="/v1/responses")
        recent = json.loads(self.proxy.request("GET", "/stats")[2])["recent"]
        self.assertEqual([entry["model"] for entry in recent], ["claude-sonnet-4-5", "gpt-5.5"])

    def test_headers_name_estimates_as_estimates(self):
        _, headers, _ = self.proxy.chat(chat_body())
        self.assertIn("X-Proxy-Tokens-Sent-Estimate", headers)
        self.assertIn("X-Proxy-Tokens-In-Estimate", headers)
        self.assertNotIn("X-Proxy-Tokens-Out", headers)

    def test_head_is_logged_as_head(self):
        self.proxy.request("HEAD", "/nothing")
        self.assertIn("refused HEAD /nothing", self.proxy.log())
        self.assertNotIn("refused GET /nothing", self.proxy.log())


class Shutdown(ProxyTestCase):
    def test_a_second_signal_answers_open_requests_with_an_error_at_once(self):
        self.fake.chunk_delay = 0.2  # a long streamed answer
        self.fake.responder = lambda body, number: Answer(content="word " * 40, reasoning="r")
        proxy = self.start_proxy(["--shutdown-grace", "30"], process=True)
        connection = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        body = json.dumps(chat_body(stream=True)).encode()
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                           b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        first = connection.recv(65536)
        self.assertIn(b"200 OK", first)
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proxy.process.send_signal(signal.SIGINT)
        received = b""
        while True:
            data = connection.recv(65536)
            if not data:
                break
            received += data
        connection.close()
        self.assertIn(b"shutting down", received, "an error event, not a silent close")
        self.assertEqual(proxy.process.wait(10), 0)
        self.assertLess(time.monotonic() - started, 8, "not the whole 30 s grace")


@unittest.skipUnless(socket.has_ipv6, "no IPv6 on this machine")
class BothLoopbacks(ProxyTestCase):
    def test_localhost_resolving_to_ipv6_gets_through(self):
        proxy = self.start_proxy(["--host", "127.0.0.1"], process=True)
        try:
            connection = socket.create_connection(("::1", proxy.port), timeout=5)
        except OSError as error:
            self.skipTest("::1 not reachable here: %s" % error)
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: localhost:%d\r\nConnection: close\r\n\r\n" % proxy.port)
        self.assertIn(b"200", connection.recv(1000).split(b"\r\n")[0])
        connection.close()
        self.assertIn("and http://[::1]:%d/v1" % proxy.port, proxy.log())


class FakeForTrials(unittest.TestCase):
    def test_the_demo_agent_calls_a_read_like_tool_then_answers(self):
        tools = [{"type": "function", "function": {"name": "Bash", "parameters": {"type": "object", "properties": {
            "command": {"type": "string"}}}}},
                 {"type": "function", "function": {"name": "Read", "parameters": {"type": "object", "properties": {
                     "file_path": {"type": "string"}, "limit": {"type": "number"}}, "required": ["file_path"]}}}]
        body = {"tools": tools, "messages": [{"role": "user", "content": "look around"}]}
        first = demo_agent(body, 1)
        self.assertEqual(first.tool_calls, [("Read", {"file_path": "README.md"})])
        body["messages"] += [{"role": "assistant", "content": None}, {"role": "tool", "content": "# Title"}]
        self.assertIn("I read it", demo_agent(body, 2).content)

    def test_a_script_plays_its_answers_in_order(self):
        respond = scripted([{"content": "one"}, {"content": "", "tool_calls": [["ls", {"path": "."}]]}])
        self.assertEqual(respond({"messages": [{"role": "user", "content": "x"}]}, 1).content, "one")
        self.assertEqual(respond({"messages": [{"role": "user", "content": "x"}]}, 2).tool_calls, [("ls", {"path": "."})])
        self.assertEqual(respond({"messages": [{"role": "user", "content": "x"}]}, 9).tool_calls, [("ls", {"path": "."})])


if __name__ == "__main__":
    unittest.main()
