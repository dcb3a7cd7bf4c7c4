"""Every request of every bench session and every recorded client, rebuilt from what the proxy sent.

    python bench/fidelity.py [--write-docs]

Each request goes through the pipeline (defaults, budget raised so that nothing is summarised: below
the budget every rewrite must be undone exactly), then is rebuilt two ways: by the proxy's own
rebuild() (what `--verify-dumps` runs on your dumps) and by tests/independent_decoder.py, written from
docs/design.md alone. Counted: requests rebuilt exactly by each, and notes of each kind sent.
Excluded by design and said so: Aider's chat-files block (its per-file delta is not a byte-exact
notation: the stage is off here), system-prompt and conversation summaries (off here).
"""

import argparse
import collections
import copy
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

import replay_traffic  # noqa: E402
from replay import proxy  # noqa: E402
from report import Report  # noqa: E402
from sessions import SESSIONS  # noqa: E402
from independent_decoder import decode  # noqa: E402

SETTINGS = dict(MAX_CONTEXT=100000000, KEEP_EPHEMERAL=False)
NOTES = (("repeat", re.compile(r"\[Repeat of ")), ("change", re.compile(r"\[Changed copy of ")))


def check(requests):
    """(requests, exact by rebuild(), exact by the independent decoder, Counter of notes)."""
    state = proxy.ProxyState(proxy.Config(**SETTINGS), persist=False, api_key="bench")
    total = by_rebuild = by_decoder = 0
    notes = collections.Counter()
    for request in requests:
        prepared = proxy.prepare({"model": "x", "messages": copy.deepcopy(request["messages"]),
                                  "tools": request["tools"]}, state)
        expected = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in prepared.ctx.normalised]
        sent = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in prepared.upstream_body["messages"]]
        total += 1
        try:
            by_rebuild += proxy.rebuild(sent) == expected
        except ValueError:
            pass
        try:
            by_decoder += decode(sent) == expected
        except (ValueError, IndexError):
            pass
        text = "\n".join(proxy.content_text(m.get("content")) for m in sent)
        for kind, pattern in NOTES:
            notes[kind] += len(pattern.findall(text))
        collector = proxy.AnswerCollector()
        collector.feed_response({"choices": [{"message": request["answer"], "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        proxy.settle(prepared, collector)
    return total, by_rebuild, by_decoder, notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    proxy.log.disabled = True
    report = Report("fidelity", args.write_docs, "Every request rebuilt from what was sent")
    report.columns("session", "requests", "exact by rebuild()", "exact by the independent decoder", "repeat notes",
                   "change notes")
    sources = [(name, lambda name=name: SESSIONS[name]().requests) for name in SESSIONS]
    sources += [("recorded: " + name, lambda name=name: replay_traffic.Session(name).requests)
                for name in replay_traffic.recorded_clients()]
    for label, requests in sources:
        total, by_rebuild, by_decoder, notes = check(requests())
        report.line("| %s | %d | %d | %d | %d | %d |" % (label, total, by_rebuild, by_decoder, notes["repeat"],
                                                        notes["change"]))
    report.line("\nThe Aider stage (keep_ephemeral_blocks) is off here: its chat-files delta is not a byte-exact "
                "notation, and rebuild() says so of the requests it rewrote.")
    report.save()


if __name__ == "__main__":
    main()
