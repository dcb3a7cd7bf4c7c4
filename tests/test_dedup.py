"""Deduplication stages: boilerplate (F-1), tool outputs, markdown blocks. Pure-function tests,
prefix-stability properties over generated conversations, and one pass through the proxy."""

import copy
import random
import unittest

from helpers import ProxyTestCase, StateStack
import deepseek_proxy as dp

REMINDER = "<reminderInstructions>\nAlways run the tests. Keep answers short.\n</reminderInstructions>"
FILE_TEXT = "\n".join("line %d of a source file with some code = value(%d)" % (i, i) for i in range(40))
BLOCK = "```python\n" + "\n".join("x_%d = compute(%d)" % (i, i) for i in range(30)) + "\n```"


STATE = dp.ProxyState(persist=False, api_key="")
STATES = StateStack(STATE)  # the state ctx() uses
configured = STATES.configured


def ctx(body=None):
    return dp.RequestContext(body or {}, STATES.current)


def user(text):
    return {"role": "user", "content": text}


def assistant_call(call_id, name="read_file", arguments='{"path": "a.py"}'):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}


def tool(call_id, text):
    return {"role": "tool", "tool_call_id": call_id, "content": text}


class Boilerplate(unittest.TestCase):
    def test_repeated_block_removed_from_later_messages_only(self):
        messages = [user("first\n" + REMINDER + "\n<userRequest>do a</userRequest>"),
                    {"role": "assistant", "content": "ok"},
                    user("second\n" + REMINDER + "\n<userRequest>do b</userRequest>")]
        context = ctx()
        out = dp.dedup_boilerplate(messages, context)
        self.assertEqual(out[0], messages[0])
        self.assertEqual(out[2]["content"], "second\n[Repeat of the <reminderInstructions> block 2 messages above, "
                                            "unchanged.]\n<userRequest>do b</userRequest>")
        self.assertGreater(context.saved["dedup_boilerplate"], 0)
        self.assertEqual(dp.rebuild(out), messages)

    def test_a_message_that_was_all_repeat_is_a_reference(self):
        messages = [user(REMINDER), user(REMINDER),
                    {"role": "user", "content": [{"type": "text", "text": REMINDER}]}]
        out = dp.dedup_boilerplate(messages, ctx())
        note = "[Repeat of the <reminderInstructions> block %d message%s above, unchanged.]"
        self.assertEqual(out[1]["content"], note % (1, ""))
        self.assertEqual(out[2]["content"], [{"type": "text", "text": note % (2, "s")}])
        self.assertEqual(dp.rebuild(out), messages)

    def test_block_that_changed_in_a_few_lines_keeps_only_them(self):
        def details(time):
            return ("<environment_details>\n# Visible Files\na.py\n# Open Tabs\na.py b.py\n# Current Time\n%s\n"
                    "# Current Cost\n$0.10\n# Mode\nact\n# Files\n%s\n</environment_details>"
                    % (time, "\n".join("src/module_%d.py" % n for n in range(30))))
        messages = [user("task\n" + details("10:00")), tool("c1", [{"type": "text", "text": "out"},
                                                                   {"type": "text", "text": details("10:05")}])]
        out = dp.dedup_boilerplate(messages, ctx())
        self.assertEqual(out[1]["content"][1]["text"], "[Changed copy of the <environment_details> block 1 message "
                         "above; its changes follow, 3 lines of unified diff without context lines.]\n"
                         "@@ -7,1 +7,1 @@\n-10:00\n+10:05")
        self.assertEqual(dp.rebuild(out), messages)

    def test_attributes_on_the_open_tag_and_assistant_untouched(self):
        attachment = '<attachment filePath="/src/a.py">\n%s\n</attachment>' % FILE_TEXT
        messages = [user(attachment), {"role": "assistant", "content": attachment}, user(attachment + "\nnow?")]
        out = dp.dedup_boilerplate(messages, ctx())
        self.assertEqual(out[1], messages[1])
        self.assertEqual(out[2]["content"], "[Repeat of the <attachment> block 2 messages above, unchanged.]\nnow?")
        self.assertEqual(dp.rebuild(out), messages)

    def test_fingerprint_history_is_bounded(self):
        blocks = ["<userMemory>memory %d</userMemory>" % i for i in range(5)]
        messages = [user(block) for block in blocks] + [user(blocks[0]), user(blocks[4])]
        with configured(MAX_FINGERPRINT_HISTORY=3):
            out = dp.dedup_boilerplate(messages, ctx())
        self.assertEqual(out[5]["content"], blocks[0], "evicted: sent again")
        self.assertEqual(out[6]["content"], "[Repeat of the <userMemory> block 2 messages above, unchanged.]")

    def test_extra_tags_from_the_flag(self):
        with configured(BOILERPLATE_PATTERNS=dict(dp.BOILERPLATE_PATTERNS, rules=("<rules>", "</rules>"))):
            out = dp.dedup_boilerplate([user("<rules>a</rules>"), user("<rules>a</rules> b")], ctx())
        self.assertEqual(out[1]["content"], "[Repeat of the <rules> block 1 message above, unchanged.] b")

    def test_paragraphs_only_when_enabled(self):
        paragraph = "word " * 100
        messages = [user(paragraph + "\n\nfirst"), user(paragraph + "\n\nsecond")]
        self.assertEqual(dp.dedup_boilerplate(messages, ctx()), messages)
        with configured(MIN_SEGMENT_CHARS=400):
            out = dp.dedup_boilerplate(messages, ctx())
        self.assertEqual(out[1]["content"], "[Repeat of the paragraph 1 message above, unchanged.]\n\nsecond")

    def test_off(self):
        messages = [user(REMINDER), user(REMINDER)]
        with configured(DEDUP_BOILERPLATE=False):
            self.assertEqual(dp.run_pipeline(messages, ctx()), messages)


