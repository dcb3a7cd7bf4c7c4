"""Thinking mode with tools from clients that never send reasoning_content back."""

import http.client
import json
import os
import unittest
import uuid

from helpers import API_KEY, ProxyTestCase, assert_upstream_reasoning_exact, assemble_stream, run_in_threads, sse_data, wait_for
import deepseek_proxy as proxy_module
from fake_deepseek import Answer

TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}}}}]
ROUNDS = 3  # tool rounds before the final answer


def agent_responder(body, number):
    """Round k (k = assistant turns so far): tool calls for k < ROUNDS (two in parallel in round 0),
    then a final answer. Reasoning is unique per call so tests can check the exact bytes come back."""
    rounds = sum(1 for m in body["messages"] if m["role"] == "assistant")
    tag = uuid.uuid4().hex
    if rounds < ROUNDS:
        calls = [("read_file", {"path": "f%d.py" % rounds})]
        if rounds == 0:
            calls.append(("read_file", {"path": "g.py"}))
        return Answer(content="  Let me look at round %d.  \n" % rounds, reasoning="R%d %s" % (rounds, tag),
                      tool_calls=calls)
    first = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return Answer(content="All files read for: %s (%d)\n\n" % (first, len(body["messages"])),
                  reasoning="Final %s" % tag)


