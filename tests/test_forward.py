"""The relay as a pure function: forward(prepared, exchange, front, writer, upstream) driven with
canned DeepSeek bytes and a recording writer, no HTTP. SSE framing DeepSeek may send, per-event and
per-answer limits, and each front's stream contract event by event."""

import io
import json
import logging
import re
import unittest

import deepseek_proxy as dp

STATE = dp.ProxyState(persist=False, api_key="sk-forward-test")
logging.getLogger("deepseek_proxy").addHandler(logging.NullHandler())


class Canned:
    """An upstream response made of fixed bytes (what open_upstream returns, for the relay)."""

    def __init__(self, data):
        self.stream = io.BytesIO(data)

    def read(self, limit):
        data = self.stream.read(limit + 1)
        if len(data) > limit:
            raise dp.UpstreamError(502, dp.error_body("too long", "upstream_error"))
        return data

    def readline(self, limit):
        return self.stream.readline(limit)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class Recorder(dp.Writer):
    def __init__(self):
        self.status, self.headers, self.pieces, self.ended, self.was_broken = None, None, [], False, False

    def send(self, status, data, headers):
        self.status, self.headers, self.pieces = status, headers, [data]

    def open_stream(self, headers):
        self.status, self.headers = 200, headers

    def write(self, data):
        if data:
            self.pieces.append(data)

    def end(self):
        self.ended = True

    def broken(self):
        self.was_broken = True

    @property
    def body(self):
        return b"".join(self.pieces)

    def events(self):
        """(event name or None, parsed data) of each SSE event written."""
        found = []
        for block in re.split(r"\r?\n\r?\n", self.body.decode()):
            name, data = None, None
            for line in block.splitlines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data:"):
                    text = line[5:].strip()
                    data = text if text == "[DONE]" else json.loads(text)
            if name or data:
                found.append((name, data))
        return found


def chunk(delta=None, finish=None, usage=None):
    return {"id": "x", "object": "chat.completion.chunk", "model": "deepseek-v4-flash",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], "usage": usage}


USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "prompt_cache_hit_tokens": 64,
         "prompt_cache_miss_tokens": 36, "completion_tokens_details": {"reasoning_tokens": 5}}


def sse(chunks, separator=b"\n", space=True):
    lines = []
    for item in chunks:
        data = item if isinstance(item, bytes) else json.dumps(item).encode()
        lines.append((b"data: " if space else b"data:") + data + separator + separator)
    return b"".join(lines)


def run(front, body, data, state=STATE):
    exchange = front.exchange(body, state)
    prepared = dp.prepare(exchange.chat_body, state, client_body=body)
    writer = Recorder()
    outcome = dp.forward(prepared, exchange, front, writer, upstream=lambda _: Canned(data))
    return outcome, writer, prepared


THINKING_TOOL_ANSWER = [
    chunk({"role": "assistant", "content": None, "reasoning_content": ""}),
    chunk({"reasoning_content": "Think "}), chunk({"reasoning_content": "hard."}),
    chunk({"content": "Reading."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "read_file", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"path\": "}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"a.py\"}"}}]}),
    chunk({}, "tool_calls", USAGE), b"[DONE]"]
TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]


