"""The near-duplicate stage: deltas that rebuild the exact text, only where they pay, linear matching."""

import json
import random
import re
import time
import unittest

from helpers import NOT_QUADRATIC, ProxyTestCase, StateStack
import deepseek_proxy as dp
from independent_decoder import decode

STATE = dp.ProxyState(persist=False, api_key="")
STATES = StateStack(STATE)  # the state ctx() uses
configured = STATES.configured


def ctx():
    return dp.RequestContext({}, STATES.current)


def code(lines, seed=0, start=0):
    rng = random.Random(seed)
    return "\n".join("    value_%d = compute_%d(argument_%d) + %d  # line %d" % (
        i, rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 999), i) for i in range(start, start + lines))


def edit(text, positions, seed=1):
    lines = text.split("\n")
    for position in positions:
        lines[position] = "    edited_%d = changed_%d(%d)" % (position, seed, position)
    return "\n".join(lines)


def rebuilt(out):
    """The messages the independent decoder (written from design.md) reads out of the stage's output."""
    return decode(out)


def call(call_id, name="read_file"):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}]}


def reads(*outputs):
    messages = [{"role": "user", "content": "Work on the file."}]
    for number, output in enumerate(outputs):
        messages += [call("call_%d" % number), {"role": "tool", "tool_call_id": "call_%d" % number, "content": output}]
    return messages


