"""Conversation summarisation at the token budget, and the token estimator."""

import json
import os
import threading
import time
import unittest

from helpers import ProxyTestCase, run_in_threads, wait_for
import deepseek_proxy as dp
from fake_deepseek import Answer, is_summary_request, summary_answer

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}}}}]
# Budget 4000 tokens: summarise past 3200, keep ~1000 tokens of recent turns; summaries made when
# the budget is crossed (the background watermark has its own tests below).
ARGS = ("--max-context", "4000", "--no-compress-system", "--no-dedup-tool-outputs", "--summary-watermark", "0")


def file_text(number):
    return "\n".join("def function_%d_%d(argument):\n    return compute(argument, %d)" % (number, i, i)
                     for i in range(12))


def agent_responder(body, number):
    if is_summary_request(body):
        return summary_answer(body)
    rounds = sum(1 for m in body["messages"] if m["role"] == "tool")
    return Answer(content="", reasoning="Reading %d." % rounds,
                  tool_calls=[("read_file", {"path": "file%d.py" % rounds})])


class Conversation:
    """A forgetful agent client: history grows by tool rounds; reasoning never sent back."""

    def __init__(self, proxy, task="Refactor the project."):
        self.proxy = proxy
        self.messages = [{"role": "system", "content": "You are a coding agent."},
                         {"role": "user", "content": "<environment_info>linux</environment_info>"},
                         {"role": "user", "content": task}]

    def step(self):
        status, headers, answer = self.proxy.chat({"model": "x", "messages": self.messages, "tools": TOOLS})
        assert status == 200, answer
        message = answer["choices"][0]["message"]
        call = message["tool_calls"][0]
        self.messages.append({"role": "assistant", "content": message["content"],
                              "tool_calls": [{k: call[k] for k in ("id", "type", "function")}]})
        self.messages.append({"role": "tool", "tool_call_id": call["id"],
                              "content": file_text(len(self.messages))})
        self.usage = answer["usage"]
        return headers


class Summarisation(ProxyTestCase):
    proxy_args = ARGS

    def setUp(self):
        super().setUp()
        self.fake.responder = agent_responder

    def summary_calls(self):
        return [r for r in self.fake.requests if is_summary_request(r)]

    def chat_calls(self):
        return [r for r in self.fake.requests if not is_summary_request(r)]

    def grow_until_summarised(self, conversation, limit=40):
        for _ in range(limit):
            conversation.step()
            if self.summary_calls():
                return
        self.fail("the budget was never crossed")

    def test_crossing_makes_one_summary_and_the_next_request_reuses_it(self):
        conversation = Conversation(self.proxy)
        self.grow_until_summarised(conversation)
        crossing = self.chat_calls()[-1]["messages"]
        summary = [m for m in crossing if m["role"] == "user" and "<conversation-summary>" in m["content"]]
        self.assertEqual(len(summary), 1)
        # kept: system, first user message, the last user message, recent turns
        self.assertEqual(crossing[:2], conversation.messages[:2])
        self.assertEqual(crossing[2], conversation.messages[2], "the last user message, whole")
        self.assertIn("<conversation-summary>", crossing[3]["content"])
        crossing_tokens = conversation.usage["prompt_tokens"]
        conversation.step()
        self.assertGreaterEqual(conversation.usage["prompt_cache_hit_tokens"], crossing_tokens - 128,
                                "the request after the crossing hits DeepSeek's cache")
        conversation.step()
        self.assertEqual(len(self.summary_calls()), 1, "reused, not made again")
        following = self.chat_calls()[-1]["messages"]
        self.assertEqual(following[:len(crossing)], crossing, "byte-identical prefix: the cache keeps hitting")

    def test_summary_call_is_shaped_for_the_prefix_cache(self):
        conversation = Conversation(self.proxy)
        self.grow_until_summarised(conversation)
        call = self.summary_calls()[0]
        before = self.chat_calls()[-2]["messages"]
        self.assertEqual(call["tools"], TOOLS)
        self.assertEqual(call["tool_choice"], "none")
        self.assertEqual(call["thinking"], {"type": "enabled"})
        self.assertFalse(call.get("stream"))
        prefix = call["messages"][:-1]
        self.assertEqual(prefix, before[:len(prefix)], "the conversation exactly as sent before")
        self.assertIn("Summarise the conversation", call["messages"][-1]["content"])

    def test_tool_pairs_stay_valid_and_summaries_are_summarised_again(self):
        conversation = Conversation(self.proxy)
        for _ in range(60):
            conversation.step()  # the fake rejects any broken tool pair or missing reasoning
        calls = self.summary_calls()
        self.assertGreaterEqual(len(calls), 2)
        second = json.dumps(calls[-1]["messages"])
        self.assertIn("<conversation-summary>", second, "summary of summary + newer turns")
        for request in self.chat_calls():
            self.assertEqual(request["messages"][2]["content"], "Refactor the project.")

    def test_failing_summariser_sends_the_conversation_whole(self):
        error = {"error": {"message": "busy", "type": "server_error"}}
        self.fake.summary_failures.extend([("status", 500, error)] * 3)
        conversation = Conversation(self.proxy)
        while not self.summary_calls():
            headers = conversation.step()
        self.assertEqual(len(self.summary_calls()), 3, "three attempts")
        self.assertIn("summary failed; sent unsummarised", headers["X-Proxy-Notes"])
        sent = self.chat_calls()[-1]["messages"]
        self.assertNotIn("<conversation-summary>", json.dumps(sent))
        self.assertEqual(len(sent), len(conversation.messages) - 2)
        self.assertIn("conversation summary failed (busy)", self.proxy.log())
        conversation.step()  # backed off: no new attempt on the next request
        self.assertEqual(len(self.summary_calls()), 3)

    def test_two_requests_crossing_at_once_make_one_call(self):
        self.fake.summary_delay = 0.25
        conversation = Conversation(self.proxy)
        for _ in range(40):
            body = {"model": "x", "messages": conversation.messages, "tools": TOOLS}
            statuses = run_in_threads(lambda i: self.proxy.chat(body)[0], 2)
            self.assertEqual(statuses, [200, 200])
            if self.summary_calls():
                break
            conversation.step()
        self.assertEqual(len(self.summary_calls()), 1)

    def test_summaries_survive_a_restart(self):
        conversation = Conversation(self.proxy)
        self.grow_until_summarised(conversation)
        crossing = self.chat_calls()[-1]["messages"]
        self.proxy.stop()
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "summary_cache.jsonl")))
        conversation.proxy = self.start_proxy()
        conversation.messages = conversation.messages[:-2]  # the same request again
        conversation.step()
        self.assertEqual(len(self.summary_calls()), 1)
        self.assertEqual(self.chat_calls()[-1]["messages"], crossing)


