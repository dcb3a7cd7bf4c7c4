"""Every field of a valid request of each front, turned into each JSON type: the proxy answers 4xx
in the front's own error shape or 200, never a 5xx and never a broken stream (issue 20, class 8).
The same bodies go through /v1/proxy/explain."""

import json
import unittest

from helpers import ProxyTestCase

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


def is_error_shape(front, payload):
    if front == "anthropic":
        return payload.get("type") == "error" and isinstance(payload["error"].get("message"), str)
    return isinstance(payload.get("error"), dict) and isinstance(payload["error"].get("message"), str)


class EveryFieldEveryType(ProxyTestCase):
    proxy_args = ("--log-level", "ERROR")

    def check_front(self, front, path, body):
        failures = []
        for field in paths(body):
            for new in REPLACEMENTS:
                mutated = replaced(body, field, new)
                for route in (path, "/v1/proxy/explain"):
                    data = json.dumps(mutated).encode()
                    status, headers, raw = self.proxy.request("POST", route, data)
                    where = "%s %s = %r" % (route, "/".join(map(str, field)), new)
                    if status >= 500:
                        failures.append("%s: %d %s" % (where, status, raw[:200]))
                    elif status >= 400:
                        if route == path and not is_error_shape(front, json.loads(raw)):
                            failures.append("%s: %d not in the front's error shape" % (where, status))
                    elif headers.get("Content-Type", "").startswith("text/event-stream"):
                        if b"HTTP/1.1" in raw or any(mark in raw for mark in STREAM_ERRORS) \
                                or not raw.endswith(b"\n\n"):
                            failures.append("%s: broken stream %r" % (where, raw[-200:]))
        self.assertEqual(failures, [], "\n".join(failures[:20]))

    def test_chat(self):
        self.check_front("chat", "/v1/chat/completions", CHAT)

    def test_anthropic(self):
        self.check_front("anthropic", "/v1/messages", ANTHROPIC)

    def test_responses(self):
        self.check_front("responses", "/v1/responses", RESPONSES)


if __name__ == "__main__":
    unittest.main()