class ToolOutputs(unittest.TestCase):
    def test_repeated_output_becomes_a_reference(self):
        messages = [user("go"), assistant_call("call_1"), tool("call_1", FILE_TEXT),
                    assistant_call("call_2"), tool("call_2", FILE_TEXT),
                    assistant_call("call_3"), tool("call_3", FILE_TEXT + "\nedited")]
        out = dp.dedup_tool_outputs(messages, ctx())
        self.assertEqual(out[2], messages[2])
        self.assertEqual(out[4]["content"], "[Repeat of the output of the read_file call for `a.py` 2 messages above, unchanged.]")
        self.assertEqual(out[6], messages[6])
        self.assertEqual(out[3], messages[3], "tool-call arguments untouched")

    def test_parts_count_alone_and_short_outputs_stay(self):
        messages = [assistant_call("a"), tool("a", [{"type": "text", "text": FILE_TEXT}, {"type": "text", "text": "t1"}]),
                    assistant_call("b"), tool("b", [{"type": "text", "text": FILE_TEXT}, {"type": "text", "text": "t2"}]),
                    assistant_call("c"), tool("c", "ok"), assistant_call("d"), tool("d", "ok")]
        out = dp.dedup_tool_outputs(messages, ctx())
        self.assertEqual(out[3]["content"][0]["text"],
                         "[Repeat of the output of the read_file call for `a.py` 2 messages above (its 1st text part), unchanged.]")
        self.assertEqual(out[3]["content"][1]["text"], "t2")
        self.assertEqual(out[7]["content"], "ok")


class MarkdownBlocks(unittest.TestCase):
    def conversation(self):
        return [user("Look:\n" + BLOCK), {"role": "assistant", "content": "Seen:\n" + BLOCK + "\nok"},
                user("Again:\n" + BLOCK.replace("```python", "~~~~ src/x.py").replace("```", "~~~~"))]

    def test_first_keeps_the_first_copy(self):
        out = dp.dedup_markdown_blocks(self.conversation(), ctx())
        self.assertEqual(out[0], self.conversation()[0])
        self.assertEqual(out[1]["content"], "Seen:\n```python\n[Repeat of the copy of this block 1 message above "
                                            "(that message's 1st fenced block), unchanged.]\n```\nok")
        self.assertEqual(out[2]["content"], "Again:\n~~~~ src/x.py\n[Repeat of the copy of this block 2 messages "
                                            "above (that message's 1st fenced block), unchanged.]\n~~~~")
        self.assertEqual(dp.rebuild(out), self.conversation())

    def test_latest_keeps_the_last_copy(self):
        with configured(MARKDOWN_DEDUP="latest"):
            out = dp.dedup_markdown_blocks(self.conversation(), ctx())
        self.assertIn("[Repeat of the copy of this block 2 messages below (that message's 1st fenced block), "
                      "unchanged.]", out[0]["content"])
        self.assertEqual(out[2], self.conversation()[2])
        self.assertEqual(dp.rebuild(out), self.conversation())

    def test_auto_keeps_the_latest_copy_within_the_uncached_tail(self):
        messages = [user("a"), {"role": "assistant", "content": "ok"}, user("one\n" + BLOCK),
                    user("two\n" + BLOCK)]
        with configured(MARKDOWN_DEDUP="auto"):
            out = dp.dedup_markdown_blocks(messages, ctx())
        self.assertIn("below", out[2]["content"])
        self.assertEqual(out[3], messages[3])

    def test_short_unclosed_and_inline_fences_are_left_alone(self):
        short = "```\nx = 1\n```"
        messages = [user(short), user(short), user("```python\nno end"), user("```python\nno end")]
        self.assertEqual(dp.dedup_markdown_blocks(messages, ctx()), messages)
        self.assertEqual(dp.find_fenced_blocks("``` inline ``` text"), [])

    def test_off(self):
        with configured(MARKDOWN_DEDUP="off"):
            messages = self.conversation()
            self.assertIs(dp.dedup_markdown_blocks(messages, ctx()), messages)


