"""Every field of a valid request of each front, turned into each JSON type: the proxy answers 4xx
in the front's own error shape or 200, never a 5xx and never a broken stream (issue 20, class 8).
The same bodies go through /v1/proxy/explain."""

import json
import unittest

from helpers import ProxyTestCase
from test_forward import Canned, Recorder
import deepseek_proxy as dp

CHAT = {"model": "gpt-4o", "stream": True, "stop": ["END"],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "function": {"name": "read_file", "description": "Read",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "messages": [{"role": "system", "content": "Be brief. Answer in json."},
                     {"role": "user", "content": [{"type": "text", "text": "Read a.py"}]},
                     {"role": "assistant", "content": None, "reasoning_content": "r", "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "read_file", "arguments": "{\"path\": \"a.py\"}"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "print(1)"}]}

ANTHROPIC = {"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": True, "metadata": {"user_id": "u"},
             "system": [{"type": "text", "text": "Be brief."}], "stop_sequences": ["END"],
             "thinking": {"type": "enabled", "budget_tokens": 1024},
             "tools": [{"name": "read_file", "description": "Read", "input_schema": {"type": "object"}}],
             "tool_choice": {"type": "auto"},
             "messages": [{"role": "user", "content": "Read a.py"},
                          {"role": "assistant", "content": [
                              {"type": "thinking", "thinking": "t", "signature": "dsp1.x.y"},
                              {"type": "text", "text": "Reading."},
                              {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a.py"}}]},
                          {"role": "user", "content": [
                              {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": False,
                               "content": [{"type": "text", "text": "print(1)"}]}]}]}

RESPONSES = {"model": "gpt-5.5", "stream": True, "store": True, "instructions": "Be brief.",
             "metadata": {"k": "v"}, "include": ["reasoning.encrypted_content"],
             "text": {"format": {"type": "text"}}, "reasoning": {"effort": "low"},
             "tool_choice": "auto",
             "tools": [{"type": "function", "name": "read_file", "description": "Read",
                        "parameters": {"type": "object"}},
                       {"type": "custom", "name": "apply_patch", "description": "Patch",
                        "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
                       {"type": "namespace", "name": "fs", "tools": [{"type": "function", "name": "ls"}]}],
             "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Read a.py"}]},
                       {"type": "reasoning", "summary": [], "encrypted_content": "dsp1.x.y"},
                       {"type": "function_call", "call_id": "c1", "name": "read_file", "arguments": "{}"},
                       {"type": "function_call_output", "call_id": "c1", "output": "print(1)"},
                       {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "x"},
                       {"type": "custom_tool_call_output", "call_id": "c2", "output": "done"}]}

STREAM_ERRORS = (b'data: {"error"', b"event: error", b"event: response.failed")
REPLACEMENTS = (None, True, 7, 1.5, "\ud800x", "dsp1.\u00e9.\u00e9", [], {}, [1], {"a": 1})


def paths(value, prefix=()):
    """Every path into a JSON value (object keys and array indexes), outermost first."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, prefix + (index,))


def replaced(value, path, new):
    body = json.loads(json.dumps(value))
    if not path:
        return new
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return body


def canned_answer(stream):
    """DeepSeek's answer, whole or streamed, as forward() reads it."""
    chunks = [{"id": "x", "object": "chat.completion.chunk", "model": "deepseek-v4-flash",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage}
              for delta, finish, usage in (({"reasoning_content": "r"}, None, None), ({"content": "ok"}, None, None),
                                           ({}, "stop", {"prompt_tokens": 10, "completion_tokens": 2}))]
    if stream:
        data = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"
    else:
        data = json.dumps({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2}}).encode()
    return Canned(data)


class EveryFieldEveryType(unittest.TestCase):
    """The front and explain, driven as the HTTP layer drives them (the body parsed and cleaned of
    lone surrogates as read_json_body does), with a canned DeepSeek: thousands of requests in a second."""

    def check_front(self, front, body):
        state = dp.ProxyState(persist=False, api_key="sk-fuzz")
        failures = []
        for field in paths(body):
            for new in REPLACEMENTS:
                raw = json.dumps(replaced(body, field, new)).encode()
                where = "%s = %r" % ("/".join(map(str, field)), new)
                for route in ("front", "explain"):
                    try:
                        mutated = dp.without_lone_surrogates(json.loads(raw))
                        if route == "explain":
                            json.dumps(dp.explain(mutated, state))
                            continue
                        exchange = front.exchange(mutated, state)
                        prepared = dp.prepare(exchange.chat_body, state, client_body=mutated)
                        writer = Recorder()
                        outcome = dp.forward(prepared, exchange, front, writer,
                                             upstream=lambda p: canned_answer(bool(p.upstream_body.get("stream"))))
                    except dp.ClientError as error:
                        if error.status >= 500 or not is_error_shape(front, front.error(error.status, error.message,
                                                                                        error.code)):
                            failures.append("%s %s: %d" % (route, where, error.status))
                        continue
                    except Exception as error:  # what HTTP would have answered 500
                        failures.append("%s %s: %s: %s" % (route, where, type(error).__name__, error))
                        continue
                    data = writer.body
                    if outcome.status != 200 or any(mark in data for mark in STREAM_ERRORS):
                        failures.append("%s %s: status %d, %r" % (route, where, outcome.status, data[-200:]))
                    json.dumps(mutated)  # what the dumps and /stats hold must encode
        self.assertEqual(failures, [], "\n".join(failures[:20]))

    def test_chat(self):
        self.check_front(dp.ChatFront, CHAT)

    def test_anthropic(self):
        self.check_front(dp.AnthropicFront, ANTHROPIC)

    def test_responses(self):
        self.check_front(dp.ResponsesFront, RESPONSES)


class ThroughHTTP(ProxyTestCase):
    """A sample through the real HTTP layer: wrong types answered 4xx in the front's shape."""

    def test_a_few_fields_of_each_front(self):
        for front, path, body in (("chat", "/v1/chat/completions", CHAT), ("anthropic", "/v1/messages", ANTHROPIC),
                                  ("responses", "/v1/responses", RESPONSES)):
            for field in list(paths(body))[1:12]:
                for new in (7, "\ud800x", {"a": 1}):
                    status, _, raw = self.proxy.request("POST", path, json.dumps(replaced(body, field, new)).encode())
                    self.assertLess(status, 500, "%s %s = %r" % (front, field, new))
                    if status >= 400:
                        self.assertTrue(is_error_shape(front, json.loads(raw)), (front, field, new))


def is_error_shape(front, payload):
    if front in ("anthropic", dp.AnthropicFront):
        return payload.get("type") == "error" and isinstance(payload["error"].get("message"), str)
    return isinstance(payload.get("error"), dict) and isinstance(payload["error"].get("message"), str)


if __name__ == "__main__":
    unittest.main()
