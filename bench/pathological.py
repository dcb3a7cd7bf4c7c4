"""How long the pipeline takes on the megabyte inputs built to make a stage quadratic.

    python bench/pathological.py [--write-docs]

The inputs are the test suite's own (tests/test_security.py PATHOLOGICAL: ~1 MB texts of unclosed
tags, fences, blank-line runs, CJK, nested and closed boilerplate blocks, sent three times in one
request; tests/test_attacks.py: pairs of ~1 MB blocks built against the near-duplicate diff). The
suite only fails a stage that takes over 10 s on one of them (a quadratic one takes minutes), so that
a slow or loaded machine cannot fail it; the speed itself is measured here: the median of 3 runs of
`prepare()` in a fresh state each, in this process.
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import deepseek_proxy as dp  # noqa: E402
from helpers import tool_rounds  # noqa: E402
from report import Report  # noqa: E402
from test_attacks import QuadraticDiff  # noqa: E402
from test_security import PATHOLOGICAL  # noqa: E402

GOAL = 1.0  # seconds, per request


def timed(messages, settings):
    runs = []
    for _ in range(3):
        state = dp.ProxyState(dp.Config(**settings), persist=False, api_key="bench")
        started = time.perf_counter()
        dp.prepare({"model": "x", "messages": messages}, state)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    dp.log.disabled = True
    report = Report("pathological", args.write_docs, "Megabyte inputs built against the stages")
    report.columns("input", "characters", "prepare() s (median of 3)", "goal %.1f s" % GOAL)
    settings = dict(MIN_SEGMENT_CHARS=100, MARKDOWN_DEDUP="auto", MAX_CONTEXT=100000000)
    for name, text in PATHOLOGICAL.items():
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": text},
                    {"role": "assistant", "content": text}, {"role": "user", "content": text}]
        seconds = timed(messages, settings)
        report.line("| %s (x3) | %d | %.3f | %s |" % (name, 3 * len(text), seconds, "met" if seconds < GOAL else "MISSED"))
    for name, first, second in QuadraticDiff.adversarial_pairs(None):
        seconds = timed(tool_rounds(first, second), dict(MAX_CONTEXT=100000000))
        report.line("| diff: %s | %d | %.3f | %s |" % (name, len(first) + len(second), seconds,
                                                        "met" if seconds < GOAL else "MISSED"))
    report.save()


if __name__ == "__main__":
    main()
