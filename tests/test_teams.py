"""One proxy for a team (issue 26): named keys from a file, spend per person, budgets enforced before
the upstream call, conversations kept apart per key, revocation by editing the file."""

import hashlib
import json
import os
import subprocess
import time

from helpers import PROXY_COMMAND, API_KEY, ProxyTestCase, chat_body, patched_environ
from fake_deepseek import Answer, is_summary_request
import deepseek_proxy as dp

ANA, BEN = "dsp-ana-0123456789abcdef", "dsp-ben-fedcba9876543210"
TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]


def entry(name, key, **extra):
    return dict({"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest()}, **extra)


class Team(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.keys_path = os.path.join(self.data_dir, "keys.json")
        self.write_keys([entry("ana", ANA, usd_per_day=5), entry("ben", BEN, fronts=["chat"])])
        self.team = self.start_proxy(["--keys", self.keys_path])

    def write_keys(self, keys):
        with open(self.keys_path, "w") as handle:
            json.dump({"keys": keys}, handle)
        os.utime(self.keys_path, (time.time() + len(keys), time.time() + len(keys)))  # a new mtime each write

    def as_(self, key):
        return {"Authorization": "Bearer " + key}

    def test_only_named_keys_get_in_and_each_is_counted_apart(self):
        self.assertEqual(self.team.chat(chat_body(), headers=self.as_("dsp-nobody"))[0], 401)
        self.assertEqual(self.team.chat(chat_body(), headers={"Authorization": ""})[0], 401)
        for _ in range(2):
            self.assertEqual(self.team.chat(chat_body(), headers=self.as_(ANA))[0], 200)
        self.assertEqual(self.team.chat(chat_body(), headers=self.as_(BEN))[0], 200)
        status, _, raw = self.team.request("GET", "/stats", headers=self.as_(BEN))
        users = json.loads(raw)["users"]
        self.assertEqual((users["ana"]["requests"], users["ben"]["requests"]), (2, 1))
        self.assertGreater(users["ana"]["spent_usd"], users["ben"]["spent_usd"])
        self.assertIn("last_seen", users["ana"])
        recent = json.loads(raw)["recent"]
        self.assertEqual([row["user"] for row in recent], ["ana", "ana", "ben"])

    def test_fronts_a_key_may_not_use(self):
        status, _, answer = self.team.chat({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                                           path="/v1/messages", headers=self.as_(BEN))
        self.assertEqual(status, 403)
        self.assertEqual(answer["type"], "error", "in Anthropic's shape")
        self.assertEqual(self.team.chat({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                                        path="/v1/messages", headers=self.as_(ANA))[0], 200)

    def test_a_budget_stops_requests_before_the_upstream_call(self):
        self.write_keys([entry("ana", ANA, usd_per_day=0.00001), entry("ben", BEN)])
        self.assertEqual(self.team.chat(chat_body(), headers=self.as_(ANA))[0], 200)  # spends past the budget
        calls = len(self.fake.requests)
        status, headers, answer = self.team.chat(chat_body(), headers=self.as_(ANA))
        self.assertEqual(status, 429)
        self.assertIn("ana has spent", answer["error"]["message"])
        self.assertIn("this day", answer["error"]["message"])
        self.assertIn("resets at", answer["error"]["message"])
        self.assertGreater(int(headers["Retry-After"]), 0)
        self.assertEqual(len(self.fake.requests), calls, "nothing went upstream")
        status, _, answer = self.team.chat({"model": "g", "input": "hi"}, path="/v1/responses", headers=self.as_(ANA))
        self.assertEqual(status, 429)
        self.assertEqual(answer["error"]["code"], "budget_exceeded", "the Responses shape")
        self.assertEqual(self.team.chat(chat_body(), headers=self.as_(BEN))[0], 200, "ben has his own budget")

    def test_revoking_a_key_by_editing_the_file_needs_no_restart(self):
        self.assertEqual(self.team.chat(chat_body(), headers=self.as_(BEN))[0], 200)
        self.write_keys([entry("ana", ANA)])
        self.assertEqual(self.team.chat(chat_body(), headers=self.as_(BEN))[0], 401)
        with open(self.keys_path, "w") as handle:
            handle.write("{ broken")
        os.utime(self.keys_path, (time.time() + 10, time.time() + 10))
        self.assertEqual(self.team.chat(chat_body(), headers=self.as_(ANA))[0], 200, "a broken edit locks nobody out")
        self.assertIn("keeping the keys read before", self.team.log())

    def test_conversations_of_two_keys_never_share_what_the_proxy_keeps(self):
        self.fake.responder = lambda body, number: Answer(content="", reasoning="secret reasoning %d" % number,
                                                          tool_calls=[("read_file", {"path": "a.py"})])
        opening = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Same task."}]
        answers = {}
        for key in (ANA, BEN):
            status, _, answer = self.team.chat({"model": "x", "messages": opening, "tools": TOOLS}, headers=self.as_(key))
            self.assertEqual(status, 200)
            answers[key] = answer["choices"][0]["message"]
        # ben replays ana's turn (as if he had seen it): he must not get ana's reasoning back
        call = answers[ANA]["tool_calls"][0]
        history = opening + [{"role": "assistant", "content": "", "tool_calls": [
            {k: call[k] for k in ("id", "type", "function")}]}, {"role": "tool", "tool_call_id": call["id"], "content": "x"}]
        self.team.chat({"model": "x", "messages": history, "tools": TOOLS}, headers=self.as_(BEN))
        sent = self.fake.requests[-1]["messages"][2]
        self.assertEqual(sent.get("reasoning_content"), "", "ben's request got no reasoning of ana's")
        self.team.chat({"model": "x", "messages": history, "tools": TOOLS}, headers=self.as_(ANA))
        self.assertEqual(self.fake.requests[-1]["messages"][2]["reasoning_content"], answers[ANA]["reasoning_content"])

    def test_stored_responses_answer_only_their_key(self):
        status, _, stored = self.team.chat({"model": "g", "input": "hi"}, path="/v1/responses", headers=self.as_(ANA))
        self.assertEqual(status, 200)
        self.assertEqual(self.team.request("GET", "/v1/responses/" + stored["id"], headers=self.as_(ANA))[0], 200)
        self.assertEqual(self.team.request("GET", "/v1/responses/" + stored["id"], headers=self.as_(BEN))[0], 404)
        status, _, answer = self.team.chat({"model": "g", "input": "more", "previous_response_id": stored["id"]},
                                           path="/v1/responses", headers=self.as_(BEN))
        self.assertEqual(status, 403, "ben may not use the Responses API at all")
        self.write_keys([entry("ana", ANA), entry("ben", BEN)])
        status, _, answer = self.team.chat({"model": "g", "input": "more", "previous_response_id": stored["id"]},
                                           path="/v1/responses", headers=self.as_(BEN))
        self.assertEqual((status, answer["error"]["code"]), (400, "previous_response_not_found"))

    def test_the_proxys_own_calls_count_against_the_person(self):
        team = self.start_proxy(["--keys", self.keys_path, "--system-min-seen", "1", "--no-system-payback",
                                 "--system-min-chars", "2000", "--system-wait", "5"])
        system = "You are a careful agent; follow the conventions of this repository. " * 60
        team.chat({"model": "x", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]},
                  headers=self.as_(ANA))
        team.state.wait_idle()
        self.assertTrue([r for r in self.fake.requests if is_summary_request(r)])
        users = json.loads(team.request("GET", "/stats", headers=self.as_(ANA))[2])["users"]
        self.assertGreater(team.state.stats.per_user["ana"]["summary_cost_usd"], 0)
        self.assertGreater(users["ana"]["spent_today_usd"], 0)

    def test_spend_per_person_survives_a_restart(self):
        self.team.chat(chat_body(), headers=self.as_(ANA))
        self.team.stop()
        again = self.start_proxy(["--keys", self.keys_path])
        users = json.loads(again.request("GET", "/stats", headers=self.as_(ANA))[2])["users"]
        self.assertEqual(users["ana"]["requests"], 1)
        self.assertGreater(users["ana"]["spent_today_usd"], 0)


class AddKey(ProxyTestCase):
    def test_a_new_key_is_printed_once_and_only_its_digest_stored(self):
        path = os.path.join(self.data_dir, "team.json")
        result = subprocess.run(PROXY_COMMAND + ["--keys", path,
                                 "--add-key", "carla"], capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        key = result.stdout.strip()
        self.assertTrue(key.startswith("dsp-") and len(key) > 30)
        with open(path) as handle:
            stored = handle.read()
        self.assertNotIn(key, stored)
        self.assertIn(hashlib.sha256(key.encode()).hexdigest(), stored)
        again = subprocess.run(PROXY_COMMAND + ["--keys", path,
                                "--add-key", "carla"], capture_output=True, text=True, timeout=30)
        self.assertEqual(again.returncode, 2)
        self.assertIn("already has a key named", again.stderr)
        proxy = self.start_proxy(["--keys", path])
        self.assertEqual(proxy.chat(chat_body(), headers={"Authorization": "Bearer " + key})[0], 200)

    def test_an_open_bind_accepts_a_keys_file_as_its_key(self):
        path = os.path.join(self.data_dir, "keys.json")
        with open(path, "w") as handle:
            json.dump({"keys": []}, handle)
        with patched_environ({"DEEPSEEK_API_KEY": API_KEY}):
            config, _ = dp.parse_args(["--host", "0.0.0.0", "--keys", path])
        self.assertEqual(config.problems(), [])
        self.assertEqual(dp.parse_keys('{"keys": []}'), {})
        for bad in ('{"keys": [{"name": "x"}]}', '{"keys": [{"name": "x", "sha256": "%s", "usd_per_day": "5"}]}' % ("a" * 64),
                    '{"keys": [{"name": "x", "sha256": "%s", "fronts": ["ftp"]}]}' % ("a" * 64), "[]"):
            with self.assertRaises(ValueError):
                dp.parse_keys(bad)


if __name__ == "__main__":
    import unittest
    unittest.main()