def post(port, body, key="client-key"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": "Bearer " + key})
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    return response.status, raw


def agent_turn(port, messages, stream, key="client-key"):
    """One request as a forgetful client makes it; returns (status, assistant message as echoed back)."""
    status, raw = post(port, {"model": "deepseek-v4-flash", "messages": messages, "tools": TOOLS, "stream": stream}, key)
    if status != 200:
        return status, json.loads(raw)
    if stream:
        message, _, _ = assemble_stream(sse_data(raw))
    else:
        message = json.loads(raw)["choices"][0]["message"]
    # The client echoes the turn without reasoning_content and with whitespace trimmed.
    echoed = {"role": "assistant", "content": (message.get("content") or "").strip()}
    if message.get("tool_calls"):
        echoed["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
            "name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
            for c in message["tool_calls"]]
    return status, echoed


def run_agent(port, stream, first_message="Read the files.", stop_after=None, key="client-key", start=None):
    messages = start or [{"role": "system", "content": "You are an agent."},
                         {"role": "user", "content": first_message}]
    for _ in range(ROUNDS + 1):
        if stop_after is not None and sum(m["role"] == "assistant" for m in messages) >= stop_after:
            return 200, messages
        status, echoed = agent_turn(port, messages, stream, key)
        if status != 200:
            return status, echoed
        messages.append(echoed)
        for call in echoed.get("tool_calls") or ():
            messages.append({"role": "tool", "tool_call_id": call["id"],
                             "content": "contents of " + json.loads(call["function"]["arguments"])["path"]})
        if not echoed.get("tool_calls"):
            # the user goes on after the final answer: that answer's reasoning is needed too
            messages.append({"role": "user", "content": "Thanks. " + first_message})
            status, echoed = agent_turn(port, messages, stream, key)
            return status, messages + [echoed]
    return 200, messages


class ReasoningLoop(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.fake.responder = agent_responder

    def assert_upstream_got_exact_reasoning(self):
        assert_upstream_reasoning_exact(self, self.fake, at_least=1)

    def test_tool_loop_succeeds_through_the_proxy(self):
        for stream in (False, True):
            status, messages = run_agent(self.proxy.port, stream, first_message="Read, stream=%s." % stream)
            self.assertEqual(status, 200, messages)
            self.assertTrue(messages[-1]["content"].startswith("All files read for: Read, stream="))
        self.assert_upstream_got_exact_reasoning()
        self.assertTrue(wait_for(lambda: "restored=4 filled=0" in self.proxy.log()))

    def test_the_same_loop_straight_to_deepseek_fails(self):
        status, error = run_agent(self.fake.server.server_address[1], False, key=API_KEY)
        self.assertEqual(status, 400)
        self.assertIn("reasoning_content", error["error"]["message"])

    def test_client_sent_reasoning_is_never_overwritten(self):
        messages = [{"role": "user", "content": "Go"},
                    {"role": "assistant", "content": "", "reasoning_content": "mine",
                     "tool_calls": [{"id": "call_x", "type": "function",
                                     "function": {"name": "read_file", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "call_x", "content": "ok"}]
        status, _ = agent_turn(self.proxy.port, messages, False)
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.requests[-1]["messages"][1]["reasoning_content"], "mine")

    def test_nothing_is_added_without_tools_or_without_thinking(self):
        history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "Again"}]
        status, _ = post(self.proxy.port, {"model": "m", "messages": history})
        self.assertEqual(status, 200)
        self.assertNotIn("reasoning_content", self.fake.requests[-1]["messages"][1])
        proxy = self.start_proxy(["--thinking-mode", "disabled"])
        status, _ = post(proxy.port, {"model": "m", "messages": history, "tools": TOOLS})
        self.assertEqual(status, 200)
        self.assertNotIn("reasoning_content", self.fake.requests[-1]["messages"][1])

    def test_unknown_turns_get_empty_reasoning(self):
        messages = [{"role": "user", "content": "Go"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_from_elsewhere", "type": "function",
                         "function": {"name": "read_file", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "call_from_elsewhere", "content": "ok"}]
        status, _ = agent_turn(self.proxy.port, messages, True)
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.requests[-1]["messages"][1]["reasoning_content"], "")
        self.assertTrue(wait_for(lambda: "restored=0 filled=1" in self.proxy.log()))

    def test_restart_mid_session_with_persistence(self):
        status, messages = run_agent(self.proxy.port, True, stop_after=2)
        self.assertEqual(status, 200)
        self.assertEqual(self.proxy.stop(), 0)
        restarted = self.start_proxy()
        status, messages = run_agent(restarted.port, True, start=messages)
        self.assertEqual(status, 200, messages)
        self.assert_upstream_got_exact_reasoning()
        self.assertIn("reasoning_cache.jsonl: 2 reasoning entries loaded", restarted.log())

    def test_restart_mid_session_without_persistence(self):
        proxy = self.start_proxy(["--no-persist-reasoning"])
        status, messages = run_agent(proxy.port, False, stop_after=2)
        proxy.stop()
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "reasoning_cache.jsonl")))
        restarted = self.start_proxy(["--no-persist-reasoning"])
        status, messages = run_agent(restarted.port, False, start=messages)
        self.assertEqual(status, 200, messages)
        first_after_restart = self.fake.requests[2]["messages"]
        self.assertEqual([m["reasoning_content"] for m in first_after_restart if m["role"] == "assistant"],
                         ["", ""])

    def test_eviction_counts_conversations(self):
        proxy = self.start_proxy(["--max-cache-size", "2", "--no-persist-reasoning"])
        sessions = [run_agent(proxy.port, False, first_message="Session %d." % i, stop_after=2)[1]
                    for i in range(3)]
        for index, expect_restored in ((2, True), (0, False)):
            before = len(self.fake.requests)
            status, _ = run_agent(proxy.port, False, first_message="Session %d." % index, stop_after=3,
                                  start=sessions[index])
            self.assertEqual(status, 200)
            sent = [m["reasoning_content"] for m in self.fake.requests[before]["messages"] if m["role"] == "assistant"]
            self.assertEqual(all(sent), expect_restored, "session %d: %r" % (index, sent))

    def test_memory_is_bounded_by_bytes_too(self):
        proxy = self.start_proxy(["--max-cache-bytes", "100", "--no-persist-reasoning"])
        for i in range(5):  # two turns of ~35 characters of reasoning each
            run_agent(proxy.port, False, first_message="Session %d." % i, stop_after=2)
        self.assertLessEqual(proxy.state.reasoning.bytes, 100)
        self.assertEqual(len(proxy.state.reasoning.conversations), 1, "the newest conversation alone fits")

    def test_conversations_ending_alike_keep_their_own_reasoning(self):
        """Two conversations whose last exchange is the same ("continue" -> "Done.") used to receive
        each other's reasoning; keyed by the whole history they cannot."""
        answers = iter(range(1000))
        self.fake.responder = lambda body, number: Answer(content="Done.", reasoning="R%d" % next(answers))
        histories = {}
        for name in ("A", "B"):
            history = [{"role": "user", "content": "Task " + name}]
            for _ in range(2):
                status, echoed = agent_turn(self.proxy.port, history, False)
                self.assertEqual(status, 200)
                history += [echoed, {"role": "user", "content": "continue"}]
            histories[name] = history
        produced = [answer["reasoning_content"] for answer in self.fake.answers]  # A1 A2 B1 B2
        for name, expected in (("A", produced[:2]), ("B", produced[2:4])):
            agent_turn(self.proxy.port, histories[name], False)
            sent = [m["reasoning_content"] for m in self.fake.requests[-1]["messages"] if m["role"] == "assistant"]
            self.assertEqual(sent, expected, name)

    def test_16_concurrent_sessions_without_cross_talk(self):
        results = run_in_threads(
            lambda i: run_agent(self.proxy.port, i % 2 == 0, first_message="Session %d." % i), 16)
        for status, messages in results:
            self.assertEqual(status, 200, messages)
        self.assert_upstream_got_exact_reasoning()
        self.assertEqual(len(self.fake.requests), 16 * (ROUNDS + 2))


