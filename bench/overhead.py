"""What the proxy adds to a request's latency, measured against a constant-cost upstream.

    python bench/overhead.py [--quick] [--write-docs]

The upstream answers every request with the same canned bytes without parsing it (so a smaller body
forwarded by the proxy cannot make the proxy look faster than it is). The same request is sent
directly to it and through the proxy, in random order, over kept-open client connections; the table
shows the direct time and the median and p95 of the paired differences (proxy - direct), for the
whole answer and for a stream's first byte. The big request (the largest of the Copilot bench session,
~120K tokens, 36 tools) goes through its own proxy instance, so the small ones do not skew its token
calibration. Then the same with a new client connection per request, and the cost of a new upstream
connection when the upstream takes 20 ms to accept one (a stand-in for DeepSeek's TCP+TLS handshake),
which the proxy's kept-open pool saves. Only 127.0.0.1 is contacted.
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
import http.server

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

from helpers import ProxyProcess  # noqa: E402
from report import Report  # noqa: E402
from sessions import SESSIONS  # noqa: E402

KEY = "sk-bench"
CHUNK = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-v4-flash",
         "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}], "usage": None}
FINAL = dict(CHUNK, choices=[{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}],
             usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "prompt_cache_hit_tokens": 0,
                    "prompt_cache_miss_tokens": 10})
STREAM = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in (CHUNK, CHUNK, FINAL)) + b"data: [DONE]\n\n"
WHOLE = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "deepseek-v4-flash",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
                    "usage": FINAL["usage"]}).encode()


class ConstantUpstream(http.server.BaseHTTPRequestHandler):
    """Reads the body, answers canned bytes: no JSON parsing, so its cost is the same for any body."""
    protocol_version = "HTTP/1.1"
    accept_delay = 0.0

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.accept_delay:
            time.sleep(self.accept_delay)

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        stream = b'"stream": true' in body[-300:] or b'"stream":true' in body
        data = STREAM if stream else WHOLE
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if stream else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def start_upstream(accept_delay=0.0):
    handler = type("Handler", (ConstantUpstream,), {"accept_delay": accept_delay})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Client:
    def __init__(self, port, keep_open=True):
        self.port, self.keep_open, self.connection = port, keep_open, None

    def post(self, path, data):
        """(seconds to the whole answer, seconds to the first body byte)."""
        if self.connection is None or not self.keep_open:
            if self.connection:
                self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        started = time.perf_counter()
        self.connection.request("POST", path, data, {"Content-Type": "application/json",
                                                     "Authorization": "Bearer " + KEY})
        response = self.connection.getresponse()
        response.read(1)
        first = time.perf_counter() - started
        response.read()
        return time.perf_counter() - started, first


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def paired(direct, proxied, body, rounds, path=None):
    """Paired (proxy - direct) differences in ms, for the whole answer and the first byte (the
    proxy's route: `path`, chat completions by default)."""
    data = json.dumps(body).encode()
    direct_times, whole, first = [], [], []
    for _ in range(rounds):
        order = [0, 1]
        random.shuffle(order)
        results = {}
        for which in order:
            results[which] = (direct.post("/chat/completions", data) if which == 0
                              else proxied.post(path or "/v1/chat/completions", data))
        direct_times.append(results[0][0] * 1000)
        whole.append((results[1][0] - results[0][0]) * 1000)
        first.append((results[1][1] - results[0][1]) * 1000)
    return direct_times, whole, first


def growing(direct, proxied, targets=(266000, 1000000), measured=10, front="chat"):
    """A conversation as agents send it: each request repeats the last one's history and adds a
    round (a tool call and a 110-line file read). Returns {target size: (whole, first byte) paired
    differences in ms} over the `measured` requests after the body first passes each target. With
    front "anthropic" or "responses", the same conversation in that API's form (Claude Code's, Codex's)."""
    generator = random.Random(7)
    system = "You are a coding agent. Use the tools. " * 40
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "Find and fix the failing test."}]
    tools = [{"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                               "parameters": {"type": "object",
                                                              "properties": {"path": {"type": "string"}}}}}]
    if front == "anthropic":
        messages = messages[1:]
        tools = [{"name": "read_file", "description": "Read a file", "input_schema": tools[0]["function"]["parameters"]}]
    elif front == "responses":
        messages = [{"type": "message", "role": "user", "content": messages[1]["content"]}]
        tools = [dict(tools[0]["function"], type="function")]
    results, number = {}, 0
    for target in targets:
        whole, first = [], []
        while len(whole) < measured:
            number += 1
            call = {"id": "call_%d" % number, "type": "function",
                    "function": {"name": "read_file", "arguments": json.dumps({"path": "src/m%d.py" % number})}}
            lines = ["    value_%d_%d = compute(%d, %r)  # step %d" % (number, i, generator.randint(0, 999),
                                                                      "x" * generator.randint(0, 12), i)
                     for i in range(110)]
            if front == "responses":
                messages = messages + [
                    {"type": "function_call", "call_id": call["id"], "name": "read_file",
                     "arguments": call["function"]["arguments"]},
                    {"type": "function_call_output", "call_id": call["id"], "output": "\n".join(lines)}]
                body = {"model": "gpt-5", "instructions": system, "input": messages, "tools": tools,
                        "store": False, "stream": True}
            elif front == "anthropic":
                messages = messages + [
                    {"role": "assistant", "content": [{"type": "tool_use", "id": call["id"], "name": "read_file",
                                                       "input": {"path": "src/m%d.py" % number}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                                  "content": "\n".join(lines)}]}]
                body = {"model": "claude-sonnet-4-5", "messages": messages, "system": system, "tools": tools,
                        "max_tokens": 32000, "stream": True}
            else:
                messages = messages + [{"role": "assistant", "content": None, "tool_calls": [call]},
                                       {"role": "tool", "tool_call_id": call["id"], "content": "\n".join(lines)}]
                body = {"model": "deepseek-v4-flash", "messages": messages, "tools": tools, "stream": True}
            size = len(json.dumps(body))
            _, added_whole, added_first = paired(direct, proxied, body, 1, {"anthropic": "/v1/messages",
                                                                             "responses": "/v1/responses"}.get(front))
            if size >= target:
                whole += added_whole
                first += added_first
        results[target] = (whole, first)
    return results


