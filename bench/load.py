"""Load: many concurrent streaming agent sessions with tool loops, for a while, through the proxy.

    python bench/load.py                       # 64 sessions for 60 s
    python bench/load.py --sessions 16 --seconds 10

Each session is an agent that streams, gets tool calls (two in parallel in its first round), answers
them and goes on, never sending reasoning_content back; the fake DeepSeek enforces the thinking-mode
rule, so a lost or crossed reasoning_content fails the run. Reports requests, errors, cross-talk,
requests per second, latency, and the proxy's resident memory and thread count before and after.
Only 127.0.0.1 is contacted.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from report import Report  # noqa: E402
from helpers import API_KEY, FakeDeepSeek, ProxyProcess, assemble_stream, sse_data  # noqa: E402
from fake_deepseek import Answer  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}}}}]


def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return line.split()[1]
    return "?"


def responder(body, number):
    """Tool calls for five rounds, then an answer; every reasoning names its session."""
    session = body["messages"][0]["content"]
    rounds = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if rounds < 5:
        calls = [("read_file", {"path": "%s/f%d" % (session, rounds)})]
        if rounds == 0:
            calls.append(("read_file", {"path": "%s/g" % session}))
        return Answer(reasoning="%s thinks %d" % (session, rounds), tool_calls=calls)
    return Answer(content="%s done" % session, reasoning="%s done" % session)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--write-docs", action="store_true", help="also write the table into docs/benchmarks.md")
    args = parser.parse_args()
    fake = FakeDeepSeek(API_KEY).start()
    fake.record = False
    fake.responder = responder
    fake.chunk_delay = 0.002
    proxy = ProxyProcess(fake.url, tempfile.mkdtemp(prefix="load-"), ["--log-level", "WARNING", "--no-persist-stats", "--max-connections", "256"])
    latencies, errors, crossed, stop = [], [], [0], time.monotonic() + args.seconds
    lock = threading.Lock()

    def agent(index):
        conversation = 0
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        while time.monotonic() < stop:
            conversation += 1
            session = "s%d-c%d" % (index, conversation)
            messages = [{"role": "system", "content": session}, {"role": "user", "content": "Read everything."}]
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    connection.request("POST", "/v1/chat/completions", json.dumps(
                        {"model": "x", "messages": messages, "tools": TOOLS, "stream": True}),
                        {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    raw = response.read()
                    if response.status != 200:
                        raise RuntimeError("status %d: %s" % (response.status, raw[:200]))
                    message, _, _ = assemble_stream(sse_data(raw))
                except Exception as error:  # counted; the agent starts a new conversation
                    with lock:
                        errors.append(repr(error)[:200])
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
                    break
                with lock:
                    latencies.append(time.perf_counter() - started)
                if not message["tool_calls"]:
                    if message["content"] != session + " done":
                        with lock:
                            crossed[0] += 1
                    break
                messages.append({"role": "assistant", "content": message["content"],
                                 "tool_calls": message["tool_calls"]})
                for call in message["tool_calls"]:
                    if not json.loads(call["function"]["arguments"])["path"].startswith(session + "/"):
                        with lock:
                            crossed[0] += 1
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": "contents " * 50})
        connection.close()

    pid = proxy.process.pid
    before = (proc_status(pid, "VmRSS"), proc_status(pid, "Threads"))
    started = time.monotonic()
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(args.sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    time.sleep(1.0)
    after = (proc_status(pid, "VmRSS"), proc_status(pid, "Threads"))
    stats = json.loads(proxy.request("GET", "/stats")[2])
    proxy.stop()
    fake.stop()
    report = Report("load", args.write_docs, "Load: concurrent streaming agent sessions")
    report.line("| sessions | seconds | requests | errors | cross-talk | req/s | median ms | p99 ms "
          "| proxy RSS before -> after (kB) | threads before -> after | reasoning cache entries |")
    report.line("|---|---|---|---|---|---|---|---|---|---|---|")
    ordered = sorted(latencies)
    report.line("| %d | %.0f | %d | %d | %d | %.0f | %.1f | %.1f | %s -> %s | %s -> %s | %d |" % (
        args.sessions, elapsed, len(latencies), len(errors), crossed[0], len(latencies) / elapsed,
        1000 * statistics.median(ordered), 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        before[0], after[0], before[1], after[1], stats["reasoning"]["cache_entries"]))
    for error in errors[:5]:
        report.line("error: %s" % error)
    report.save()


if __name__ == "__main__":
    main()