class ReasoningKeys(unittest.TestCase):
    def test_history_chain_survives_what_clients_change_when_they_echo(self):
        sent = [{"role": "user", "content": "Question?  "},
                {"role": "assistant", "content": "Answer.  \n\nMore  \n", "reasoning_content": "r",
                 "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
        echoed = [{"role": "user", "content": [{"type": "text", "text": "Question?"}]},
                  {"role": "assistant", "content": "Answer.\n\nMore",
                   "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{ }"}}]}]
        self.assertEqual(proxy_module.history_chain(sent), proxy_module.history_chain(echoed))
        other = [{"role": "user", "content": "Other?"}] + echoed[1:]
        self.assertNotEqual(proxy_module.history_chain(sent)[2], proxy_module.history_chain(other)[2])

    def test_cache_file_is_private_survives_corruption_and_a_torn_line_and_compacts(self):
        import tempfile
        path = os.path.join(tempfile.mkdtemp(), "r.jsonl")
        cache = proxy_module.ReasoningCache(3, 10 ** 6, path)
        for i in range(10):
            cache.remember("c%d" % i, "k%d" % i, "r%d" % i)
        cache.file.flush()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path, "a") as handle:
            handle.write('{not json\n{"c": "torn", "k": "line", "v": "cut off')
        loaded = proxy_module.ReasoningCache(3, 10 ** 6, path)
        loaded.load()
        self.assertEqual([loaded.recall("c%d" % i, "k%d" % i) for i in range(10)], [None] * 7 + ["r7", "r8", "r9"])
        loaded.remember("c10", "k10", "r10")
        loaded.file.flush()
        again = proxy_module.ReasoningCache(3, 10 ** 6, path)
        again.load()
        self.assertEqual(again.recall("c10", "k10"), "r10", "the torn line cost itself only")

    def test_file_is_never_written_through_a_symlink(self):
        import tempfile
        folder = tempfile.mkdtemp()
        target = os.path.join(folder, "elsewhere")
        os.symlink(target, os.path.join(folder, "r.jsonl"))
        cache = proxy_module.ReasoningCache(3, 10 ** 6, os.path.join(folder, "r.jsonl"))
        cache.remember("c", "k", "r")
        cache.file.flush()
        self.assertFalse(os.path.exists(target))
        self.assertEqual(cache.recall("c", "k"), "r", "memory still has it")


if __name__ == "__main__":
    unittest.main()
