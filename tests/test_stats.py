"""Accounting: /stats from DeepSeek's usage, per-request headers, the dashboard, message dumps."""

import json
import os
import re

from helpers import API_KEY, ProxyTestCase, chat_body, wait_for
from fake_deepseek import is_summary_request

LONG_SYSTEM = "<instructions>\n" + "\n".join("- Rule %d: be exact about paths." % i for i in range(300)) + "\n</instructions>"


class Stats(ProxyTestCase):
    def stats(self):
        status, _, raw = self.proxy.request("GET", "/stats")
        self.assertEqual(status, 200)
        return json.loads(raw)

    def test_an_answer_the_client_has_read_is_already_counted(self):
        # the stats are recorded after the answer's last bytes; /stats waits for those in between
        for number in range(1, 13):
            self.assertEqual(self.proxy.chat(chat_body(stream=bool(number % 2)))[0], 200)
            self.assertEqual(self.stats()["requests"]["total"], number)
        self.assertEqual(self.proxy.state.unrecorded.count, 0)

    def test_stats_equal_the_sums_of_deepseeks_usage(self):
        for stream in (False, True, False, True):
            self.assertEqual(self.proxy.chat(chat_body(stream=stream))[0], 200)
        self.fake.failures.append(("status", 400, {"error": {"message": "bad", "type": "x"}}))
        self.assertEqual(self.proxy.chat(chat_body())[0], 400)
        self.assertTrue(wait_for(lambda: self.stats()["requests"]["total"] == 5))
        stats = self.stats()
        usages = self.fake.usages
        self.assertEqual(len(usages), 4)
        for field, key in (("prompt", "prompt_tokens"), ("cache_hit", "prompt_cache_hit_tokens"),
                           ("cache_miss", "prompt_cache_miss_tokens"), ("completion", "completion_tokens")):
            self.assertEqual(stats["tokens"][field], sum(u[key] for u in usages), field)
        self.assertEqual(stats["tokens"]["reasoning"], sum(u["completion_tokens_details"]["reasoning_tokens"] for u in usages))
        cost = sum((u["prompt_cache_hit_tokens"] * 0.028 + u["prompt_cache_miss_tokens"] * 0.14
                    + u["completion_tokens"] * 0.28) / 1e6 for u in usages)
        self.assertAlmostEqual(stats["cost_usd"]["chat"], cost, places=6)
        requests = stats["requests"]
        self.assertEqual((requests["total"], requests["failed"], requests["upstream_calls"]), (5, 1, 5))
        self.assertEqual((stats["proxy_calls"]["requests"], requests["unmeasured"]), (0, 0))
        self.assertEqual(sum(point["requests"] for point in stats["per_minute"]), 5)
        self.assertEqual(len(stats["recent"]), 5)
        self.assertEqual(stats["recent"][-1]["status"], 400)
        self.assertEqual(stats["recent"][0]["model"], "gpt-4o", "the model the client asked for")
        self.assertEqual(json.dumps(stats).count('"cache_hit":'), 2, "each figure in one place (and proxy calls')")

    def test_missing_usage_is_unmeasured_not_zero(self):
        self.fake.omit_usage = True
        self.proxy.chat(chat_body(stream=True))
        self.proxy.chat(chat_body())
        self.assertTrue(wait_for(lambda: self.stats()["requests"]["total"] == 2))
        stats = self.stats()
        self.assertEqual(stats["requests"]["unmeasured"], 2)
        self.assertEqual(stats["tokens"]["prompt"], 0)
        self.assertIsNone(stats["tokens"]["cache_hit_ratio"])

    def test_refusals_are_logged_and_counted(self):
        self.proxy.request("GET", "/v1/nothing")
        self.proxy.request("POST", "/v1/chat/completions", b"{not json")
        self.proxy.request("POST", "/v1/chat/completions", b"{}", {"Content-Type": "text/plain"})
        requests = self.stats()["requests"]
        self.assertEqual((requests["refused"], requests["refused_by_status"]), (3, {"400": 1, "404": 1, "415": 1}))
        self.assertIn("refused GET /v1/nothing: 404", self.proxy.log())
        self.assertIn("refused POST /v1/chat/completions: 400", self.proxy.log())

    def test_per_request_headers(self):
        status, headers, answer = self.proxy.chat(chat_body())
        self.assertEqual(headers["X-Proxy-Cache-Hit-Tokens"], str(answer["usage"]["prompt_cache_hit_tokens"]))
        self.assertEqual(float(headers["X-Proxy-Cost-USD"]), round((answer["usage"]["prompt_cache_hit_tokens"] * 0.028
                         + answer["usage"]["prompt_cache_miss_tokens"] * 0.14
                         + answer["usage"]["completion_tokens"] * 0.28) / 1e6, 6))
        status, headers, _ = self.proxy.chat(chat_body(stream=True))
        self.assertIn("X-Proxy-Tokens-In-Estimate", headers)
        self.assertNotIn("X-Proxy-Cache-Hit-Tokens", headers, "not known before a stream's headers")

    def test_stats_survive_a_restart(self):
        self.proxy.chat(chat_body())
        self.assertTrue(wait_for(lambda: self.stats()["requests"]["total"] == 1))
        self.proxy.stop()
        self.proxy = self.start_proxy()
        self.assertEqual(self.stats()["requests"]["total"], 1)

    def test_dashboard_is_one_self_contained_page(self):
        for path in ("/", "/dashboard"):
            status, headers, raw = self.proxy.request("GET", path)
            self.assertEqual(status, 200)
            self.assertTrue(headers["Content-Type"].startswith("text/html"))
            page = raw.decode()
            self.assertIn("<svg", page)
            self.assertIn('get("stats")', page)
            self.assertIsNone(re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page), "no external assets")


