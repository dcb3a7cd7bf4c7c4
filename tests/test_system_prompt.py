"""System-prompt compression: summarised once through DeepSeek, cached in pre_sys/ and post_sys/."""

import hashlib
import os
import time

from helpers import ProxyTestCase, run_in_threads, wait_for
import fake_deepseek
from fake_deepseek import is_summary_request

LONG_SYSTEM = "<instructions>\n" + "\n".join(
    "- Rule %d: always keep file paths like src/mod%d.py exact and use tool read_file." % (i, i)
    for i in range(150)) + "\n</instructions>"
DIGEST = hashlib.sha256(LONG_SYSTEM.encode()).hexdigest()


def body(system=LONG_SYSTEM, question="Hello"):
    return {"model": "x", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


class SystemPromptCompression(ProxyTestCase):
    proxy_args = ("--compress-system", "--system-min-seen", "1", "--no-system-payback", "--system-min-chars", "2000", "--system-wait", "10")

    def setUp(self):
        super().setUp()
        self.addCleanup(fake_deepseek.SUMMARY_RATIO.__setitem__, 0, 0.25)

    def summary_calls(self):
        return [r for r in self.fake.requests if is_summary_request(r)]

    def chat_calls(self):
        return [r for r in self.fake.requests if not is_summary_request(r)]

    def post_sys(self):
        return os.path.join(self.data_dir, "post_sys", DIGEST + ".txt")

    def test_first_request_makes_both_files_and_sends_the_summary(self):
        status, _, _ = self.proxy.chat(body())
        self.assertEqual(status, 200)
        with open(os.path.join(self.data_dir, "pre_sys", DIGEST + ".txt")) as handle:
            self.assertEqual(handle.read(), LONG_SYSTEM)
        with open(self.post_sys()) as handle:
            summary = handle.read()
        self.assertTrue(summary.startswith("SUMMARY "))
        self.assertEqual(self.chat_calls()[0]["messages"][0]["content"], summary)
        call = self.summary_calls()[0]
        self.assertEqual(call["thinking"], {"type": "disabled"})
        self.assertEqual(call["max_tokens"], 8000)
        self.assertNotIn("tools", call)
        # the second request makes no summarisation call
        self.proxy.chat(body(question="Again"))
        self.assertEqual(len(self.summary_calls()), 1)
        self.assertEqual(self.chat_calls()[1]["messages"][0]["content"], summary)
        self.assertTrue(wait_for(lambda: "system %d->%d chars" % (len(LONG_SYSTEM), len(summary)) in self.proxy.log()))

    def test_a_hand_edited_summary_is_used(self):
        self.proxy.chat(body())
        time.sleep(0.01)
        with open(self.post_sys(), "w") as handle:
            handle.write("My own short prompt.")
        self.proxy.chat(body())
        self.assertEqual(self.chat_calls()[-1]["messages"][0]["content"], "My own short prompt.")

    def test_corrupt_or_empty_cache_files_are_made_again(self):
        os.makedirs(os.path.dirname(self.post_sys()), exist_ok=True)
        for bad in (b"", b"\xff\xfe not utf-8"):
            with open(self.post_sys(), "wb") as handle:
                handle.write(bad)
            before = len(self.summary_calls())
            self.assertEqual(self.proxy.chat(body())[0], 200)
            self.assertEqual(len(self.summary_calls()), before + 1)
            self.assertTrue(self.chat_calls()[-1]["messages"][0]["content"].startswith("SUMMARY "))

    def test_failing_summariser_sends_the_original_after_three_attempts(self):
        error = {"error": {"message": "server busy", "type": "server_error"}}
        self.fake.summary_failures.extend([("status", 500, error)] * 3)
        started = time.monotonic()
        status, _, _ = self.proxy.chat(body())
        self.assertEqual(status, 200)
        self.assertEqual(len(self.fake.requests), 4, "three summary attempts, then the chat call")
        self.assertGreaterEqual(time.monotonic() - started, 0.01 + 0.02, "backoff 0.01 s doubled (TEST_ARGS)")
        self.assertEqual(self.chat_calls()[0]["messages"][0]["content"], LONG_SYSTEM)
        self.assertFalse(os.path.exists(self.post_sys()))
        self.assertIn("summarising failed (server busy)", self.proxy.log())
        # backed off: the next request does not try again at once
        self.proxy.chat(body())
        self.assertEqual(len(self.fake.requests), 5)

    def test_client_errors_are_not_retried(self):
        self.fake.summary_failures.append(("status", 402, {"error": {"message": "Insufficient Balance", "type": "x"}}))
        self.assertEqual(self.proxy.chat(body())[0], 200)
        self.assertEqual(len(self.fake.requests), 2, "one summary attempt, then the chat call")

    def test_twenty_concurrent_first_requests_make_one_call(self):
        self.fake.chunk_delay = 0
        statuses = run_in_threads(lambda i: self.proxy.chat(body(question="q%d" % i))[0], 20)
        self.assertEqual(statuses, [200] * 20)
        self.assertEqual(len(self.summary_calls()), 1)

    def test_short_prompts_are_untouched(self):
        self.proxy.chat(body(system="Be brief."))
        self.assertEqual(self.summary_calls(), [])
        self.assertEqual(self.fake.requests[0]["messages"][0]["content"], "Be brief.")

    def test_a_summary_that_is_not_shorter_is_rejected_once(self):
        fake_deepseek.SUMMARY_RATIO[0] = 0.95
        self.proxy.chat(body())
        self.proxy.chat(body())
        self.assertEqual(len(self.summary_calls()), 1)
        self.assertEqual([r["messages"][0]["content"] for r in self.chat_calls()], [LONG_SYSTEM] * 2)
        self.assertIn("not short enough", self.proxy.log())


class BackgroundMode(ProxyTestCase):
    proxy_args = ("--compress-system", "--system-min-seen", "1", "--no-system-payback", "--system-min-chars", "2000")

    def test_first_request_goes_with_the_original_and_the_next_with_the_summary(self):
        self.proxy.chat(body())
        first_chat = [r for r in self.fake.requests if not is_summary_request(r)][0]
        self.assertEqual(first_chat["messages"][0]["content"], LONG_SYSTEM)
        post_sys = os.path.join(self.data_dir, "post_sys", DIGEST + ".txt")
        self.assertTrue(wait_for(lambda: os.path.exists(post_sys)))
        self.proxy.chat(body())
        self.assertTrue(self.fake.requests[-1]["messages"][0]["content"].startswith("SUMMARY "))


    def test_a_conversation_keeps_the_form_it_opened_with(self):
        # a summary that arrives mid-conversation would make its whole cached history a miss once:
        # it is used by conversations that open after it, never switched in under one
        from helpers import tool_rounds
        system = {"role": "system", "content": LONG_SYSTEM}
        first = [system] + tool_rounds("one")[:1]
        self.assertEqual(self.proxy.chat({"model": "x", "messages": first})[0], 200)
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.data_dir, "post_sys", DIGEST + ".txt"))))
        answer = self.fake.answers[-1]
        ongoing = first + [dict(answer, content=answer.get("content")), {"role": "user", "content": "next"}]
        for _ in range(3):
            self.assertEqual(self.proxy.chat({"model": "x", "messages": ongoing})[0], 200)
            self.assertEqual(self.fake.requests[-1]["messages"][0]["content"], LONG_SYSTEM, "kept under its cache")
        self.assertEqual(self.proxy.chat(body(question="A new conversation"))[0], 200)
        self.assertTrue(self.fake.requests[-1]["messages"][0]["content"].startswith("SUMMARY "))
        state = self.proxy.state  # a conversation the proxy never saw open (a restart) takes the summary
        state.system_prompts.opened = type(state.system_prompts.opened)(16)
        self.assertEqual(self.proxy.chat({"model": "x", "messages": ongoing})[0], 200)
        self.assertTrue(self.fake.requests[-1]["messages"][0]["content"].startswith("SUMMARY "))


class UnwritableDataDir(ProxyTestCase):
    proxy_args = ("--compress-system", "--system-min-seen", "1", "--no-system-payback", "--system-min-chars", "2000", "--system-wait", "10")

    def start_proxy(self, args=None, **kwargs):
        for folder in ("pre_sys", "post_sys"):  # a file where the folder should be: every write fails
            with open(os.path.join(self.data_dir, folder), "w") as handle:
                handle.write("not a folder")
        return super().start_proxy(args, **kwargs)

    def test_summaries_kept_in_memory_with_one_warning(self):
        for _ in range(3):
            self.assertEqual(self.proxy.chat(body())[0], 200)
        summary_calls = [r for r in self.fake.requests if is_summary_request(r)]
        self.assertEqual(len(summary_calls), 1)
        self.assertTrue(self.fake.requests[-1]["messages"][0]["content"].startswith("SUMMARY "))
        log = self.proxy.log()
        self.assertEqual(log.count("writing " + os.path.join(self.data_dir, "post_sys")), 1, log)
