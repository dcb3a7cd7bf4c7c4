"""First-byte latency of the requests that cross the summary budget, with and without the
background watermark.

    python bench/summary_latency.py        # ~1 minute

Replays the long Copilot bench session (144 requests) through the real proxy against the fake
DeepSeek, streaming, with default settings but tool-output deduplication off (so that the session
crosses the 102K-token budget more than once): the fake answers in MODEL_SECONDS and writes a conversation
summary in SUMMARY_SECONDS (stand-ins for DeepSeek's generation times, scaled down about 30 times,
keeping a summary about three agent steps long). Only 127.0.0.1 is contacted.
"""

import http.client
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from helpers import API_KEY, FakeDeepSeek, Proxy  # noqa: E402
from report import Report  # noqa: E402
from sessions import SESSIONS, scripted_responder  # noqa: E402

MODEL_SECONDS = 0.3
SUMMARY_SECONDS = 1.0
ARGS = ["--no-compress-system", "--no-dedup-tool-outputs", "--log-level", "INFO"]  # so that it crosses


def run(watermark):
    fake = FakeDeepSeek(API_KEY).start()
    fake.record = False
    fake.summary_delay = SUMMARY_SECONDS
    session = SESSIONS["copilot-long"]()
    fake.responder = scripted_responder(session, MODEL_SECONDS)
    proxy = Proxy(fake.url, tempfile.mkdtemp(prefix="latency-"), ARGS + ["--summary-watermark", str(watermark)])
    first_bytes = []
    try:
        for request in session.requests:
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
            started = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", json.dumps(
                {"model": "x", "messages": request["messages"], "tools": request["tools"], "stream": True}),
                {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read(1)
            first_bytes.append(time.perf_counter() - started)
            response.read()
            connection.close()
        log = proxy.log()
    finally:
        proxy.stop()
        fake.stop()
    slow = [seconds for seconds in first_bytes if seconds > MODEL_SECONDS + SUMMARY_SECONDS / 2]
    return first_bytes, slow, log.count("summarised") + log.count("started in the background")


def main():
    report = Report("summary-latency", "--write-docs" in sys.argv, "Waiting for conversation summaries")
    report.line("| watermark | requests | median first byte s | max first byte s | requests that waited for a summary |")
    report.line("|---|---|---|---|---|")
    for watermark in (0, 0.7):
        first_bytes, slow, _ = run(watermark)
        report.line("| %s | %d | %.2f | %.2f | %d |" % (
            "off (summary made by the crossing request)" if not watermark else "%.1f (summary made in the background)"
            % watermark, len(first_bytes), statistics.median(first_bytes), max(first_bytes), len(slow)))
    report.line("\nModel answer %.1f s, summary call %.1f s (fake DeepSeek), default budget." % (
        MODEL_SECONDS, SUMMARY_SECONDS))
    report.save()


if __name__ == "__main__":
    main()
