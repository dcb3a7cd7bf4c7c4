"""Faithful by construction (issue 22): below the budget every rewrite is read back by rebuild() into
exactly what the client sent, on generated conversations of every client shape and on the bench
sessions; blank lines and whitespace inside content survive; hunk headers are unified-diff exact."""

import copy
import json
import os
import subprocess
import sys
import unittest

from helpers import PROXY_COMMAND, ROOT, ProxyTestCase
import deepseek_proxy as dp
from independent_decoder import decode
from test_dedup import generated_conversation

sys.path.insert(0, os.path.join(ROOT, "bench"))
from sessions import SESSIONS  # noqa: E402

FIDELITY = dict(MAX_CONTEXT=100000000, COMPRESS_SYSTEM=False, KEEP_EPHEMERAL=False, THINKING_MODE="disabled",
                MIN_NEAR_DUP_CHARS=100)


def client_view(messages):
    """The messages as the pipeline received them, normalised (what rebuild() must give back)."""
    return [{key: value for key, value in message.items() if key != "reasoning_content"} for message in messages]


def sent_and_expected(body, state):
    prepared = dp.prepare(copy.deepcopy(body), state)
    sent = prepared.upstream_body["messages"]
    return client_view(sent), client_view(prepared.ctx.normalised)


class EveryRequestRebuildsExactly(unittest.TestCase):
    def test_generated_conversations(self):
        for markdown in ("first", "latest"):
            state = dp.ProxyState(dp.Config(MARKDOWN_DEDUP=markdown, **FIDELITY), persist=False, api_key="")
            for seed in range(12):
                messages = generated_conversation(seed, length=30)
                for cut in range(2, len(messages) + 1, 3):
                    sent, expected = sent_and_expected({"model": "x", "messages": messages[:cut]}, state)
                    self.assertEqual(dp.rebuild(sent, state.config), expected, "seed %d, cut %d" % (seed, cut))
                    self.assertEqual(decode(sent), expected, "independent decoder: seed %d, cut %d" % (seed, cut))
                self.assertNotEqual(sent, expected, "the stages did rewrite something")

    def test_bench_sessions(self):
        state = dp.ProxyState(dp.Config(**FIDELITY), persist=False, api_key="")
        checked = 0
        for name in ("copilot", "cline", "cline-xml-rereads", "copilot-rereads", "continue-rereads"):
            session = SESSIONS[name]()
            for request in session.requests[::9]:
                sent, expected = sent_and_expected({"model": "x", "messages": request["messages"],
                                                   "tools": request["tools"]}, state)
                self.assertEqual(dp.rebuild(sent, state.config), expected, name)
                self.assertEqual(decode(sent), expected, "independent decoder: " + name)
                checked += 1
        self.assertGreater(checked, 15)


class WhitespaceSurvives(unittest.TestCase):
    def test_blank_lines_inside_content_are_kept(self):
        state = dp.ProxyState(dp.Config(**FIDELITY), persist=False, api_key="")
        reminder = "<reminderInstructions>\nAlways run the tests.\n</reminderInstructions>"
        code = "X = 3600\n\n\n@dataclass\nclass Job:\n    pass\n\n\n\n"
        messages = [{"role": "user", "content": reminder + "\n" + code},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "again:\n\n\n" + reminder + "\n\n\n" + code}]
        sent, expected = sent_and_expected({"model": "x", "messages": messages}, state)
        self.assertIn("[Repeat of the <reminderInstructions> block 2 messages above, unchanged.]", sent[2]["content"])
        self.assertIn("X = 3600\n\n\n@dataclass", sent[2]["content"])
        self.assertTrue(sent[2]["content"].startswith("again:\n\n\n"))
        self.assertEqual(dp.rebuild(sent, state.config), expected)

    def test_a_changed_block_is_a_positional_delta_that_rebuilds(self):
        state = dp.ProxyState(dp.Config(**FIDELITY), persist=False, api_key="")
        listing = ["src/module_%d.py" % number for number in range(37)]
        first = "<environment_details>\n# Time\n10:00\n# Files\n" + "\n".join(listing) + "\n</environment_details>"
        second = first.replace("10:00", "10:05").replace("src/module_7.py\n", "")
        messages = [{"role": "user", "content": "go\n" + first}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "next\n" + second}]
        sent, expected = sent_and_expected({"model": "x", "messages": messages}, state)
        self.assertIn("[Changed copy of the <environment_details> block 2 messages above; its changes follow, ",
                      sent[2]["content"])
        self.assertIn("-src/module_7.py", sent[2]["content"], "a removed line is marked")
        self.assertEqual(dp.rebuild(sent, state.config), expected)


class Notation(unittest.TestCase):
    def test_hunks_apply_as_unified_diff(self):
        old = ["a", "b", "c", "d"]
        for new in (["a", "x", "b", "c", "d"], ["a", "d"], ["b", "c", "d", "e"], [], ["z"], old):
            delta = dp.line_delta(old, new)
            self.assertEqual(dp.apply_delta(old, delta.split("\n") if delta else []), new)
        long_old = ["line %d" % n for n in range(20)]
        delta = dp.line_delta(long_old, long_old[:3] + long_old[15:])
        self.assertIn("-[12 lines]", delta)
        self.assertEqual(dp.apply_delta(long_old, delta.split("\n")), long_old[:3] + long_old[15:])


class VerifyDumps(ProxyTestCase):
    proxy_args = ("--save-prepost-msgs", "--max-context", "100000000", "--no-compress-system")

    def test_every_dump_pair_is_reported_exact(self):
        session = SESSIONS["cline"]()
        for request in session.requests[:12]:
            self.assertEqual(self.proxy.chat({"model": "x", "messages": request["messages"],
                                              "tools": request["tools"]})[0], 200)
        self.proxy.state.flush()
        result = subprocess.run(PROXY_COMMAND + ["--verify-dumps",
                                 self.data_dir], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("12 of 12 requests rebuilt exactly", result.stdout)
        dumps = sorted(os.listdir(os.path.join(self.data_dir, "post_msg")))
        shown = subprocess.run(PROXY_COMMAND + ["--rebuild",
                                os.path.join(self.data_dir, "post_msg", dumps[-1])],
                               capture_output=True, text=True, timeout=60)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertEqual(len(json.loads(shown.stdout)["messages"]), len(session.requests[11]["messages"]))


if __name__ == "__main__":
    unittest.main()
