"""Mutation score: plant plausible one-line bugs in deepseek_proxy.py, one at a time, and count how
many the test suite catches (a mutant is killed when the suite fails).

    python bench/mutate.py [--rev REV] [--only N,N]

Each mutant is a regular expression and its replacement; it runs in a temporary copy of the
repository at REV (default: the working tree), so the tree you work in is never touched. A mutant
whose pattern does not occur at REV is reported as n/a. The areas are the ones an outside mutation
pass found weakly tested: per-front stream contracts, the browser checks on every route, SSE
framing, size limits, hunk headers, abbreviated removed runs, the Aider stage's budget guard,
anchors restored by the window fallback; plus key redaction, loopback names, the answer bound and
file ownership. Not part of CI (it runs the whole suite once per mutant: minutes).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MUTANTS = [
    ("Anthropic stream: no signature on the streamed thinking block",
     r'"type": "signature_delta", "signature": seal\(self\.state, "".join\(self\.reasoning\)\)',
     '"type": "signature_delta", "signature": ""'),
    ("Responses stream: a cut answer reported as completed",
     r'else "response\.incomplete"', 'else "response.completed"'),
    ("Content-Type check skips explain",
     r'\+ RESPONSES_PATHS \+ EXPLAIN_PATHS  # take JSON', '+ RESPONSES_PATHS  # take JSON'),
    ("SSE: `data:` needs a space",
     r'(\n\s+data = )line\[5:\]\.strip\(\)(\n\s+if data == b"\[DONE\]":\n\s+collector\.done = ended)',
     r'\1line[6:].strip()\2'),
    ("per-event size limit doubled",
     r'if size > (config\.)?MAX_UPSTREAM_EVENT_BYTES:', r'if size > 2 * \1MAX_UPSTREAM_EVENT_BYTES:'),
    ("hunk header: + side of a pure deletion",
     r'j1 \+ 1 if j2 > j1 else j1, j2 - j1\)\)', 'j1 + 1, j2 - j1))'),
    ("abbreviated removed run miscounted",
     r'out\.append\("-\[%d lines\]" % \(i2 - i1\)\)', 'out.append("-[%d lines]" % (i2 - i1 - 1))'),
    ("Aider stage's budget guard off",
     r'(SUMMARY_RATIO\) \* (ctx\.config\.)?MAX_CONTEXT:\n        return messages  # near the budget)',
     r'SUMMARY_RATIO) * 100 * \2MAX_CONTEXT:\n        return messages  # near the budget'),
    ("window fallback forgets cut anchors",
     r'(dropped %d oldest turns" % len\(dropped\)\)[\s\S]{0,300}?)return restore_cut_anchors\(messages, kept, ctx\)',
     r'\1return [messages[index] for index in kept]'),
    ("the key is not redacted from upstream text",
     r'text = text\.replace\(api_key, "\[redacted\]"\)', 'text = text'),
    ("names starting with 127. count as loopback",
     r'return ipaddress\.ip_address\(host\)\.is_loopback', 'return ipaddress.ip_address(host).is_loopback '
                                                             'if not host.startswith("127.") else True'),
    ("a streamed answer is not bounded",
     r'if total > (config\.)?MAX_ANSWER_BYTES:', r'if total > 1000 * \1MAX_ANSWER_BYTES:'),
    ("another user's file is read",
     r'\n        if own:\n            check_own_file\(handle\.fileno\(\), path\)', '\n        pass'),
    ("a resumed parse takes the members before the history from the last body, not as parsed there",
     r'body\.update\(old\.head\)', 'body.update({k: v for k, v in old.body.items() if k != old.key})'),
    ("a Responses turn left open shares its tool-call list with the live turn",
     r'copy\["tool_calls"\] = list\(copy\["tool_calls"\]\)', 'pass'),
    ("an idle kept-open connection keeps its last body",
     r'self\.reserved, self\.layout = 0, None', 'self.reserved = 0'),
    ("a kept body is weighed by its bytes only",
     r'return self\.WEIGHT \* len\(layout\.raw\) \+ self\.PER_ITEM \* len\(layout\.ends\)',
     'return self.WEIGHT * len(layout.raw)'),
]


def copy_tree(rev, target):
    if rev:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    else:
        shutil.copytree(ROOT, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "pre_msg", "post_msg", "pre_sys", "post_sys", "trial", "results"))


def run_suite(tree, timeout):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "unittest", "discover", "-s", "tests", "-f"], cwd=tree,
                            capture_output=True, text=True, timeout=timeout)
    return result.returncode, time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="", help="git revision to test (default: the working tree)")
    parser.add_argument("--only", default="", help="comma-separated mutant numbers (1-based)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    chosen = {int(n) for n in args.only.split(",") if n} or set(range(1, len(MUTANTS) + 1))
    killed = applicable = 0
    baseline = tempfile.mkdtemp(prefix="mutant-")
    try:
        copy_tree(args.rev, baseline)
        code, seconds = run_suite(baseline, args.timeout)
    finally:
        shutil.rmtree(baseline, ignore_errors=True)
    if code:
        print("the unmutated suite fails at this revision; no score")
        return 1
    print("unmutated suite passes (%.0f s)\n" % seconds)
    print("| # | mutant | result |\n|---|---|---|")
    for number, (name, pattern, replacement) in enumerate(MUTANTS, 1):
        if number not in chosen:
            continue
        tree = tempfile.mkdtemp(prefix="mutant-")
        try:
            copy_tree(args.rev, tree)
            path = os.path.join(tree, "deepseek_proxy.py")
            with open(path, encoding="utf-8") as handle:
                source = handle.read()
            mutated, count = re.subn(pattern, replacement, source, count=1)
            if not count:
                print("| %d | %s | n/a (not in this revision) |" % (number, name), flush=True)
                continue
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(mutated)
            applicable += 1
            code, seconds = run_suite(tree, args.timeout)
            killed += code != 0
            print("| %d | %s | %s (%.0f s) |" % (number, name, "killed" if code else "SURVIVED", seconds), flush=True)
        finally:
            shutil.rmtree(tree, ignore_errors=True)
    print("\nscore: %d of %d applicable mutants killed" % (killed, applicable))


if __name__ == "__main__":
    sys.exit(main())