class Framing(unittest.TestCase):
    def chat(self, data, **extra):
        return run(dp.ChatFront, dict({"model": "x", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                                      **extra), data)

    def test_data_without_a_space_comments_and_crlf(self):
        answer = [chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop", USAGE), b"[DONE]"]
        for separator in (b"\n", b"\r\n"):
            for space in (True, False):
                data = b": keep-alive" + separator + separator + sse(answer, separator, space)
                outcome, writer, prepared = self.chat(data)
                self.assertEqual(outcome.status, 200, (separator, space))
                self.assertTrue(writer.ended)
                self.assertEqual(outcome.usage, USAGE)
                self.assertEqual("".join(c["choices"][0]["delta"].get("content") or "" for _, c in writer.events()
                                         if isinstance(c, dict) and "choices" in c), "Hello")
                self.assertIn(b": keep-alive", writer.body, "a comment is relayed as a keep-alive")

    def test_the_last_event_without_its_blank_line(self):
        data = sse([chunk({"content": "x"}), chunk({}, "stop", USAGE)]) + b"data: [DONE]"
        outcome, writer, _ = self.chat(data)
        self.assertEqual(outcome.status, 200)
        self.assertTrue(writer.body.endswith(b"data: [DONE]\n"))

    def test_an_event_over_the_size_limit_is_an_error_event(self):
        state = dp.ProxyState(dp.Config(MAX_UPSTREAM_EVENT_BYTES=1000), persist=False, api_key="k")
        data = sse([chunk({"content": "x" * 900}), chunk({}, "stop", USAGE), b"[DONE]"])  # just over 1000
        outcome, writer, _ = run(dp.ChatFront, {"model": "x", "stream": True,
                                                "messages": [{"role": "user", "content": "hi"}]}, data, state)
        self.assertEqual(outcome.status, 502)
        self.assertTrue(writer.was_broken)
        self.assertIn("over 1000 bytes", writer.body.decode())

    def test_a_stream_that_stops_early_is_failed(self):
        outcome, writer, _ = self.chat(sse([chunk({"content": "x"})]))
        self.assertEqual(outcome.status, 502)
        self.assertIn(b"closed the stream before its end", writer.body)

    def test_a_stream_that_ends_after_its_finish_chunk_is_whole(self):
        outcome, writer, _ = self.chat(sse([chunk({"content": "x"}), chunk({}, "stop", USAGE)]))
        self.assertEqual(outcome.status, 200)
        self.assertNotIn(b"error", writer.body)

    def test_whole_answers_and_upstream_errors(self):
        answer = {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], "usage": USAGE}
        outcome, writer, _ = run(dp.ChatFront, {"model": "x", "messages": [{"role": "user", "content": "q"}]},
                                 json.dumps(answer).encode())
        self.assertEqual((outcome.status, json.loads(writer.body)["choices"][0]["message"]["content"]), (200, "hi"))
        self.assertEqual(writer.headers["X-Proxy-Cache-Hit-Tokens"], "64")

        def refused(_):
            raise dp.UpstreamError(400, dp.error_body("bad", "invalid_request_error", "x"), retry_after=2)
        exchange = dp.AnthropicFront.exchange({"model": "c", "max_tokens": 5, "messages": [
            {"role": "user", "content": "q"}]}, STATE)
        prepared = dp.prepare(exchange.chat_body, STATE)
        writer = Recorder()
        outcome = dp.forward(prepared, exchange, dp.AnthropicFront, writer, upstream=refused)
        self.assertEqual((outcome.status, writer.status), (400, 400))
        self.assertEqual(json.loads(writer.body)["type"], "error", "in Anthropic's envelope")
        self.assertEqual(writer.headers["Retry-After"], "2")


class StreamContracts(unittest.TestCase):
    def test_chat_passes_every_chunk_through_unchanged(self):
        data = sse(THINKING_TOOL_ANSWER)
        outcome, writer, _ = run(dp.ChatFront, {"model": "x", "stream": True, "tools": TOOLS,
                                                "messages": [{"role": "user", "content": "read"}]}, data)
        self.assertEqual(writer.body, data)
        self.assertEqual(outcome.usage, USAGE)

    def test_anthropic_event_sequence_with_a_signed_thinking_block(self):
        body = {"model": "claude", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "read"}],
                "tools": [{"name": "read_file", "input_schema": {"type": "object"}}]}
        outcome, writer, _ = run(dp.AnthropicFront, body, sse(THINKING_TOOL_ANSWER))
        self.assertEqual(outcome.status, 200)
        events = writer.events()
        names = [name for name, _ in events]
        self.assertEqual(names[0], "message_start")
        self.assertEqual(events[0][1]["message"]["model"], "claude", "the model the client asked for")
        starts = [data["content_block"]["type"] for name, data in events if name == "content_block_start"]
        self.assertEqual(starts, ["thinking", "text", "tool_use"])
        self.assertEqual(names.count("content_block_stop"), 3)
        signature = [data["delta"]["signature"] for name, data in events
                     if name == "content_block_delta" and data["delta"]["type"] == "signature_delta"]
        self.assertEqual(len(signature), 1)
        self.assertEqual(dp.unseal(STATE, signature[0]), "Think hard.")
        arguments = "".join(data["delta"]["partial_json"] for name, data in events
                            if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta")
        self.assertEqual(json.loads(arguments), {"path": "a.py"})
        final = [data for name, data in events if name == "message_delta"][0]
        self.assertEqual(final["delta"]["stop_reason"], "tool_use")
        self.assertEqual(final["usage"], {"input_tokens": 36, "cache_read_input_tokens": 64,
                                          "cache_creation_input_tokens": 0, "output_tokens": 20})
        self.assertEqual(names[-1], "message_stop")

    def test_responses_event_sequence_and_incomplete_on_length(self):
        body = {"model": "gpt-5.5", "stream": True, "input": "read", "include": ["reasoning.encrypted_content"],
                "tools": [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]}
        outcome, writer, _ = run(dp.ResponsesFront, body, sse(THINKING_TOOL_ANSWER))
        events = writer.events()
        names = [name for name, _ in events]
        self.assertEqual(names[:2], ["response.created", "response.in_progress"])
        self.assertEqual([data["sequence_number"] for _, data in events], list(range(len(events))))
        added = [data["item"]["type"] for name, data in events if name == "response.output_item.added"]
        self.assertEqual(added, ["reasoning", "message", "function_call"])
        done = [data["item"] for name, data in events if name == "response.output_item.done"]
        self.assertEqual(dp.unseal(STATE, done[0]["encrypted_content"]), "Think hard.")
        self.assertEqual(json.loads(done[2]["arguments"]), {"path": "a.py"})
        self.assertEqual(names[-1], "response.completed")
        self.assertEqual(events[-1][1]["response"]["usage"]["input_tokens_details"]["cached_tokens"], 64)

        cut = [chunk({"content": "partial"}), chunk({}, "length", USAGE), b"[DONE]"]
        outcome, writer, _ = run(dp.ResponsesFront, dict(body, tools=None), sse(cut))
        last = writer.events()[-1]
        self.assertEqual(last[0], "response.incomplete")
        self.assertEqual(last[1]["response"]["incomplete_details"], {"reason": "max_output_tokens"})

    def test_an_error_mid_stream_in_each_front(self):
        broken = sse([chunk({"content": "x"})])
        expected = {dp.ChatFront: b'data: {"error"', dp.AnthropicFront: b"event: error",
                    dp.ResponsesFront: b"event: response.failed"}
        bodies = {dp.ChatFront: {"model": "x", "stream": True, "messages": [{"role": "user", "content": "q"}]},
                  dp.AnthropicFront: {"model": "c", "max_tokens": 5, "stream": True,
                                      "messages": [{"role": "user", "content": "q"}]},
                  dp.ResponsesFront: {"model": "g", "stream": True, "input": "q"}}
        for front, mark in expected.items():
            outcome, writer, _ = run(front, bodies[front], broken)
            self.assertEqual(outcome.status, 502, front)
            self.assertIn(mark, writer.body, front)


if __name__ == "__main__":
    unittest.main()


class EdgesTheMutantsFound(unittest.TestCase):
    """Behaviour an outside mutation pass showed untested (bench/mutate.py)."""

    def test_hunk_headers_are_unified_diff_on_both_sides(self):
        old = ["a", "b", "c", "d"]
        self.assertEqual(dp.line_delta(old, ["a", "b", "x", "c", "d"]), "@@ -2,0 +3,1 @@\n+x")
        self.assertEqual(dp.line_delta(old, ["a", "d"]), "@@ -2,2 +1,0 @@\n-b\n-c")
        self.assertEqual(dp.line_delta(old, ["a", "B", "c", "d"]), "@@ -2,1 +2,1 @@\n-b\n+B")
        self.assertEqual(dp.line_delta(["k%d" % n for n in range(10)], ["k0", "k9"]), "@@ -2,8 +1,0 @@\n-[8 lines]")

    def test_the_window_fallback_sends_a_delta_whole_when_its_anchor_is_cut(self):
        state = dp.ProxyState(dp.Config(UPSTREAM_CONTEXT_WINDOW=3000, MAX_OUTPUT_TOKENS=500), persist=False,
                              api_key="")
        ctx = dp.RequestContext({}, state)
        big = "filler line of an old turn that will be dropped\n" * 500
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"},
                    {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"},
                    {"role": "assistant", "content": big}, {"role": "user", "content": "a delta of message 4"},
                    {"role": "assistant", "content": "ok"}, {"role": "user", "content": "last"}]
        ctx.base = [dict(message) for message in messages]
        ctx.base[5] = {"role": "user", "content": "the whole text the client sent"}
        ctx.anchor(5, 4)
        sent = [message["content"] for message in dp.fit_upstream_window(messages, ctx)]
        self.assertFalse(big in sent, "the old turn was dropped")
        self.assertTrue("the whole text the client sent" in sent, "the delta went whole: %s" % [t[:30] for t in sent])

    def test_the_aider_stage_steps_aside_near_the_budget(self):
        from test_ephemeral import AiderConversation
        state = dp.ProxyState(dp.Config(MAX_CONTEXT=2000), persist=False, api_key="")
        aider = AiderConversation()
        sent = None
        for text in ("one", "two", "three"):
            messages = aider.request(text)
            ctx = dp.RequestContext({}, state)
            ctx.normalised = ctx.base = messages
            sent = dp.keep_ephemeral_blocks(messages, ctx)
            for remember in ctx.kept:
                remember()
            aider.answered(text, "done")
        self.assertIs(sent, messages, "past the watermark the request goes as the client built it")


class RoutesRefuseBrowsers(unittest.TestCase):
    """The Host, Origin and Content-Type checks on every route of the route table."""

    def test_every_post_route(self):
        from helpers import FakeDeepSeek, Proxy
        import shutil
        import tempfile
        fake = FakeDeepSeek("sk-x").start()
        self.addCleanup(fake.stop)
        data = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, data, True)
        proxy = Proxy(fake.url, data, key="sk-x")
        self.addCleanup(proxy.stop)
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]}).encode()
        routes = ("/v1/chat/completions", "/chat/completions", "/v1/messages", "/v1/messages/count_tokens",
                  "/v1/responses", "/responses", "/v1/proxy/explain", "/proxy/explain")
        self.assertEqual(set(routes) - set(dp.API_POST_PATHS), set(), "every POST route takes JSON only")
        for path in routes:
            self.assertEqual(proxy.request("POST", path, body, {"Content-Type": "text/plain"})[0], 415, path)
            self.assertEqual(proxy.request("POST", path, body, {"Origin": "http://evil.example"})[0], 403, path)
            self.assertEqual(proxy.request("POST", path, body, {"Host": "evil.example:%d" % proxy.port})[0], 403,
                             path)
        for path in ("/stats", "/health", "/v1/models", "/", "/v1/responses/x"):
            self.assertEqual(proxy.request("GET", path, headers={"Host": "127.1.example"})[0], 403, path)
        self.assertEqual(fake.requests, [])