class Deltas(unittest.TestCase):
    def test_a_reread_after_an_edit_becomes_an_exact_delta(self):
        first = code(200)
        second = edit(first, [10, 11, 150])
        messages = reads(first, second)
        out = dp.dedup_near_duplicates(messages, ctx())
        delta = out[4]["content"]
        self.assertTrue(delta.startswith("[Changed copy of the output of the read_file call 2 messages above; its "
                                         "changes follow, 8 lines of unified diff without context lines.]\n"), delta)
        self.assertLess(len(delta), len(second) / 10)
        self.assertEqual(rebuilt(out), messages)
        self.assertEqual(out[2]["content"], first, "the first copy stays whole")

    def test_overlapping_ranges_send_only_their_new_lines(self):
        whole = code(130).split("\n")
        first, second = "\n".join(whole[:100]), "\n".join(whole[30:130])  # lines 31-130 after 1-100
        out = dp.dedup_near_duplicates(reads(first, second), ctx())
        delta = out[4]["content"]
        self.assertEqual(rebuilt(out), reads(first, second))
        self.assertIn("-[30 lines]", delta)
        self.assertEqual(delta.count("\n+"), 30, "only the 30 new lines are sent")

    def test_numbered_views_survive_an_inserted_line(self):
        lines = code(160).split("\n")
        def view(body, first=1):
            return "[read_file for 'a.py'] Result:\n" + "\n".join("%d | %s" % (first + k, line) for k, line in enumerate(body))
        before = view(lines)
        after = view(lines[:20] + ["    inserted_line = True  # a new line"] + lines[20:])
        partial = view(lines[40:140], first=41)
        out = dp.dedup_near_duplicates(reads(before, after, partial), ctx())
        self.assertIn('Its lines 2 to 162 start with the line numbers 1 to 161, then " | ", left out of the diff.]',
                      out[4]["content"])
        self.assertLess(len(out[4]["content"]), 600)
        # a range whose lines kept their numbers: a diff of the views as they are, no numbering sentence
        self.assertNotIn("left out of the diff", out[6]["content"])
        self.assertIn("-[40 lines]", out[6]["content"])
        self.assertEqual(rebuilt(out), reads(before, after, partial))

    def test_only_where_it_pays(self):
        small = code(5)
        unrelated = code(200, seed=9)
        messages = reads(small, edit(small, [1]), code(200), unrelated, edit(code(200), list(range(0, 200, 2))))
        out = dp.dedup_near_duplicates(messages, ctx())
        self.assertEqual([m["content"] for m in out], [m["content"] for m in messages],
                         "small, unrelated and heavily edited blocks go whole")

    def test_chains_reanchor_with_a_full_copy(self):
        versions = [code(200)]
        for number in range(7):  # each version differs from the one before in 15 lines, drifting away
            versions.append(edit(versions[-1], range(number * 15, number * 15 + 15), seed=number))
        with configured(NEAR_DUP_MAX_CHAIN=3):
            out = dp.dedup_near_duplicates(reads(*versions), ctx())
        sent = [out[2 + 2 * i]["content"] for i in range(len(versions))]
        depth = {}
        for number, text in enumerate(sent):  # a delta names the output it changes by its distance
            found = re.match(r"\[Changed copy of the output of the read_file call (\d+) messages above", text)
            depth[number] = depth[number - int(found.group(1)) // 2] + 1 if found else 0
        self.assertEqual(rebuilt(out), reads(*versions))
        self.assertLessEqual(max(depth.values()), 3)
        self.assertIn(0, [depth[number] for number in range(1, len(versions))], "re-anchored with a full copy")

    def test_fenced_blocks_in_user_messages(self):
        first = code(120)
        second = edit(first, [5])
        messages = [{"role": "user", "content": "Look:\n```src/main.py\n%s\n```\nThanks." % first},
                    {"role": "assistant", "content": "Ok."},
                    {"role": "user", "content": [{"type": "text", "text": "Again:\n```src/main.py\n%s\n```" % second}]}]
        out = dp.dedup_near_duplicates(messages, ctx())
        text = out[2]["content"][0]["text"]
        self.assertTrue(text.startswith("Again:\n```src/main.py\n[Changed copy of the fenced block `src/main.py` "
                                        "2 messages above; its changes follow"), text[:200])
        self.assertEqual(rebuilt(out), messages)
        self.assertEqual(out[0], messages[0])

    def test_prefix_stable_and_input_untouched(self):
        versions = [code(150)]
        for number in range(5):
            versions.append(edit(versions[-1], [number * 7], seed=number))
        messages = reads(*versions)
        full = dp.dedup_near_duplicates(messages, ctx())
        for cut in range(1, len(messages)):
            self.assertEqual(dp.dedup_near_duplicates(messages[:cut], ctx()), full[:cut])

    def test_a_header_where_the_first_lines_were_is_one_change(self):
        # Qwen Code's ranged read_file: "Showing lines 110-125 ...", a blank line, "---" and a blank
        # line, then the range; against the whole file read earlier, the blank lines must not split
        # the change into hunks that spell the file's first lines out
        whole = ['"""A store: items and how many of each are on the shelves, what is reserved for open orders, and',
                 'the history of every change, from which reorders are suggested."""', "", "import collections",
                 "import threading", "import time", ""] + code(60).split("\n")
        ranged = ["Showing lines 20-35 of 67 total lines.", "", "---", ""] + whole[19:35]
        delta = dp.line_delta(whole, ranged)
        self.assertEqual(delta.count("@@"), 4, delta)  # two hunks: the header for the head, the tail
        self.assertNotIn("import collections", delta)
        self.assertEqual(dp.apply_delta(whole, delta.split("\n")), ranged)
        self.assertEqual(dp.merge_weak_gaps([("delete", 0, 2, 0, 0), ("insert", 3, 3, 1, 2)], ["a" * 30, "b", ""]),
                         [("replace", 0, 3, 0, 2)])

    def test_matching_is_fast_on_big_and_repetitive_blocks(self):
        big = code(9000)  # ~400K characters
        repetitive = "\n".join(["same line that repeats again and again"] * 10000)
        started = time.monotonic()
        dp.dedup_near_duplicates(reads(big, edit(big, [5, 4000]), repetitive, repetitive + "\nend",
                                       *[code(60, seed=s) for s in range(300)]), ctx())
        self.assertLess(time.monotonic() - started, NOT_QUADRATIC)


class ClientShapes(unittest.TestCase):
    """Shapes the recorded clients and their source code show."""

    def test_copilot_attachments_are_sources_and_change_against_their_own_file(self):
        def attachments(pricing, util):
            return ('<attachments>\n<attachment id="pricing.py" filePath="/w/pricing.py">\n%s\n</attachment>\n'
                    '<attachment id="util.py" filePath="/w/util.py">\n%s\n</attachment>\n</attachments>\n'
                    '<userRequest>%s</userRequest>' % (pricing, util, "fix it"))
        pricing, util = code(80), code(40, seed=3)
        edited = edit(pricing, [5])
        messages = [{"role": "system", "content": "You are Copilot."},
                    {"role": "user", "content": attachments(pricing, util)},
                    call("call_0"), {"role": "tool", "tool_call_id": "call_0", "content": edited},
                    {"role": "assistant", "content": "Fixed."},
                    {"role": "user", "content": attachments(edited, util)}]
        state = dp.ProxyState(dp.Config(MAX_CONTEXT=10 ** 8, COMPRESS_SYSTEM=False), persist=False, api_key="")
        sent = dp.prepare({"model": "x", "messages": messages}, state).upstream_body["messages"]
        self.assertTrue(sent[3]["content"].startswith(
            "[Changed copy of the contents of the <attachment> block 2 messages above (its 1st of them); "), "the read")
        self.assertIn('[Changed copy of the <attachment> block 4 messages above (its 1st of them); ', sent[5]["content"],
                      "pricing.py changes against pricing.py, not util.py")
        self.assertIn("[Repeat of the <attachment> block 4 messages above (its 2nd of them), unchanged.]",
                      sent[5]["content"])
        self.assertEqual(dp.rebuild(sent), messages)
        self.assertEqual(decode(sent), messages)

    def test_cline_split_result_parts_and_roo_right_aligned_numbers(self):
        lines = code(120).split("\n")
        def view(body, first=1):
            width = len(str(first + len(body) - 1))
            return "\n".join("%*d | %s" % (width, first + k, line) for k, line in enumerate(body))
        def result(body):
            return [{"type": "text", "text": "[read_file for 'a.py'] Result:"}, {"type": "text", "text": body},
                    {"type": "text", "text": "<environment_details>\nTime 10:00\n</environment_details>"}]
        messages = [{"role": "user", "content": "Fix a.py"}, {"role": "assistant", "content": "<read_file>a.py</read_file>"},
                    {"role": "user", "content": result(view(lines))},
                    {"role": "assistant", "content": "<read_file>a.py</read_file>"},
                    {"role": "user", "content": result(view(lines[:9] + ["    inserted = 1  # a new line here"] + lines[9:]))},
                    {"role": "assistant", "content": "<read_file>a.py 95-104</read_file>"},
                    {"role": "user", "content": result(view(lines[94:104], first=95))}]
        state = dp.ProxyState(dp.Config(MAX_CONTEXT=10 ** 8, COMPRESS_SYSTEM=False), persist=False, api_key="")
        sent = dp.prepare({"model": "x", "messages": messages}, state).upstream_body["messages"]
        second = sent[4]["content"][1]["text"]
        self.assertTrue(second.startswith("[Changed copy of the [read_file for 'a.py'] result 2 messages above "
                                          "(its 2nd text part); "), second[:200])
        self.assertIn("(right-aligned to 3 characters)", second)
        self.assertLess(len(second), 600)
        self.assertEqual(dp.rebuild(sent), messages)
        self.assertEqual(decode(sent), messages)


class JsonWrappedResults(unittest.TestCase):
    def test_cline_cli_3_reads_in_json_are_diffed_inside_it(self):
        lines = code(80).split("\n")
        def result(body, query="/w/a.py"):
            view = "\n".join("%2d | %s" % (k + 1, line) for k, line in enumerate(body))
            return json.dumps([{"query": query, "result": view, "success": True}], separators=(",", ":"))
        edited = lines[:5] + ["    changed = 1  # a line the edit changed"] + lines[6:]
        messages = [{"role": "user", "content": "Fix a.py"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function", "function": {
                        "name": "read_files", "arguments": json.dumps({"files": [{"path": "/w/a.py"}]})}}]},
                    {"role": "tool", "tool_call_id": "c0", "content": result(lines)},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                        "name": "read_files", "arguments": json.dumps({"files": [{"path": "/w/a.py"}]})}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": result(edited)},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c2", "type": "function", "function": {
                        "name": "read_files", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c2", "content": '{"result": "not\\nJSON as Cline writes it" }'}]
        out = dp.dedup_near_duplicates(messages, ctx())
        sent = json.loads(out[4]["content"])
        self.assertTrue(sent[0]["result"].startswith("[Changed copy of the output of the read_files call for `/w/a.py` "
                                                     "2 messages above (its JSON's [0].result); "), sent[0]["result"][:200])
        self.assertEqual((sent[0]["query"], sent[0]["success"]), ("/w/a.py", True))
        self.assertEqual(out[6], messages[6], "JSON that does not rebuild byte for byte is left alone")
        self.assertEqual(dp.rebuild(out), messages)
        self.assertEqual(decode(out), messages)


class NumberedViews(unittest.TestCase):
    def test_every_numbering_style_rebuilds_with_both_decoders(self):
        rng = random.Random(5)
        lines = code(90).split("\n")
        for separator in ("\t", " | ", "| ", ": ", "\u2192"):
            for padded in (False, True):
                for header, trailer in (([], []), (["<path>/a.py</path>", "<content>"], ["", "</content>"])):
                    def view(body, first):
                        width = len(str(first + len(body) - 1)) if padded else 0
                        return "\n".join(header + ["%*d%s%s" % (width, first + k, separator, line)
                                                    for k, line in enumerate(body)] + trailer)
                    edited = list(lines)
                    edited.insert(rng.randrange(90), "    inserted = %d  # a line added by an edit" % rng.randrange(99))
                    start = rng.randrange(5, 20)
                    messages = reads(view(lines, 1), view(edited, 1), view(edited[start:start + 60], start + 1))
                    out = dp.dedup_near_duplicates(messages, ctx())
                    label = "%r padded=%s header=%s" % (separator, padded, bool(header))
                    self.assertTrue(out[4]["content"].startswith("[Changed copy of"), label)
                    self.assertIn(" left out of the diff.]", out[4]["content"], label)
                    self.assertEqual(dp.rebuild(out), messages, label)
                    self.assertEqual(decode(out), messages, label)


class ThroughTheProxy(ProxyTestCase):
    def test_deepseek_gets_the_delta_and_the_same_tools(self):
        tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
        first = code(200)
        status, headers, _ = self.proxy.chat({"model": "x", "tools": tools, "messages": reads(first, edit(first, [3]))})
        self.assertEqual(status, 200)
        sent = self.fake.requests[-1]
        self.assertTrue(sent["messages"][4]["content"].startswith("[Changed copy of the output of the read_file call "
                                                                  "2 messages above;"))
        self.assertEqual(sent["tools"], tools)
        self.assertLess(int(headers["X-Proxy-Tokens-Sent-Estimate"]), int(headers["X-Proxy-Tokens-In-Estimate"]) * 0.7)


if __name__ == "__main__":
    unittest.main()
