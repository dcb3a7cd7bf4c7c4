"""The Anthropic Messages front: translation as pure functions, then the Anthropic SDK through the proxy."""

import json
import unittest

from helpers import API_KEY, ProxyTestCase, assert_upstream_reasoning_exact
import deepseek_proxy as dp
from fake_deepseek import Answer

try:
    import anthropic
except ImportError:  # test-only dependency (requirements-dev.txt)
    anthropic = None

STATE = dp.ProxyState(persist=False, api_key=API_KEY)
TOOLS = [{"name": "read_file", "description": "Read a file", "input_schema": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]


def agent_responder(body, number):
    """Two rounds of tool calls (two in parallel first), then an answer; reasoning unique per call."""
    rounds = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if rounds < 2:
        calls = [("read_file", {"path": "f%d.py" % rounds})] + ([("read_file", {"path": "g.py"})] if not rounds else [])
        return Answer(content="Reading." if rounds else "", reasoning="think %d #%d" % (rounds, number),
                      tool_calls=calls)
    return Answer(content="All read.", reasoning="done #%d" % number)


class Translation(unittest.TestCase):
    def test_system_blocks_tools_results_thinking_and_images(self):
        sealed = dp.seal(STATE, "my reasoning")
        body = {"model": "claude-opus-5-5", "max_tokens": 128000, "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be brief."}],
            "tools": TOOLS + [{"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "tool", "name": "read_file"}, "stop_sequences": ["END"],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Read a.py"},
                                             {"type": "image", "source": {"type": "base64", "data": "x"}}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "my reasoning", "signature": sealed},
                    {"type": "text", "text": "Sure."},
                    {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a.py"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "boom"}],
                     "is_error": True},
                    {"type": "text", "text": "Go on."}]},
                {"role": "system", "content": "Environment: linux"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "forged", "signature": "anthropic-signature"},
                    {"type": "redacted_thinking", "data": "xxx"}, {"type": "text", "text": "Done."}]}]}
        chat, notes = dp.anthropic_to_chat(body, STATE)
        self.assertEqual(chat["messages"], [
            {"role": "system", "content": "You are Claude Code.\nBe brief."},
            {"role": "user", "content": "Read a.py\n" + dp.IMAGE_NOTE},
            {"role": "assistant", "content": "Sure.", "reasoning_content": "my reasoning", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "[error] boom"},
            {"role": "user", "content": "Go on."},
            {"role": "system", "content": "Environment: linux"},
            {"role": "assistant", "content": "Done."}])
        self.assertEqual([tool["function"]["name"] for tool in chat["tools"]], ["read_file"])
        self.assertEqual(chat["tool_choice"], {"type": "function", "function": {"name": "read_file"}})
        self.assertEqual(chat["stop"], ["END"])
        self.assertIn("image replaced by a note", notes)
        self.assertTrue(any("web_search" in note for note in notes))

    def test_seals_are_the_proxys_own(self):
        token = dp.seal(STATE, "r\u00e9sum\u00e9 \U0001F600")
        self.assertEqual(dp.unseal(STATE, token), "r\u00e9sum\u00e9 \U0001F600")
        other = dp.ProxyState(persist=False, api_key="another key")
        self.assertIsNone(dp.unseal(other, token))
        self.assertIsNone(dp.unseal(STATE, token[:-1] + ("0" if token[-1] != "0" else "1")))
        for junk in (None, "", "dsp1.", "dsp1.a.b.c", 5):
            self.assertIsNone(dp.unseal(STATE, junk))

    def test_malformed_requests_are_400s_in_anthropics_shape(self):
        for body in ({}, {"messages": []}, {"messages": "x"}, {"messages": [{"role": "bot", "content": "x"}]},
                     {"messages": [{"role": "user", "content": 5}]},
                     {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
                     {"messages": [{"role": "user", "content": "x"}], "system": 5},
                     {"messages": [{"role": "user", "content": "x"}], "tools": [{}]},
                     {"messages": [{"role": "user", "content": "x"}], "stop_sequences": "END"}):
            with self.assertRaises(dp.ClientError, msg=body) as caught:
                dp.anthropic_to_chat(body, STATE)
            self.assertEqual(caught.exception.status, 400)


class ThroughTheProxy(ProxyTestCase):
    def post(self, body, path="/v1/messages?beta=true", headers=None):
        return self.proxy.request("POST", path, json.dumps(body).encode(),
                                  dict({"x-api-key": "anything", "anthropic-version": "2023-06-01"}, **(headers or {})))

    def test_errors_use_anthropics_envelope(self):
        status, _, raw = self.post({"model": "claude", "max_tokens": 5})
        self.assertEqual(status, 400)
        error = json.loads(raw)
        self.assertEqual(error["type"], "error")
        self.assertEqual(error["error"]["type"], "invalid_request_error")
        self.fake.failures.extend([("status", 429, {"error": {"message": "slow down"}})] * 3)
        status, _, raw = self.post({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 429)
        self.assertEqual(json.loads(raw)["error"], {"type": "rate_limit_error", "message": "slow down"})

    def test_count_tokens_calls_nobody(self):
        status, _, raw = self.post({"model": "claude", "messages": [{"role": "user", "content": "hello " * 100}],
                                    "tools": TOOLS}, path="/v1/messages/count_tokens?beta=true")
        self.assertEqual(status, 200)
        self.assertGreater(json.loads(raw)["input_tokens"], 100)
        self.assertEqual(self.fake.requests, [])

    def test_raw_stream_has_the_full_event_sequence(self):
        self.fake.responder = lambda body, number: Answer(content="Hi there.", reasoning="Let me think.",
                                                          tool_calls=[("read_file", {"path": "a.py"})])
        self.fake.keepalive_comments = 1
        status, headers, raw = self.post({"model": "claude", "max_tokens": 100, "stream": True, "tools": TOOLS,
                                          "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200)
        events = [block.split("\n")[0][len("event: "):] for block in raw.decode().strip().split("\n\n")]
        self.assertEqual(events[0], "message_start")
        self.assertIn("ping", events)
        self.assertEqual(events[-2:], ["message_delta", "message_stop"])
        starts = [json.loads(block.split("\n")[1][6:])["content_block"]["type"]
                  for block in raw.decode().split("\n\n") if block.startswith("event: content_block_start")]
        self.assertEqual(starts, ["thinking", "text", "tool_use"])
        self.assertEqual(events.count("content_block_stop"), 3)


@unittest.skipIf(anthropic is None, "the anthropic SDK is not installed (pip install -r requirements-dev.txt)")
class AnthropicSDK(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.fake.responder = agent_responder

    def client(self, **kwargs):
        return anthropic.Anthropic(base_url="http://127.0.0.1:%d" % self.proxy.port, api_key="anything",
                                   max_retries=0, **kwargs)

    def run_loop(self, stream, keep_thinking):
        client = self.client()
        messages = [{"role": "user", "content": "Read the files (stream=%s, keep=%s)." % (stream, keep_thinking)}]
        for _ in range(4):
            kwargs = dict(model="claude-opus-5-5", max_tokens=8000, messages=messages, tools=TOOLS,
                          system=[{"type": "text", "text": "You are a coding agent."}])
            if stream:
                with client.messages.stream(**kwargs) as events:
                    message = events.get_final_message()
            else:
                message = client.messages.create(**kwargs)
            self.assertEqual(message.model, "claude-opus-5-5")
            if message.stop_reason != "tool_use":
                return message
            content = [block.model_dump(exclude_none=True) for block in message.content
                       if keep_thinking or block.type != "thinking"]
            messages.append({"role": "assistant", "content": content})
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": block.id, "content": "contents of " + block.input["path"]}
                for block in message.content if block.type == "tool_use"]})
        self.fail("the loop did not end")

    def assert_reasoning_came_back_exactly(self):
        assert_upstream_reasoning_exact(self, self.fake)

    def test_tool_loop_without_thinking_sent_back(self):
        for stream in (False, True):
            final = self.run_loop(stream, keep_thinking=False)
            self.assertEqual(final.stop_reason, "end_turn")
            self.assertEqual([block.type for block in final.content], ["thinking", "text"])
            self.assertEqual(final.content[1].text, "All read.")
        self.assert_reasoning_came_back_exactly()

    def test_tool_loop_with_thinking_sent_back(self):
        final = self.run_loop(True, keep_thinking=True)
        self.assertEqual(final.content[-1].text, "All read.")
        self.assert_reasoning_came_back_exactly()
        self.assertGreater(final.usage.cache_read_input_tokens, 0)
        self.assertEqual(final.usage.input_tokens + final.usage.cache_read_input_tokens,
                         self.fake.usages[-1]["prompt_tokens"])

    def test_tool_use_blocks_and_parallel_calls(self):
        message = self.client().messages.create(model="claude", max_tokens=10, tools=TOOLS,
                                                messages=[{"role": "user", "content": "go"}])
        self.assertEqual(message.stop_reason, "tool_use")
        self.assertEqual([(b.type, getattr(b, "input", None)) for b in message.content],
                         [("thinking", None), ("tool_use", {"path": "f0.py"}), ("tool_use", {"path": "g.py"})])
        self.assertEqual(self.fake.requests[-1]["tools"][0]["function"]["name"], "read_file")

    def test_typed_errors(self):
        client = self.client()
        with self.assertRaises(anthropic.BadRequestError):
            client.messages.create(model="claude", max_tokens=10, messages=[])
        for status, exception in ((429, anthropic.RateLimitError), (500, anthropic.InternalServerError),
                                  (401, anthropic.AuthenticationError)):
            self.fake.failures.extend([("status", status, {"error": {"message": "injected"}})] * 3)
            with self.assertRaises(exception):
                client.messages.create(model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
            self.fake.failures.clear()
        keyed = self.start_proxy(["--proxy-key", "local-secret"])
        with self.assertRaises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url="http://127.0.0.1:%d" % keyed.port, api_key="wrong",
                                max_retries=0).messages.create(model="c", max_tokens=5,
                                                               messages=[{"role": "user", "content": "hi"}])
        ok = anthropic.Anthropic(base_url="http://127.0.0.1:%d" % keyed.port, api_key="local-secret", max_retries=0)
        self.assertEqual(ok.messages.create(model="c", max_tokens=5, messages=[
            {"role": "user", "content": "hi"}]).stop_reason, "tool_use")

    def test_error_mid_stream(self):
        self.fake.failures.append(("break", 3))
        with self.assertRaises(anthropic.APIError):
            with self.client().messages.stream(model="c", max_tokens=5, tools=TOOLS,
                                               messages=[{"role": "user", "content": "hi"}]) as events:
                events.get_final_message()

    def test_count_tokens_and_models(self):
        client = self.client()
        self.assertGreater(client.messages.count_tokens(model="c", messages=[
            {"role": "user", "content": "hello"}]).input_tokens, 0)
        self.assertEqual(client.models.list().data[0].id, "deepseek-v4-flash")


if __name__ == "__main__":
    unittest.main()
