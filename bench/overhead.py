"""What the proxy adds: latency, time to first byte, throughput, against the same fake DeepSeek.

    python bench/overhead.py            # about a minute on 2 cores
    python bench/overhead.py --quick    # fewer rounds

The fake DeepSeek (tests/fake_deepseek.py) runs in its own process, the proxy in another, and this
process sends the same requests directly to the fake and through the proxy, alternating, over
keep-alive connections. Reported per kind of request: median, p95 and p99 of each path and of the
difference (the proxy's overhead), plus requests per second at 1, 8 and 64 concurrent clients.
Only 127.0.0.1 is contacted.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import deepseek_proxy as proxy_module  # noqa: E402
from helpers import API_KEY, ProxyProcess  # noqa: E402
from report import Report  # noqa: E402
from sessions import SESSIONS  # noqa: E402

FAKE = ("import sys, time; sys.path.insert(0, %r); from fake_deepseek import FakeDeepSeek; "
        "f = FakeDeepSeek(%r); f.start(); f.record = False; print(f.url, flush=True); time.sleep(10 ** 6)")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class Client:
    """One keep-alive connection per target and thread."""

    def __init__(self, port):
        self.port = port
        self.local = threading.local()

    def connection(self):
        if getattr(self.local, "connection", None) is None:
            self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        return self.local.connection

    def post(self, body, key):
        """Seconds to the whole response, seconds to the first body byte."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        started = time.perf_counter()
        try:
            connection = self.connection()
            connection.request("POST", "/v1/chat/completions", data,
                               {"Content-Type": "application/json", "Authorization": "Bearer " + key})
            response = connection.getresponse()
            first = response.read(1)
            first_byte = time.perf_counter() - started
            rest = response.read()
        except (OSError, http.client.HTTPException):
            self.local.connection = None
            raise
        if response.status != 200:
            raise RuntimeError("status %d: %s" % (response.status, (first + rest)[:300]))
        if response.getheader("Connection", "").lower() == "close":
            self.local.connection = None
        return time.perf_counter() - started, first_byte


def compare(direct, proxied, direct_body, proxied_body, rounds):
    """Alternate direct and proxied requests; returns per-path lists of (total, first byte)."""
    results = {"direct": [], "proxy": []}
    for index in range(rounds):
        order = (("direct", direct, direct_body), ("proxy", proxied, proxied_body))
        for name, client, body in (order if index % 2 == 0 else order[::-1]):
            key = API_KEY if name == "direct" else "client"
            results[name].append(client.post(body, key))
    return results


def row(label, results, which):
    direct = [r[which] * 1000 for r in results["direct"]]
    proxied = [r[which] * 1000 for r in results["proxy"]]
    added = [p - d for d, p in zip(direct, proxied)]
    return "| %s | %d | %.2f / %.2f / %.2f | %.2f / %.2f / %.2f | **%.2f / %.2f / %.2f** |" % (
        label, len(direct), statistics.median(direct), percentile(direct, 0.95), percentile(direct, 0.99),
        statistics.median(proxied), percentile(proxied, 0.95), percentile(proxied, 0.99),
        statistics.median(added), percentile(added, 0.95), percentile(added, 0.99))


def throughput(client, body, key, concurrency, seconds):
    done, errors, stop = [0], [0], time.monotonic() + seconds
    lock = threading.Lock()

    def worker():
        while time.monotonic() < stop:
            try:
                client.post(body, key)
                with lock:
                    done[0] += 1
            except Exception:  # counted, the run goes on
                with lock:
                    errors[0] += 1
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.monotonic() - started), errors[0]


def agent_request():
    """The largest request of the Copilot bench session (~120K tokens), as a client sends it."""
    request = max(SESSIONS["copilot"]().requests, key=lambda r: len(json.dumps(r["messages"])))
    return {"model": "deepseek-v4-flash", "messages": request["messages"], "tools": request["tools"]}


def direct_form(body):
    """What DeepSeek must get for the same request without the proxy: valid in thinking mode."""
    messages = [dict(m, reasoning_content="") if m["role"] == "assistant" else m for m in body["messages"]]
    return dict(body, messages=messages)


def pipeline_time(body, rounds):
    proxy_module.log.disabled = True
    proxy_module.configure({"COMPRESS_SYSTEM": False})  # no summary call from this process
    state = proxy_module.ProxyState(tempfile.mkdtemp(prefix="overhead-"), api_key="bench", persist=False)
    times = []
    for _ in range(rounds):
        raw = json.dumps(body).encode()
        started = time.perf_counter()
        prepared = proxy_module.prepare(json.loads(raw), state)
        proxy_module.encode_json(prepared.upstream_body)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), percentile(times, 0.95)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="also write the tables into docs/benchmarks.md")
    args = parser.parse_args()
    report = Report("overhead", args.write_docs, "What the proxy adds to a request")
    rounds_small, rounds_big, seconds = (60, 8, 1.5) if args.quick else (300, 30, 4.0)
    fake_process = subprocess.Popen([sys.executable, "-c", FAKE % (os.path.join(ROOT, "tests"), API_KEY)],
                                    stdout=subprocess.PIPE)
    fake_url = fake_process.stdout.readline().decode().strip()
    data_dir = tempfile.mkdtemp(prefix="overhead-")
    proxy = ProxyProcess(fake_url, data_dir, ["--log-level", "WARNING", "--no-persist-stats", "--max-connections", "256"])
    try:
        direct = Client(int(fake_url.rsplit(":", 1)[1]))
        proxied = Client(proxy.port)
        small = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "Say hello."}]}
        small_stream = dict(small, stream=True)
        agent = agent_request()
        agent_bytes = json.dumps(agent).encode()
        direct_agent = json.dumps(direct_form(agent)).encode()
        compare(direct, proxied, small, small, 20)  # warm up both paths
        report.line("Proxy overhead on this machine (%d cores), ms: median / p95 / p99\n" % os.cpu_count())
        report.line("| request | n | direct | through the proxy | added by the proxy |")
        report.line("|---|---|---|---|---|")
        report.line(row("small, non-streaming", compare(direct, proxied, small, small, rounds_small), 0))
        streams = compare(direct, proxied, small_stream, small_stream, rounds_small)
        report.line(row("small, streaming: whole stream", streams, 0))
        report.line(row("small, streaming: first byte", streams, 1))
        agent_results = compare(direct, proxied, direct_agent, agent_bytes, rounds_big)
        report.line(row("agent request, %dK chars, non-streaming" % (len(agent_bytes) // 1000), agent_results, 0))
        median, p95 = pipeline_time(agent, rounds_big)
        report.line("\nThe proxy's own work on the agent request (parse, pipeline, estimates, re-serialise), "
              "in-process: median %.1f ms, p95 %.1f ms." % (median, p95))
        report.line("The agent request through the proxy reaches DeepSeek smaller: the pipeline's deduplication "
              "removes repeated tool output before it is sent, which the 'direct' path carries in full.\n")
        report.line("| concurrent clients | direct req/s | through the proxy req/s | errors |")
        report.line("|---|---|---|---|")
        for concurrency in (1, 8, 64):
            direct_rps, direct_errors = throughput(direct, small, API_KEY, concurrency, seconds)
            proxy_rps, proxy_errors = throughput(proxied, small, "client", concurrency, seconds)
            report.line("| %d | %.0f | %.0f | %d |" % (concurrency, direct_rps, proxy_rps, direct_errors + proxy_errors))
    finally:
        proxy.stop()
        fake_process.kill()
    report.save()


if __name__ == "__main__":
    main()
