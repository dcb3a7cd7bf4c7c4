"""Aider's chat files: kept where DeepSeek cached them, brought up to date by deltas that rebuild them."""

import re
import unittest

from helpers import ProxyTestCase
import deepseek_proxy as dp

STATE = dp.ProxyState(persist=False, api_key="")
SYSTEM = {"role": "system", "content": "Act as an expert software developer."}
MAP = [{"role": "user", "content": "Here are summaries of some files present in my git repository.\nlib/a.py"},
       {"role": "assistant", "content": "Ok, I won't try and edit those files without asking first."}]
ACK = {"role": "assistant", "content": "Ok, any changes I propose will be to those files."}
FIRST_LINE = "I have *added these files to the chat* so you can go ahead and edit them."


def source(name, lines=120, changed=()):
    return "\n".join("def %s_%d(value):  # %s" % (name, i, "changed" if i in changed else "original")
                     for i in range(lines))


def files_message(files):
    return {"role": "user", "content": FIRST_LINE + "\n\n" + "\n\n".join(
        "%s\n```python\n%s\n```" % (path, text) for path, text in sorted(files.items()))}


class AiderConversation:
    """Requests as Aider builds them: history, then the chat files (not kept), then the request."""

    def __init__(self):
        self.done, self.files = [], {"lib/a.py": source("a"), "lib/b.py": source("b")}

    def request(self, text):
        return [SYSTEM] + MAP + self.done + [files_message(self.files), ACK, {"role": "user", "content": text}]

    def answered(self, text, answer):
        self.done += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def rebuild(anchor_text, delta_text):
    """The files a delta message says the client has now, rebuilt from the anchored message."""
    files = dp.chat_files(anchor_text)
    sections = re.split(r"\n\n(?=\S[^\n]*\n```|\S[^\n]*: no longer in the chat\.)", delta_text.split("\n\n", 2)[2])
    for section in sections:
        header, _, body = section.partition("\n")
        if header.endswith(": no longer in the chat."):
            del files[header[:-len(": no longer in the chat.")]]
        elif header.endswith(" (added to the chat since):"):
            files[header[:-len(" (added to the chat since):")]] = body[len("```\n"):-len("\n```")]
        elif body.startswith("```diff\n"):
            old, out, position = files[header].split("\n"), [], 0
            lines = body[len("```diff\n"):-len("\n```")].split("\n")
            i = 0
            while i < len(lines):
                match = re.match(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@$", lines[i])
                first, count = int(match.group(1)), int(match.group(2))
                start = first - 1 if count else first
                out.extend(old[position:start])
                position, i = start + count, i + 1
                while i < len(lines) and lines[i].startswith("-"):
                    i += 1
                while i < len(lines) and lines[i].startswith("+"):
                    out.append(lines[i][1:])
                    i += 1
            files[header] = "\n".join(out + old[position:])
    files.pop("")
    return files


class Stage(unittest.TestCase):
    def run_stage(self, messages, state=STATE):
        ctx = dp.RequestContext({}, state)
        ctx.normalised = ctx.base = messages
        sent = dp.keep_ephemeral_blocks(messages, ctx)
        for remember in ctx.kept:  # as when DeepSeek accepted the request
            remember()
        return sent

    def test_the_block_stays_where_it_was_sent_and_deltas_rebuild_every_file(self):
        state = dp.ProxyState(persist=False, api_key="")
        aider = AiderConversation()
        first = aider.request("Add logging.")
        self.assertIs(self.run_stage(first, state), first, "the first request goes as the client built it")
        anchored = first[3]
        aider.answered("Add logging.", "lib/a.py\n```python\n<<<<<<< SEARCH\n...\n```")
        for turn in range(1, 5):
            aider.files["lib/a.py"] = source("a", changed=range(turn * 3, turn * 3 + 2))
            if turn == 2:
                aider.files["lib/c.py"] = source("c", lines=30)
            if turn == 3:
                del aider.files["lib/b.py"]
            messages = aider.request("Step %d." % turn)
            sent = self.run_stage(messages, state)
            self.assertEqual(sent[3], anchored, "byte-identical, where it was first sent")
            self.assertEqual(sent[4], ACK)
            delta = sent[-3]["content"]
            self.assertTrue(delta.startswith(FIRST_LINE + "\n\n[The full text of these files was sent earlier"))
            self.assertLess(len(delta), len(messages[-3]["content"]) / 2)
            self.assertEqual(rebuild(anchored["content"], delta), aider.files)
            self.assertEqual(sent[-1], messages[-1])
            aider.answered("Step %d." % turn, "Done %d." % turn)

    def test_a_large_change_reanchors_and_a_lost_memory_costs_nothing_but_money(self):
        state = dp.ProxyState(persist=False, api_key="")
        aider = AiderConversation()
        self.run_stage(aider.request("One."), state)
        aider.answered("One.", "Ok.")
        aider.files = {"lib/z.py": source("z", lines=400)}
        messages = aider.request("Two.")
        self.assertEqual(self.run_stage(messages, state), messages, "re-anchored: sent whole where the client put it")
        aider.answered("Two.", "Ok.")
        aider.files["lib/z.py"] = source("z", lines=400, changed=(7,))
        sent = self.run_stage(aider.request("Three."), state)
        self.assertEqual(sent[5], messages[-3], "the new anchor, at the position it was sent whole")
        self.assertTrue(sent[-3]["content"].startswith(FIRST_LINE + "\n\n[The full text"))
        fresh = dp.ProxyState(persist=False, api_key="")  # a restart
        later = aider.request("Three.")
        self.assertEqual(self.run_stage(later, fresh), later)

    def test_the_block_is_found_before_aiders_reflection_rounds(self):
        # after an edit Aider sends the chat files, then the whole current turn: the request, its
        # edit, and the lint or test output to fix ("# Please fix the errors below if you can.")
        state = dp.ProxyState(persist=False, api_key="")
        aider = AiderConversation()
        first = aider.request("Add logging.")
        self.run_stage(first, state)
        anchored = first[3]
        aider.answered("Add logging.", "Done.")
        aider.files["lib/a.py"] = source("a", changed=(3,))
        for rounds in range(1, 4):
            turn = [{"role": "user", "content": "Fix the failing test."}]
            for number in range(rounds):
                turn += [{"role": "assistant", "content": "lib/a.py\n```python\n<<<<<<< SEARCH\nx\n=======\ny\n"
                                                          ">>>>>>> REPLACE\n```  (attempt %d)" % number},
                         {"role": "user", "content": "# Please fix the errors below if you can.\nFAILED %d" % number}]
            messages = [SYSTEM] + MAP + aider.done + [files_message(aider.files), ACK] + turn
            sent = self.run_stage(messages, state)
            self.assertEqual(sent[3], anchored, "%d rounds: the block stays where it was sent" % rounds)
            delta = sent[-len(turn) - 2]["content"]
            self.assertTrue(delta.startswith(FIRST_LINE + "\n\n[The full text"), rounds)
            self.assertEqual(rebuild(anchored["content"], delta), aider.files)
            self.assertEqual(sent[-len(turn) - 1:], [ACK] + turn, "the current turn as the client sent it")

    def test_clients_that_keep_their_history_are_untouched(self):
        state = dp.ProxyState(persist=False, api_key="")
        history = [SYSTEM, {"role": "user", "content": "```python\n%s\n```" % source("a")}, ACK,
                   {"role": "user", "content": "Next?"}]
        self.assertEqual(self.run_stage(history, state), history)
        longer = history + [{"role": "assistant", "content": "Fine."}, {"role": "user", "content": "More."}]
        self.assertEqual(self.run_stage(longer, state), longer)


class ThroughTheProxy(ProxyTestCase):
    def test_deepseek_caches_the_files_from_the_second_request_on(self):
        aider = AiderConversation()
        for turn in range(4):
            aider.files["lib/a.py"] = source("a", changed=(turn,))
            status, headers, answer = self.proxy.chat({"model": "x", "messages": aider.request("Turn %d." % turn)})
            self.assertEqual(status, 200)
            aider.answered("Turn %d." % turn, answer["choices"][0]["message"]["content"])
        usage = self.fake.usages[-1]
        self.assertGreater(usage["prompt_cache_hit_tokens"] / usage["prompt_tokens"], 0.8)
        self.assertIn("ephemeral block kept", headers.get("X-Proxy-Notes", ""))

    def test_turned_off(self):
        proxy = self.start_proxy(["--no-keep-ephemeral"])
        aider = AiderConversation()
        for turn in range(2):
            messages = aider.request("Turn %d." % turn)
            proxy.chat({"model": "x", "messages": messages})
            aider.answered("Turn %d." % turn, "Ok.")
        self.assertEqual(self.fake.requests[-1]["messages"], messages)


if __name__ == "__main__":
    unittest.main()
