"""Shared test helpers: start the fake DeepSeek and the proxy on free ports, talk HTTP to them."""

import http.client
import json
import logging
import os
import py_compile
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import deepseek_proxy as dp  # noqa: E402
from fake_deepseek import FakeDeepSeek  # noqa: E402

API_KEY = "sk-test-key-abcd"
# Seconds a stage may take on the megabyte inputs of the linearity tests. A quadratic stage takes
# minutes on them, so this catches one on a machine ten times slower or loaded; the speed goals
# themselves are measured in bench/ (bench/overhead.py), never asserted here.
NOT_QUADRATIC = 10.0
# Seconds within which "at once" answers (a 503 at the cap, /health meanwhile) must come, against
# the 30 s deadlines they must not wait for.
AT_ONCE = 5.0
# The command line, run as a module: Python then reuses the compiled bytecode instead of compiling the
# 240 KB script for each subprocess (90 ms each). A test of the literal `python deepseek_proxy.py`
# stays in test_first_use.
PROXY_COMMAND = [sys.executable, "-m", "deepseek_proxy"]
# That bytecode must exist: with PYTHONDONTWRITEBYTECODE set (as on some machines and CI images)
# Python never writes it, and every subprocess compiled the script again. Written once here (the
# cache is keyed by the source's mtime, so an edited file is compiled anew).
try:
    py_compile.compile(os.path.join(ROOT, "deepseek_proxy.py"), doraise=True)
except (OSError, py_compile.PyCompileError):
    pass  # a read-only checkout: the subprocesses compile it, as before
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


class ProxyClient:
    """HTTP to a proxy on self.port (shared by the in-process and the subprocess proxy)."""

    port = None

    def request(self, method, path, body=None, headers=None, timeout=30):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        all_headers = {"Authorization": "Bearer client-key", "Content-Type": "application/json"}
        all_headers.update(headers or {})
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
        connection.close()
        return response.status, dict(response.getheaders()), raw

    def chat(self, body, path="/v1/chat/completions", headers=None):
        """POST a chat request; returns (status, headers, parsed JSON or the list of SSE data)."""
        status, response_headers, raw = self.request("POST", path, body, headers)
        if response_headers.get("Content-Type", "").startswith("text/event-stream"):
            return status, response_headers, sse_data(raw)
        return status, response_headers, json.loads(raw)


TEST_ARGS = ["--log-level", "DEBUG", "--upstream-retry-base-sleep", "0.01",
             "--summarise-retry-base-sleep", "0.01", "--shutdown-grace", "3"]


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line must never break a test
            pass


class Proxy(ProxyClient):
    """deepseek_proxy in this process: its configuration built from command-line flags (a value:
    several proxies with different configurations can run at once), its own state object, a server
    on a free port in a thread, and its log captured."""

    def __init__(self, upstream, data_dir, args=(), env=None, key=API_KEY):
        self.data_dir = data_dir
        environment = {"DEEPSEEK_API_KEY": key or None, "PROXY_API_KEY": None, "DEEPSEEK_BASE_URL": None}
        environment.update(env or {})
        with patched_environ(environment):
            self.config, _ = dp.parse_args(["--upstream", upstream, "--data-dir", data_dir, "--port", "0"] +
                                           TEST_ARGS + list(args))
        self.capture = LogCapture()
        self.capture.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger = logging.getLogger("deepseek_proxy")
        self.saved_logger = (logger.level, logger.propagate)
        logger.setLevel(self.config.LOG_LEVEL)
        logger.propagate = False
        logger.addHandler(self.capture)
        with patched_environ(environment):
            self.state = dp.ProxyState(self.config).load()
        self.server = dp.start_server(self.state, "127.0.0.1", 0, poll_interval=0.005)
        self.port = self.server.server_address[1]
        self.stopped = False

    def log(self):
        """What the proxy logged, once every answer already written has been recorded (its log line
        is written just after the answer's last bytes)."""
        self.state.unrecorded.wait(5.0)
        return "\n".join(list(self.capture.lines))

    def stop(self, timeout=10):
        if not self.stopped:
            self.stopped = True
            dp.stop_server(self.server, self.config.SHUTDOWN_GRACE)
            self.state.wait_idle(timeout)
            self.state.close()
            logger = logging.getLogger("deepseek_proxy")
            logger.removeHandler(self.capture)
            logger.setLevel(self.saved_logger[0])
            logger.propagate = self.saved_logger[1]
        return 0