class BackgroundWatermark(ProxyTestCase):
    proxy_args = ARGS[:-2] + ("--summary-watermark", "0.6", "--tail-ratio", "0.15")

    def test_the_summary_is_ready_when_the_budget_is_crossed(self):
        self.fake.responder = agent_responder
        gate = self.fake.summary_gate = threading.Event()  # the summary call hangs until let through
        self.addCleanup(gate.set)
        conversation = Conversation(self.proxy)
        for _ in range(40):
            conversation.step()  # returns while a summary call hangs: nobody waits for it
            if [r for r in self.fake.requests if is_summary_request(r)] and not gate.is_set():
                self.assertTrue(wait_for(lambda: "started in the background" in self.proxy.log()))
                gate.set()
                self.proxy.state.wait_idle()
            sent = [r for r in self.fake.requests if not is_summary_request(r)][-1]["messages"]
            if "<conversation-summary>" in json.dumps(sent):
                break
        else:
            self.fail("never summarised")
        self.assertTrue(gate.is_set(), "the summary was started before the crossing")
        self.assertEqual(len([r for r in self.fake.requests if is_summary_request(r)]), 1, "one summary call")
        conversation.step()
        following = [r for r in self.fake.requests if not is_summary_request(r)][-1]["messages"]
        self.assertEqual(following[:len(sent)], sent, "the next request keeps the same bytes")

    def test_a_conversation_that_stops_growing_pays_for_no_summary(self):
        # seen past the watermark but not growing toward the budget: a summary might never be used
        self.fake.responder = agent_responder
        conversation = Conversation(self.proxy)
        conversation.messages += [message for n in range(12) for message in (
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "old%d" % n, "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "old%d" % n, "content": file_text(n)})]
        for _ in range(5):  # the same request again and again (a client retrying, a user re-asking)
            conversation.step()
            conversation.messages = conversation.messages[:-2]
        self.proxy.state.wait_idle()
        self.assertEqual([r for r in self.fake.requests if is_summary_request(r)], [])
        conversation.step()
        self.assertTrue(0.6 * 4000 <= conversation.usage["prompt_tokens"] < 0.8 * 4000,
                        "past the watermark, under the budget: %d" % conversation.usage["prompt_tokens"])

    def test_without_the_watermark_the_crossing_request_waits(self):
        proxy = self.start_proxy(ARGS)
        self.fake.responder = agent_responder
        self.fake.summary_delay = 0.2
        conversation = Conversation(proxy)
        latencies = []
        while not [r for r in self.fake.requests if is_summary_request(r)]:
            started = time.monotonic()
            conversation.step()
            latencies.append(time.monotonic() - started)
        self.assertGreaterEqual(latencies[-1], 0.2)


class WindowFallback(ProxyTestCase):
    proxy_args = ARGS + ("--upstream-context-window", "5000", "--max-output-tokens", "2000",
                         "--summarise-max-retries", "1")

    def test_oldest_turns_are_dropped_when_deepseek_would_refuse(self):
        self.fake.responder = agent_responder
        self.fake.summary_failures.extend([("status", 400, {"error": {"message": "no", "type": "x"}})] * 100)
        conversation = Conversation(self.proxy)
        notes = ""
        for _ in range(40):
            notes = conversation.step().get("X-Proxy-Notes", "")
            if "dropped" in notes:
                break
        self.assertIn("dropped", notes)
        sent = [r for r in self.fake.requests if not is_summary_request(r)][-1]["messages"]
        self.assertEqual(sent[:3], conversation.messages[:3])
        self.assertLess(len(sent), len(conversation.messages) - 2)


class Planning(unittest.TestCase):
    """The cut as a pure function."""

    def conversation(self, rounds):
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "ctx"},
                    {"role": "user", "content": "task"}]
        for i in range(rounds):
            messages.append({"role": "assistant", "content": None, "reasoning_content": "",
                             "tool_calls": [{"id": "c%d" % i, "type": "function",
                                             "function": {"name": "f", "arguments": "{}"}}]})
            messages.append({"role": "tool", "tool_call_id": "c%d" % i, "content": file_text(i)})
        return messages

    def test_tail_never_starts_on_a_tool_result(self):
        messages = self.conversation(20)
        sizes = [dp.message_tokens(m) for m in messages]
        for floor in range(2, 10):
            start = dp.tail_start(messages, sizes, floor, 0.25, max_context=2000)
            self.assertNotEqual(messages[start]["role"], "tool")
        self.assertEqual(messages[dp.tail_start(messages, sizes, 3, 0.25, max_context=10)]["role"], "assistant")

    def test_plan_apply_keeps_the_last_user_message_before_the_summary(self):
        messages = self.conversation(5)
        plan = dp.SummaryPlan(2, 9, dp.prefix_fingerprints(messages), 2)
        ctx = dp.RequestContext({}, dp.ProxyState(persist=False, api_key=""))
        ctx.normalised = ctx.base = messages
        result = plan.apply(messages, "S", ctx)
        self.assertEqual(result[:3], messages[:3])
        self.assertTrue(result[3]["content"].startswith(dp.SUMMARY_OPEN))
        self.assertEqual(result[4:], messages[9:])

    def test_references_into_the_summarised_part_are_sent_whole(self):
        messages = self.conversation(5)
        compressed = [dict(m, content="[reference]") if i in (9, 10) else m for i, m in enumerate(messages)]
        ctx = dp.RequestContext({}, dp.ProxyState(persist=False, api_key=""))
        ctx.normalised = ctx.base = messages
        ctx.anchor(9, 4)   # points into the summarised part: sent whole again
        ctx.anchor(10, 9)  # points at a kept message right before it: stays as it is
        result = dp.SummaryPlan(2, 9, dp.prefix_fingerprints(messages), 2).apply(compressed, "S", ctx)
        self.assertEqual(result[4], messages[9])
        self.assertEqual(result[5]["content"], "[reference]")

    def test_fingerprints_identify_prefixes(self):
        messages = self.conversation(3)
        fingerprints = dp.prefix_fingerprints(messages)
        self.assertEqual(dp.prefix_fingerprints(messages[:4]), fingerprints[:5])
        changed = json.loads(json.dumps(messages))
        changed[1]["content"] = "other"
        self.assertNotEqual(dp.prefix_fingerprints(changed)[5], fingerprints[5])


if __name__ == "__main__":
    unittest.main()