def generated_conversation(seed, length=40):
    """A random agent conversation drawing from small pools, so that repeats are frequent."""
    rng = random.Random(seed)
    blocks = [BLOCK.replace("compute", "fn%d" % i) for i in range(3)]
    outputs = [FILE_TEXT.replace("line", "row%d" % i) for i in range(3)]
    boiler = ["<environment_details>\nTime %d\n# Files\na.py\nb.py\nc.py\n</environment_details>" % i for i in range(2)]
    messages = [{"role": "system", "content": "You are an agent."}]
    while len(messages) < length:
        kind = rng.random()
        if kind < 0.3:
            text = rng.choice(["Do it.", REMINDER, rng.choice(blocks)]) + "\n" + rng.choice(boiler)
            parts = rng.random() < 0.3
            messages.append(user([{"type": "text", "text": text}] if parts else text))
            messages.append({"role": "assistant", "content": rng.choice(["ok", rng.choice(blocks)])})
        else:
            call_id = "call_%d" % len(messages)
            messages.append(assistant_call(call_id))
            messages.append(tool(call_id, rng.choice(outputs + [rng.choice(blocks)]) + "\n" + rng.choice(boiler)))
    return messages


class PrefixStability(unittest.TestCase):
    """Output for messages[:k] is a byte-identical prefix of the output for messages[:k+1]."""

    def assert_prefix_stable(self, stage, cut_points):
        for seed in range(20):
            messages = generated_conversation(seed)
            original = copy.deepcopy(messages)
            outputs = {k: stage(messages[:k], ctx()) for k in cut_points(messages)}
            self.assertEqual(messages, original, "stages never mutate their input")
            cuts = sorted(outputs)
            for shorter, longer in zip(cuts, cuts[1:]):
                self.assertEqual(outputs[shorter], outputs[longer][:shorter],
                                 "%s seed %d, cut %d" % (stage.__name__, seed, shorter))

    @staticmethod
    def every_cut(messages):
        return range(1, len(messages) + 1)

    @staticmethod
    def request_cuts(messages):
        """Where a real client's requests end: right before each assistant turn, and at the end."""
        return [k for k in range(1, len(messages)) if messages[k]["role"] == "assistant"] + [len(messages)]

    def test_boilerplate(self):
        self.assert_prefix_stable(dp.dedup_boilerplate, self.every_cut)

    def test_tool_outputs(self):
        self.assert_prefix_stable(dp.dedup_tool_outputs, self.every_cut)

    def test_near_duplicates(self):
        with configured(MIN_NEAR_DUP_CHARS=100):
            self.assert_prefix_stable(dp.dedup_near_duplicates, self.every_cut)

    def test_markdown_first(self):
        with configured(MARKDOWN_DEDUP="first"):
            self.assert_prefix_stable(dp.dedup_markdown_blocks, self.every_cut)

    def test_markdown_auto_at_request_boundaries(self):
        with configured(MARKDOWN_DEDUP="auto"):
            self.assert_prefix_stable(dp.dedup_markdown_blocks, self.request_cuts)

    def test_markdown_latest_rewrites_history(self):
        with configured(MARKDOWN_DEDUP="latest"):
            with self.assertRaises(AssertionError):
                self.assert_prefix_stable(dp.dedup_markdown_blocks, self.every_cut)

    def test_whole_pipeline_with_defaults(self):
        def pipeline(messages, context):
            return dp.run_pipeline(messages, dp.RequestContext({"tools": [{"type": "function"}]}, state))
        pipeline.__name__ = "pipeline"
        state = dp.ProxyState(persist=False, api_key="")
        self.assert_prefix_stable(pipeline, self.request_cuts)


class ThroughTheProxy(ProxyTestCase):
    def test_deepseek_receives_the_deduplicated_conversation(self):
        messages = [{"role": "system", "content": "sys"},
                    user("<userRequest>read a</userRequest>\n" + REMINDER),
                    assistant_call("call_1"), tool("call_1", FILE_TEXT),
                    assistant_call("call_2"), tool("call_2", FILE_TEXT),
                    {"role": "assistant", "content": "Here:\n" + BLOCK},
                    user("<userRequest>again</userRequest>\n" + REMINDER + "\n" + BLOCK)]
        status, headers, _ = self.proxy.chat({"model": "x", "messages": messages, "tools": [
            {"type": "function", "function": {"name": "read_file", "parameters": {}}}]})
        self.assertEqual(status, 200)
        sent = self.fake.requests[-1]["messages"]
        self.assertIn("[Repeat of the output of the read_file call for `a.py` 2 messages above", sent[5]["content"])
        self.assertEqual(sent[7]["content"], "<userRequest>again</userRequest>\n[Repeat of the <reminderInstructions> "
                                             "block 6 messages above, unchanged.]\n```python\n[Repeat of the copy "
                                             "of this block 1 message above (that message's 1st fenced block), "
                                             "unchanged.]\n```")
        self.assertLess(int(headers["X-Proxy-Tokens-Sent-Estimate"]), int(headers["X-Proxy-Tokens-In-Estimate"]))


if __name__ == "__main__":
    unittest.main()
