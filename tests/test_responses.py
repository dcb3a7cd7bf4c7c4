"""The OpenAI Responses front: translation as pure functions, then the OpenAI SDK through the proxy."""

import json
import unittest

from helpers import API_KEY, ProxyTestCase, assert_upstream_reasoning_exact
import deepseek_proxy as dp
from fake_deepseek import Answer

try:
    import openai
except ImportError:  # test-only dependency (requirements-dev.txt)
    openai = None

STATE = dp.ProxyState(persist=False, api_key=API_KEY)
TOOLS = [{"type": "function", "name": "read_file", "description": "Read a file", "strict": False,
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch.",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: patch"}}
PATCH = "*** Begin Patch\n*** Update File: a.py\n@@\n-x = 1\n+x = 2\n*** End Patch\n"


def agent_responder(body, number):
    rounds = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if rounds < 2:
        calls = [("read_file", {"path": "f%d.py" % rounds})] + ([("read_file", {"path": "g.py"})] if not rounds else [])
        return Answer(content="", reasoning="think %d #%d" % (rounds, number), tool_calls=calls)
    return Answer(content="All read.", reasoning="done #%d" % number)


class Translation(unittest.TestCase):
    def test_items_tools_and_history(self):
        sealed = dp.seal(STATE, "earlier reasoning")
        body = {"model": "gpt-5-codex", "instructions": "Be careful.", "store": False,
                "tools": TOOLS + [APPLY_PATCH, {"type": "web_search"},
                                  {"type": "namespace", "name": "github", "description": "GitHub", "tools": [
                                      {"type": "function", "name": "open_pr", "parameters": {"type": "object"}}]}],
                "input": [
                    {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
                    {"role": "user", "content": "Fix a.py"},
                    {"type": "reasoning", "summary": [], "encrypted_content": sealed},
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "On it."}]},
                    {"type": "function_call", "call_id": "call_1", "name": "read_file", "arguments": '{"path":"a.py"}'},
                    {"type": "function_call_output", "call_id": "call_1", "output": "x = 1"},
                    {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-not-ours"},
                    {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": PATCH},
                    {"type": "function_call", "call_id": "call_3", "name": "open_pr", "namespace": "github",
                     "arguments": "{}"},
                    {"type": "custom_tool_call_output", "call_id": "call_2", "output": "Done"},
                    {"type": "function_call_output", "call_id": "call_3", "output": [{"type": "input_text", "text": "PR 7"}]},
                    {"role": "user", "content": [{"type": "input_image", "image_url": "data:..."}]}]}
        exchange = dp.ResponsesExchange(body, STATE)
        self.assertEqual(exchange.chat_body["messages"], [
            {"role": "system", "content": "Be careful."},
            {"role": "developer", "content": "Rules."},
            {"role": "user", "content": "Fix a.py"},
            {"role": "assistant", "content": "On it.", "reasoning_content": "earlier reasoning", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path":"a.py"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "x = 1"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_2", "type": "function", "function": {"name": "apply_patch",
                                                                  "arguments": json.dumps({"input": PATCH})}},
                {"id": "call_3", "type": "function", "function": {"name": "github__open_pr", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_2", "content": "Done"},
            {"role": "tool", "tool_call_id": "call_3", "content": "PR 7"},
            {"role": "user", "content": dp.IMAGE_NOTE}])
        names = [tool["function"]["name"] for tool in exchange.chat_body["tools"]]
        self.assertEqual(names, ["read_file", "apply_patch", "github__open_pr"])
        self.assertIn("input", exchange.chat_body["tools"][1]["function"]["parameters"]["properties"])
        self.assertTrue(any("web_search" in note for note in exchange.notes))
        custom = exchange.tools.item({"id": "c9", "function": {"name": "apply_patch",
                                                                "arguments": json.dumps({"input": PATCH})}}, "ctc_1")
        self.assertEqual((custom["type"], custom["input"]), ("custom_tool_call", PATCH))
        spaced = exchange.tools.item({"id": "c8", "function": {"name": "github__open_pr", "arguments": "{}"}}, "fc_1")
        self.assertEqual((spaced["name"], spaced["namespace"]), ("open_pr", "github"))

    def test_the_response_is_stored_before_its_last_bytes_are_written(self):
        # a client may name it in previous_response_id the moment it has read response.completed
        state = dp.ProxyState(persist=False, api_key=API_KEY)
        for stream in (False, True):
            exchange = dp.ResponsesExchange({"input": "hi", "stream": stream}, state)
            collector = dp.AnswerCollector()
            answer = {"choices": [{"message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
            collector.feed_response(answer)
            if stream:
                exchange.stream_start()
                exchange.stream_end(collector)
            else:
                exchange.answer(json.dumps(answer).encode(), answer, collector)
            stored = state.responses.get(exchange.id)
            self.assertEqual(stored["history"][-1]["content"], "Hello.")
            follow = dp.ResponsesExchange({"input": "more", "previous_response_id": exchange.id}, state)
            self.assertEqual(follow.expanded_bytes, stored["bytes"], "naming it weighs what it holds")
            self.assertGreater(follow.expanded_bytes, 0)

    def test_malformed_requests_are_400s(self):
        for body in ([], {}, {"input": 5}, {"input": [5]}, {"input": [{"role": "robot", "content": "x"}]},
                     {"input": [{"type": "function_call", "name": "f"}]}, {"input": "x", "tools": [{}]},
                     {"input": "x", "previous_response_id": "resp_unknown"}, {"input": "x", "instructions": 5}):
            with self.assertRaises(dp.ClientError, msg=body) as caught:
                dp.ResponsesExchange(body, STATE)
            self.assertEqual(caught.exception.status, 400)


class ThroughTheProxy(ProxyTestCase):
    def post(self, body):
        return self.proxy.request("POST", "/v1/responses", json.dumps(body).encode())

    def test_unknown_previous_response_is_openais_error(self):
        status, _, raw = self.post({"model": "gpt-5", "input": "hi", "previous_response_id": "resp_nope"})
        self.assertEqual(status, 400)
        error = json.loads(raw)["error"]
        self.assertEqual((error["code"], error["param"]), ("previous_response_not_found", "previous_response_id"))

    def test_stream_events_have_growing_sequence_numbers(self):
        self.fake.responder = lambda body, n: Answer(content="Hello.", reasoning="Hmm.",
                                                     tool_calls=[("read_file", {"path": "a.py"})])
        status, _, raw = self.post({"model": "gpt-5", "input": "hi", "stream": True, "tools": TOOLS})
        self.assertEqual(status, 200)
        events = [json.loads(block.split("\ndata: ", 1)[1]) for block in raw.decode().strip().split("\n\n")]
        self.assertEqual([e["sequence_number"] for e in events], list(range(len(events))))
        kinds = [e["type"] for e in events]
        for kind in ("response.created", "response.in_progress", "response.output_item.added",
                     "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
                     "response.reasoning_summary_text.done", "response.content_part.added",
                     "response.output_text.delta", "response.output_text.done", "response.content_part.done",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done"):
            self.assertIn(kind, kinds)
        self.assertEqual(kinds[-1], "response.completed")
        final = events[-1]["response"]
        self.assertEqual([item["type"] for item in final["output"]], ["reasoning", "message", "function_call"])
        self.assertEqual(final["usage"]["input_tokens"], self.fake.usages[-1]["prompt_tokens"])


@unittest.skipIf(openai is None, "the openai SDK is not installed (pip install -r requirements-dev.txt)")
class ResponsesSDK(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.fake.responder = agent_responder

    def client(self):
        return openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.proxy.port, api_key="anything", max_retries=0)

    def create(self, stream, **kwargs):
        client = self.client()
        if not stream:
            return client.responses.create(model="gpt-5-codex", tools=TOOLS, **kwargs)
        with client.responses.stream(model="gpt-5-codex", tools=TOOLS, **kwargs) as events:
            return events.get_final_response()

    def assert_reasoning_came_back_exactly(self):
        assert_upstream_reasoning_exact(self, self.fake)

    def outputs(self, response):
        return [{"type": "function_call_output", "call_id": item.call_id, "output": "contents of " +
                 json.loads(item.arguments)["path"]} for item in response.output if item.type == "function_call"]

    def test_stateless_loop_like_codex(self):
        for stream in (False, True):
            items = [{"role": "user", "content": "Read the files (stream=%s)." % stream}]
            for _ in range(4):
                response = self.create(stream, input=items, store=False, include=["reasoning.encrypted_content"])
                if response.output_text:
                    break
                items += [item.model_dump(exclude_none=True) for item in response.output] + self.outputs(response)
            self.assertEqual(response.output_text, "All read.")
            self.assertTrue(response.output[0].encrypted_content.startswith("dsp1."))
        self.assert_reasoning_came_back_exactly()
        self.assertEqual(self.proxy.state.responses.items, {}, "store: false keeps nothing")

    def test_loop_with_previous_response_id(self):
        for stream in (False, True):
            response = self.create(stream, input="Read the files (stream=%s)." % stream)
            for _ in range(3):
                if response.output_text:
                    break
                response = self.create(stream, input=self.outputs(response), previous_response_id=response.id)
            self.assertEqual(response.output_text, "All read.")
        self.assert_reasoning_came_back_exactly()
        self.assertEqual(self.client().responses.retrieve(response.id).output_text, "All read.")
        with self.assertRaises(openai.BadRequestError) as caught:
            self.create(False, input="x", previous_response_id="resp_unknown")
        self.assertEqual(caught.exception.code, "previous_response_not_found")

    def test_apply_patch_arrives_as_a_custom_tool_call(self):
        self.fake.responder = lambda body, n: Answer(reasoning="edit", tool_calls=[("apply_patch", {"input": PATCH})])
        for stream in (False, True):
            client = self.client()
            if stream:
                with client.responses.stream(model="gpt-5-codex", tools=[APPLY_PATCH], input="Change x.") as events:
                    response = events.get_final_response()
            else:
                response = client.responses.create(model="gpt-5-codex", tools=[APPLY_PATCH], input="Change x.")
            calls = [item for item in response.output if item.type == "custom_tool_call"]
            self.assertEqual(len(calls), 1, response.output)
            self.assertEqual((calls[0].name, calls[0].input), ("apply_patch", PATCH))
            self.assertEqual(response.output_text, "")

    def test_typed_errors(self):
        client = self.client()
        for status, exception in ((429, openai.RateLimitError), (500, openai.InternalServerError)):
            self.fake.failures.extend([("status", status, {"error": {"message": "injected"}})] * 3)
            with self.assertRaises(exception):
                client.responses.create(model="gpt-5", input="hi")
            self.fake.failures.clear()
        with self.assertRaises(openai.BadRequestError):
            client.responses.create(model="gpt-5", input=[{"role": "robot", "content": "x"}])


if __name__ == "__main__":
    unittest.main()