class SummaryAccounting(ProxyTestCase):
    proxy_args = ("--system-min-seen", "1", "--no-system-payback", "--system-min-chars", "2000", "--system-wait", "10")

    def test_summary_calls_are_kept_apart(self):
        self.proxy.chat({"model": "x", "messages": [{"role": "system", "content": LONG_SYSTEM},
                                                   {"role": "user", "content": "Hi"}]})
        _, _, raw = self.proxy.request("GET", "/stats")
        self.assertTrue(wait_for(lambda: json.loads(self.proxy.request("GET", "/stats")[2])["requests"]["total"] == 1))
        stats = json.loads(self.proxy.request("GET", "/stats")[2])
        summary_usage = [u for u, r in zip(self.fake.usages, [r for r in self.fake.requests]) if is_summary_request(r)]
        chat_usage = [u for u, r in zip(self.fake.usages, self.fake.requests) if not is_summary_request(r)]
        self.assertEqual(stats["proxy_calls"]["requests"], 1)
        self.assertEqual(stats["proxy_calls"]["prompt"], summary_usage[0]["prompt_tokens"])
        self.assertEqual(stats["tokens"]["prompt"], chat_usage[0]["prompt_tokens"])
        self.assertGreater(stats["cost_usd"]["proxy_calls"], 0)
        savings = stats["savings"]
        self.assertGreater(savings["by_stage"]["compress_system_prompt"]["tokens_estimate"], 0)
        self.assertAlmostEqual(savings["net_usd_estimate"], savings["gross_usd_estimate"] - savings["proxy_calls_usd"],
                               delta=2e-6)  # each figure is rounded to the micro-dollar on its own


class MessageDumps(ProxyTestCase):
    proxy_args = ("--save-prepost-msgs", "--max-dump-files", "3")

    def test_dumps_match_bound_and_hold_no_key(self):
        for i in range(5):
            self.proxy.chat(chat_body(messages=[{"role": "developer", "content": "d%d" % i},
                                           {"role": "user", "content": "Hi %d" % i}]),
                            headers={"Authorization": "Bearer sk-client-secret"})
        self.proxy.state.dumps.flush()
        pre = sorted(os.listdir(os.path.join(self.data_dir, "pre_msg")))
        post = sorted(os.listdir(os.path.join(self.data_dir, "post_msg")))
        self.assertEqual(pre, post)
        self.assertEqual(len(pre), 3, "oldest removed")
        with open(os.path.join(self.data_dir, "pre_msg", pre[-1])) as handle:
            client = json.load(handle)
        with open(os.path.join(self.data_dir, "post_msg", post[-1])) as handle:
            upstream = json.load(handle)
        self.assertEqual(client["messages"][0]["role"], "developer")
        status, _, raw = self.proxy.request("GET", "/dumps/pre_msg/" + pre[-1])
        self.assertEqual((status, json.loads(raw)), (200, client), "the dashboard links to the dumps")
        self.assertEqual(self.proxy.request("GET", "/dumps/pre_msg/..%2Fstats.json")[0], 404)
        self.assertEqual(upstream["messages"][0]["role"], "system")
        self.assertEqual(upstream["model"], "deepseek-v4-flash")
        for folder in ("pre_msg", "post_msg"):
            for name in os.listdir(os.path.join(self.data_dir, folder)):
                try:
                    with open(os.path.join(self.data_dir, folder, name)) as handle:
                        text = handle.read()
                except FileNotFoundError:
                    continue  # pruned meanwhile by the writer (--max-dump-files)
                self.assertNotIn(API_KEY, text)
                self.assertNotIn("sk-client-secret", text)