class patched_environ:
    """Set (or, with None, remove) environment variables for the duration of a with block."""

    def __init__(self, values):
        self.values, self.saved = values, {}

    def __enter__(self):
        for name, value in self.values.items():
            self.saved[name] = os.environ.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ProxyProcess(ProxyClient):
    """deepseek_proxy.py in a subprocess, listening on a free port, logging to a file: for the
    command line, signals and restarts only."""

    def __init__(self, upstream, data_dir, args=(), env=None, key=API_KEY):
        self.data_dir = data_dir
        self.log_path = os.path.join(data_dir, "proxy.log")
        environment = dict(os.environ)
        environment.pop("DEEPSEEK_API_KEY", None)
        environment.pop("PROXY_API_KEY", None)
        environment.pop("DEEPSEEK_BASE_URL", None)
        if key:
            environment["DEEPSEEK_API_KEY"] = key
        environment.update(env or {})
        command = PROXY_COMMAND + ["--port", "0",
                   "--upstream", upstream, "--data-dir", data_dir] + TEST_ARGS + list(args)
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log_file,
                                        env=environment, cwd=data_dir)
        line = self.process.stdout.readline().decode()
        if not line.startswith("LISTENING"):
            self.process.kill()
            self.process.wait()
            self.process.stdout.close()
            self.log_file.close()
            raise RuntimeError("proxy did not start: %r\n%s" % (line, self.log()))
        self.port = int(line.rsplit(":", 1)[1])

    def log(self):
        if not self.log_file.closed:
            self.log_file.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self, timeout=10):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.log_file.close()
        return self.process.returncode


class StateStack:
    """The state a test module's ctx() uses; `with stack.configured(NAME=value):` swaps in a state
    built with another configuration for the block (configuration is a value: nothing global moves)."""

    def __init__(self, state):
        self.states = [state]

    @property
    def current(self):
        return self.states[-1]

    def configured(self, **values):
        stack = self

        class Configured:
            def __enter__(self):
                stack.states.append(dp.ProxyState(dp.Config(**values), persist=False, api_key=""))

            def __exit__(self, *exc):
                stack.states.pop()
        return Configured()


def tool_rounds(*outputs, task="go", tool="read"):
    """A conversation: the user's task, then one tool call and its result per output, in order."""
    messages = [{"role": "user", "content": task}]
    for number, output in enumerate(outputs):
        messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c%d" % number, "type": "function", "function": {"name": tool, "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c%d" % number, "content": output}]
    return messages


def chat_body(**extra):
    """A minimal chat request, with any field added or replaced."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello."}]}
    body.update(extra)
    return body


def sse_data(raw):
    """The data payloads of an SSE body: parsed JSON, or the string '[DONE]'."""
    events = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assemble_stream(events):
    """The assistant message a client rebuilds from streamed chunks, and the final usage."""
    message = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": {}}
    usage = finish = None
    for event in events:
        if event == "[DONE]":
            continue
        if "error" in event:
            raise AssertionError("stream error: %s" % event)
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            delta = choice["delta"]
            message["content"] += delta.get("content") or ""
            message["reasoning_content"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or ():
                slot = message["tool_calls"].setdefault(call["index"], {
                    "id": None, "type": "function", "function": {"name": None, "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                slot["function"]["name"] = call.get("function", {}).get("name") or slot["function"]["name"]
                slot["function"]["arguments"] += call.get("function", {}).get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    message["tool_calls"] = [message["tool_calls"][i] for i in sorted(message["tool_calls"])]
    return message, usage, finish


class ProxyTestCase(unittest.TestCase):
    """A fresh fake DeepSeek and proxy per test (setUp), both stopped and cleaned up after."""

    proxy_args = ()

    def setUp(self):
        self.data_dir = tempfile.mkdtemp(prefix="dsproxy-")
        self.addCleanup(shutil.rmtree, self.data_dir, ignore_errors=True)
        self.fake = FakeDeepSeek(API_KEY).start()
        self.addCleanup(self.fake.stop)
        self.proxy = self.start_proxy()

    def start_proxy(self, args=None, process=False, **kwargs):
        """The proxy under test: in this process, or with process=True as a subprocess."""
        kind = ProxyProcess if process else Proxy
        proxy = kind(self.fake.url, self.data_dir, self.proxy_args if args is None else args, **kwargs)
        self.addCleanup(proxy.stop)
        return proxy


def assert_upstream_reasoning_exact(test, fake, at_least=3):
    """Every assistant turn the fake DeepSeek received carries the reasoning it produced for that
    turn (found by the turn's first tool-call id, or its text)."""
    def key(message):
        return message["tool_calls"][0]["id"] if message.get("tool_calls") else (message["content"] or "").strip()
    produced = {key(answer): answer["reasoning_content"] for answer in fake.answers}
    checked = 0
    for request in fake.requests:
        for message in request["messages"]:
            if message["role"] == "assistant":
                test.assertEqual(message.get("reasoning_content"), produced[key(message)])
                checked += 1
    test.assertGreaterEqual(checked, at_least)


def run_in_threads(function, count):
    """Run function(i) in `count` threads at once; re-raise the first failure."""
    errors, results = [], [None] * count

    def run(index):
        try:
            results[index] = function(index)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def raw_exchange(port, payload, read_timeout=5.0):
    """Send raw bytes, return the status line and the rest of what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and b"Content-Length" in b"".join(chunks):
                    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(body) >= length:
                        break
        except socket.timeout:
            pass
    response = b"".join(chunks)
    return response.split(b"\r\n", 1)[0], response
