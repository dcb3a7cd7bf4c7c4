"""The recorded traffic of real clients (bench/traffic/, made by bench/record.py: Claude Code, Codex CLI,
OpenCode, Cline CLI, Kilo Code CLI, Qwen Code, Continue CLI, Aider, llm), replayed through the pipeline:
every request rebuilds exactly, with rebuild() and with the independent decoder; an append-only
history keeps DeepSeek's cached prefix on every front; and the shapes those clients send are caught."""

import copy
import os
import sys
import unittest

from helpers import ROOT
import deepseek_proxy as dp
from independent_decoder import decode

sys.path.insert(0, os.path.join(ROOT, "bench"))
import replay_traffic  # noqa: E402

SETTINGS = dict(MAX_CONTEXT=100000000)  # the defaults, below the budget: every rewrite must rebuild
CLIENTS = replay_traffic.recorded_clients()


_REPLAYED = {}


def replayed(name, settings=SETTINGS):
    """[(client's normalised messages, messages sent upstream)] for each recorded request, in order,
    with the recorded answers settled so that the reasoning restore and the scans resume as live
    (computed once per client and configuration: the tests only read them)."""
    key = (name, tuple(sorted(settings.items())))
    if key not in _REPLAYED:
        _REPLAYED[key] = replay(name, settings)
    return _REPLAYED[key]


def replay(name, settings):
    session = replay_traffic.Session(name)
    state = dp.ProxyState(dp.Config(**settings), persist=False, api_key="recorded")
    out = []
    for request in session.requests:
        body = {"model": "x", "messages": copy.deepcopy(request["messages"]), "tools": request["tools"]}
        prepared = dp.prepare(body, state)
        out.append(([{k: v for k, v in m.items() if k != "reasoning_content"} for m in prepared.ctx.normalised],
                    prepared.upstream_body["messages"]))
        collector = dp.AnswerCollector()
        collector.feed_response({"choices": [{"message": request["answer"], "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        dp.settle(prepared, collector)
    return out


@unittest.skipUnless(CLIENTS, "no recordings in bench/traffic (python bench/record.py makes them)")
class RecordedClients(unittest.TestCase):
    def test_every_request_rebuilds_exactly_with_both_decoders(self):
        for name in CLIENTS:
            if name == "aider":
                continue  # its ephemeral block is not read back by design (the per-file deltas are exact)
            requests = replayed(name)
            for number, (expected, sent) in enumerate(requests):
                later_expected, later = requests[number + 1] if number + 1 < len(requests) else ([], [])
                if len(later) > len(sent) and later[:len(sent)] == sent and later_expected[:len(expected)] == expected:
                    continue  # the next request sent these same messages first: rebuilding it checks them
                plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in sent]
                self.assertEqual(dp.rebuild(plain), expected, "%s request %d: rebuild()" % (name, number + 1))
                self.assertEqual(decode(plain), expected, "%s request %d: independent decoder" % (name, number + 1))

    def test_an_append_only_history_keeps_its_cached_prefix(self):
        # request n+1 starts with request n's messages and its answer: what the proxy sent for them
        # must come out again byte for byte, on the chat, Anthropic and Responses fronts alike
        checked = 0
        for name in CLIENTS:
            previous = None
            for expected, sent in replayed(name):
                if previous and len(expected) > len(previous[0]) and expected[:len(previous[0])] == previous[0]:
                    earlier = [dp.to_json(m) for m in previous[1]]
                    self.assertEqual([dp.to_json(m) for m in sent[:len(earlier)]], earlier, name)
                    checked += 1
                previous = (expected, sent)
        self.assertGreater(checked, 100)

    def test_the_stages_find_what_these_clients_repeat(self):
        # a re-read file, in each client's own numbered or plain form, goes as a change note
        for name in ("claude", "codex", "opencode", "qwen", "continue"):
            if name not in CLIENTS:
                continue
            _expected, sent = replayed(name)[-1]
            notes = [dp.content_text(m.get("content")) for m in sent if m["role"] == "tool"]
            self.assertTrue(any(text.startswith("[Changed copy of the output of the ") for text in notes), name)
            self.assertFalse(any("call_" in text[:200] for text in notes if text.startswith("[")),
                             "notes never name call ids: " + name)


if __name__ == "__main__":
    unittest.main()
