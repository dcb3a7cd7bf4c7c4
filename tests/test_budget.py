"""A token budget you can trust (issue 24): counts anchored on DeepSeek's own usage, the estimate
alone only past its margin, summaries checked before they replace anything."""

import json
import unittest

from helpers import ProxyTestCase
from fake_deepseek import Answer, is_summary_request
import deepseek_proxy as dp

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
SKEW = 1.6  # the estimate runs this much high (more than the calibration, bounded at 0.8, can take back)


def digits_text(number, lines=60):
    """Code whose identifiers carry digits: the kind of text the estimate counts high."""
    return "\n".join("value%d_%d = data%d[call_%03d] + item%d  # %d" % (number, i, i * 7, i, i * 3, i)
                     for i in range(lines))


class Agent:
    """A client that reads a file per round and keeps its history."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.messages = [{"role": "system", "content": "You are a coding agent."},
                         {"role": "user", "content": "Fix the failing test."}]
        self.headers = None

    def step(self):
        status, headers, answer = self.proxy.chat({"model": "x", "messages": self.messages, "tools": TOOLS})
        assert status == 200, answer
        self.headers = headers
        message = answer["choices"][0]["message"]
        call = message["tool_calls"][0]
        self.messages.append({"role": "assistant", "content": message["content"],
                              "tool_calls": [{k: call[k] for k in ("id", "type", "function")}]})
        self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": digits_text(len(self.messages))})


def reader(body, number):
    if is_summary_request(body):
        from fake_deepseek import summary_answer
        return summary_answer(body)
    return Answer(content="", reasoning="Reading.", tool_calls=[("read_file", {"path": "f%d.py" % number})])


class AnchoredCount(unittest.TestCase):
    def test_the_count_is_deepseeks_for_what_it_measured_plus_the_estimate_of_what_is_new(self):
        state = dp.ProxyState(dp.Config(MAX_CONTEXT=20000, COMPRESS_SYSTEM=False), persist=False, api_key="")
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": digits_text(1, 400)}]
        prepared = dp.prepare({"model": "x", "messages": messages, "tools": TOOLS}, state)
        collector = dp.AnswerCollector()
        collector.feed_response({"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 12345, "completion_tokens": 2}})
        dp.settle(prepared, collector)
        ctx = dp.RequestContext({"tools": TOOLS}, state)
        self.assertEqual(ctx.count_tokens(prepared.ctx.sent_messages), (12345, True), "exactly DeepSeek's count")
        grown = prepared.ctx.sent_messages + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
        count, measured = ctx.count_tokens(grown)
        self.assertTrue(measured)
        self.assertEqual(count, 12345 + ctx.message_tokens(grown[-2]) + ctx.message_tokens(grown[-1]))
        other_tools = dp.RequestContext({"tools": TOOLS + [{"type": "function", "function": {"name": "x"}}]}, state)
        self.assertFalse(other_tools.count_tokens(prepared.ctx.sent_messages)[1], "the tools are part of the prompt")

    def test_counts_survive_a_restart(self):
        import shutil
        import tempfile
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        config = dp.Config(MAX_CONTEXT=20000, DATA_DIR=folder)
        state = dp.ProxyState(config, api_key="").load()
        state.measured.remember("k" * 64, {"prompt_tokens": 9000})
        state.close()
        again = dp.ProxyState(config, api_key="").load()
        self.assertEqual(again.measured.recall("k" * 64), {"prompt_tokens": 9000})


class NoSummaryUnderTheBudget(ProxyTestCase):
    proxy_args = ("--max-context", "20000", "--summary-watermark", "0", "--no-compress-system",
                  "--no-dedup-tool-outputs", "--no-near-duplicates")

    def setUp(self):
        super().setUp()
        self.fake.responder = reader
        self.fake.count_tokens = lambda text: max(1, int(dp.raw_tokens(text) / SKEW))  # the estimate runs 34% high

    def test_a_measured_conversation_just_under_the_budget_is_never_summarised(self):
        agent = Agent(self.proxy)
        budget = 0.8 * 20000
        while True:
            agent.step()
            if self.fake.usages[-1]["prompt_tokens"] > budget * 0.93:
                break
        estimated = int(agent.headers["X-Proxy-Tokens-In-Estimate"])
        self.assertGreater(estimated, budget * 1.15, "the estimate alone says far over the budget")
        self.assertLess(self.fake.usages[-1]["prompt_tokens"], budget, "DeepSeek says under it")
        self.assertEqual([r for r in self.fake.requests if is_summary_request(r)], [], "no summary was paid for")
        self.assertNotIn("<conversation-summary>", json.dumps(self.fake.requests[-1]["messages"]))

    def test_an_unmeasured_conversation_follows_the_conservative_rule(self):
        state = self.proxy.state
        budget = 0.8 * 20000
        for factor, summarised in ((1.05, False), (1.25, True)):
            messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "task %s" % factor}]
            number = 0
            while dp.RequestContext({}, state).prompt_tokens(messages) < budget * factor:
                number += 1
                messages += [{"role": "assistant", "content": "reading %d" % number},
                             {"role": "user", "content": digits_text(number)}]
            messages.append({"role": "user", "content": "now fix it"})
            ctx = dp.RequestContext({}, state)
            count, measured = dp.budget_count(messages, ctx)
            self.assertFalse(measured)
            self.assertEqual(count < budget, not summarised, factor)


class PlausibleSummaries(unittest.TestCase):
    def test_what_may_not_replace_a_text(self):
        original = "The user asked to refactor the parser; the agent read four files and ran the tests. " * 120
        self.assertIsNotNone(dp.implausible_summary(original, "ok"))
        self.assertIsNotNone(dp.implausible_summary(original, "Answer 1."), "a canned answer")
        self.assertIsNotNone(dp.implausible_summary("short text", "a longer text than the short one"))
        self.assertIsNotNone(dp.implausible_summary(original, "I'm sorry, but I cannot help with that request. " * 10))
        self.assertIsNotNone(dp.implausible_summary(original, "用户要求重构解析器，代理读取了四个文件并运行了测试。" * 20),
                             "another language")
        self.assertIsNone(dp.implausible_summary(original, "The user asked for a parser refactor. " * 12))


class ImplausibleSummaryKept(ProxyTestCase):
    proxy_args = ("--system-min-seen", "1", "--no-system-payback", "--system-wait", "5")

    def test_a_canned_answer_never_replaces_a_system_prompt(self):
        self.fake.responder = lambda body, number: Answer(content="Answer %d." % number)
        system = "You are a careful coding agent. Follow the repository's conventions. " * 140
        for _ in range(2):
            status, _, _ = self.proxy.chat({"model": "x", "messages": [{"role": "system", "content": system},
                                                                     {"role": "user", "content": "hi"}]})
            self.assertEqual(status, 200)
        self.proxy.state.wait_idle()
        sent = [r for r in self.fake.requests if not is_summary_request(r)]
        self.assertEqual(sent[-1]["messages"][0]["content"], system, "the original is kept")
        self.assertIn("summary is not usable", self.proxy.log())


if __name__ == "__main__":
    unittest.main()


class SystemPromptPayback(ProxyTestCase):
    proxy_args = ("--system-min-chars", "2000", "--system-wait", "5")

    def test_one_long_conversation_pays_for_no_summary(self):
        # its summary could serve only conversations opened after it: none here
        system = {"role": "system", "content": "You are a careful coding agent; run the tests. " * 80}
        messages = [system, {"role": "user", "content": "go"}]
        for number in range(20):
            self.assertEqual(self.proxy.chat({"model": "x", "messages": messages})[0], 200)
            messages = messages + [dict(self.fake.answers[-1]), {"role": "user", "content": "more %d" % number}]
        self.proxy.state.wait_idle()
        self.assertEqual([r for r in self.fake.requests if is_summary_request(r)], [])
        self.assertEqual(self.proxy.chat({"model": "x", "messages": [system, {"role": "user", "content": "new"}]})[0], 200)
        self.proxy.state.wait_idle()
        self.assertEqual(len([r for r in self.fake.requests if is_summary_request(r)]), 1, "a second opening: paid once")

    def test_a_prompt_is_summarised_once_it_has_recurred_as_often_as_the_summary_takes_to_pay_back(self):
        needed = self.proxy.state.system_prompts.required_sightings()
        break_even = (0.14 + 0.35 * 0.28) / (0.65 * 0.028)  # miss + summary written out, over cache hits saved
        self.assertEqual(needed, -(-int(break_even + 1) // dp.RECURRENCE))
        system = "You are a careful coding agent; follow the repository's conventions and run its tests. " * 60
        for number in range(needed - 1):
            self.proxy.chat({"model": "x", "messages": [{"role": "system", "content": system},
                                                        {"role": "user", "content": "hi %d" % number}]})
        self.assertEqual([r for r in self.fake.requests if is_summary_request(r)], [], "a short session pays nothing")
        for number in range(2):
            self.proxy.chat({"model": "x", "messages": [{"role": "system", "content": system},
                                                        {"role": "user", "content": "again %d" % number}]})
        self.proxy.state.wait_idle()
        self.assertEqual(len([r for r in self.fake.requests if is_summary_request(r)]), 1)
        report = json.loads(self.proxy.request("GET", "/stats")[2])["system_prompt_summaries"]
        self.assertIn("serves the conversations that open after it", report["rule"])
        entry = report["summaries"][0]
        self.assertGreaterEqual(entry["uses"], 1)
        self.assertGreater(entry["cost_usd"], 0)
        self.assertEqual(entry["returned_usd"], round(entry["uses"] * entry["saving_per_use_usd"], 6))
