"""Near-duplicate content per client shape: what a direct client sends again, and what is left after
the proxy, billed under the fake's prefix cache.

    python bench/near_duplicates.py [--write-docs]

Sessions (bench/sessions.py): an agent fixing code in the shape of Copilot, Cline (native tools and
XML mode) and Continue, reading files whole and in overlapping ranges, editing and re-reading them,
re-running tests whose output changes a little; and the Aider session. For each: the direct client
(no compression, only what makes requests valid), the proxy's defaults without the near-duplicate
stage, and the defaults. "repeated-line chars" counts, over all requests, the characters of lines of
20+ characters in tool and user messages that the same request already carried; "left" is that
figure as a share of the direct client's.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import replay  # noqa: E402
from report import Report  # noqa: E402

SESSION_NAMES = ("copilot-rereads", "cline-rereads", "cline-xml-rereads", "continue-rereads", "aider")
CONFIGS = (("direct", replay.OFF), ("defaults, no near-duplicates", {"NEAR_DUPLICATES": False}), ("defaults", {}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", default=",".join(SESSION_NAMES))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    replay.proxy.log.disabled = True
    report = Report("near-duplicates", args.write_docs, "Near-duplicate content per client shape")
    report.line("| session | configuration | requests | characters sent | repeated-line chars | left | cache hit "
                "| billed $ | vs direct |")
    report.line("|---|---|---|---|---|---|---|---|---|")
    for name, label, totals, direct in replay.compare(args.sessions.split(","), CONFIGS):
        report.line("| %s | %s | %d | %d | %d | %.1f%% | %.1f%% | %.4f | %+.1f%% |" % (
            name, label, totals["requests"], totals["chars"], totals["repeated_chars"],
            100.0 * totals["repeated_chars"] / max(1, direct["repeated_chars"]),
            100.0 * totals["hit"] / max(1, totals["prompt"]), totals["total"],
            100.0 * (totals["total"] - direct["total"]) / direct["total"]))
    report.save()


if __name__ == "__main__":
    main()