def row(report, label, rounds, results, first_byte):
    direct_times, whole, first = results
    added = first if first_byte else whole
    report.line("| %s | %d | %.2f | **%.2f** | %.2f |" % (label, rounds, statistics.median(direct_times),
                                                        statistics.median(added), percentile(added, 0.95)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    small_rounds, big_rounds = (100, 20) if args.quick else (400, 60)
    report = Report("overhead", args.write_docs, "What the proxy adds to a request")
    upstream = start_upstream()
    url = "http://127.0.0.1:%d" % upstream.server_address[1]
    flags = ["--log-level", "WARNING", "--no-persist-stats", "--no-persist-reasoning", "--no-compress-system"]
    small_proxy = ProxyProcess(url, tempfile.mkdtemp(prefix="overhead-"), flags, key=KEY)
    big_proxy = ProxyProcess(url, tempfile.mkdtemp(prefix="overhead-"), flags, key=KEY)
    small = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "Say hello."}]}
    session = SESSIONS["copilot"]()
    biggest = max(session.requests, key=lambda r: len(json.dumps(r["messages"])))
    big = {"model": "deepseek-v4-flash", "messages": biggest["messages"], "tools": biggest["tools"]}
    try:
        report.line("Added by the proxy, ms (median of paired differences, and p95), against a constant-cost "
                    "upstream, kept-open client connections:\n")
        report.line("| request | rounds | direct, median | added, median | added, p95 |")
        report.line("|---|---|---|---|---|")
        direct, proxied = Client(upstream.server_address[1]), Client(small_proxy.port)
        paired(direct, proxied, small, 30)  # warm up
        row(report, "one-line chat, whole answer", small_rounds, paired(direct, proxied, small, small_rounds), False)
        streams = paired(direct, proxied, dict(small, stream=True), small_rounds)
        row(report, "one-line chat, stream: whole", small_rounds, streams, False)
        row(report, "one-line chat, stream: first byte", small_rounds, streams, True)
        proxied_big = Client(big_proxy.port)
        paired(direct, proxied_big, big, 3)  # warm up: the first request of a conversation does all the work
        row(report, "agent request, %dK chars, whole answer" % (len(json.dumps(big)) // 1000), big_rounds,
            paired(direct, proxied_big, big, big_rounds), False)
        streams = paired(direct, proxied_big, dict(big, stream=True), big_rounds)
        row(report, "agent request, stream: first byte", big_rounds, streams, True)
        growing_proxy = ProxyProcess(url, tempfile.mkdtemp(prefix="overhead-"), flags + ["--max-context", "100000000"],
                                     key=KEY)
        grown = {}
        try:
            grown[""] = growing(direct, Client(growing_proxy.port), measured=5 if args.quick else 20)
            for front, label in (("anthropic", ", Anthropic Messages front"), ("responses", ", Responses front")):
                front_proxy = ProxyProcess(url, tempfile.mkdtemp(prefix="overhead-"),
                                           flags + ["--max-context", "100000000"], key=KEY)
                try:
                    grown[label] = growing(direct, Client(front_proxy.port), targets=(1000000,),
                                           measured=5 if args.quick else 20, front=front)
                finally:
                    front_proxy.stop()
        finally:
            growing_proxy.stop()
        for label, results in grown.items():
            for target, (whole, first) in results.items():
                report.line("| growing conversation at %dK chars (a round per request)%s, stream: whole | %d | - | "
                            "**%.2f** | %.2f |" % (target // 1000, label, len(whole), statistics.median(whole),
                                                   percentile(whole, 0.95)))
        fresh = paired(Client(upstream.server_address[1], False), Client(small_proxy.port, False), small, small_rounds // 2)
        row(report, "one-line chat, new client connection each time", small_rounds // 2, fresh, False)
        # What the kept-open pool saves when opening a connection costs a handshake
        slow = start_upstream(accept_delay=0.02)
        slow_url = "http://127.0.0.1:%d" % slow.server_address[1]
        pooled = ProxyProcess(slow_url, tempfile.mkdtemp(prefix="overhead-"), flags, key=KEY)
        unpooled = ProxyProcess(slow_url, tempfile.mkdtemp(prefix="overhead-"), flags + ["--upstream-pool-size", "0"],
                                key=KEY)
        try:
            data = json.dumps(small).encode()
            times = {}
            for name, proxy in (("pool (default)", pooled), ("no pool (--upstream-pool-size 0)", unpooled)):
                client = Client(proxy.port)
                client.post("/v1/chat/completions", data)
                times[name] = [client.post("/v1/chat/completions", data)[0] * 1000 for _ in range(40)]
            report.line("\nWith an upstream that takes 20 ms to accept a connection (DeepSeek's TCP+TLS handshake "
                        "costs 20-300 ms), one-line chat through the proxy, ms:\n")
            report.line("| upstream connections | median | p95 |")
            report.line("|---|---|---|")
            for name, values in times.items():
                report.line("| %s | %.2f | %.2f |" % (name, statistics.median(values), percentile(values, 0.95)))
        finally:
            pooled.stop()
            unpooled.stop()
            slow.shutdown()
        report.line("\nGoals: <= 5 ms added to the agent request (whole answer and first byte), <= 1 ms to a "
                    "one-line chat; a growing conversation <= 5 ms at 266K chars and <= 10 ms at 1M. For reference, LiteLLM's proxy publishes 12 ms median / 29 ms p95 added "
                    "(docs.litellm.ai, Benchmarks) and measured 19-34 ms on these same requests.")
    finally:
        small_proxy.stop()
        big_proxy.stop()
        upstream.shutdown()
    report.save()


if __name__ == "__main__":
    main()
