"""A strict fake of DeepSeek's chat API, for the proxy's tests and benchmarks, and to try clients
without a key:

    python tests/fake_deepseek.py --port 9000      # accepts the key sk-fake
    DEEPSEEK_API_KEY=sk-fake python deepseek_proxy.py --upstream http://127.0.0.1:9000

It validates requests the way DeepSeek does and answers the way DeepSeek does:
- both path prefixes, Bearer auth with DeepSeek's 401 body, GET /models;
- role `developer`, unknown message keys, n != 1, stream_options without stream, bad max_tokens,
  non-object `thinking` (422), tool_choice required/named with thinking, unanswered tool calls: rejected;
- thinking on by default; with tools, every earlier assistant turn must carry reasoning_content
  (REASONING_RULE: "all", "tool_calls" for the older rule, or "off") or the answer is DeepSeek's 400;
- streaming: role/reasoning/content phases, tool-call deltas split into argument fragments, usage on
  the finish chunk, `data: [DONE]`; optional `: keep-alive` comments and per-chunk delays;
- a prefix cache: a prompt is rendered to text, 4 characters make a token, every 128-token boundary
  of every input (and input + answer) is remembered, and a request hits the longest remembered prefix;
- error injection: HTTP statuses, dropped connections, streams that break off.

Answers come from `responder(body, number)`, which tests replace; the default is deterministic.
"""

import collections
import hashlib
import http.server
import json
import math
import re
import socket
import threading
import time
import uuid

MODELS = ("deepseek-v4-flash", "deepseek-v4-pro", "deepseek-flash")
MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "reasoning_content", "tool_calls", "prefix"},
    "tool": {"role", "content", "tool_call_id"},
}
TOP_LEVEL_FIELDS = {"model", "messages", "max_tokens", "thinking", "reasoning_effort", "stream", "stream_options",
                    "tools", "tool_choice", "response_format", "stop", "temperature", "top_p", "frequency_penalty",
                    "presence_penalty", "logprobs", "top_logprobs", "n", "user_id"}
CHARS_PER_TOKEN = 4
UNIT_TOKENS = 128
TEMPLATE_TOKENS = 12  # a request's fixed overhead (chat template), as DeepSeek's counts include one
MESSAGE_TOKENS = 4  # per message
REASONING_MISSING = "The `reasoning_content` in the thinking mode must be passed back to the API."


def error(message, error_type="invalid_request_error"):
    return {"error": {"message": message, "type": error_type, "param": None,
                      "code": "invalid_request_error"}}


class Answer:
    """What the fake model says: reasoning (thinking mode only), content, tool calls."""

    def __init__(self, content="", reasoning=None, tool_calls=None, finish_reason=None):
        self.content = content
        self.reasoning = reasoning
        self.tool_calls = tool_calls or []  # [(name, arguments dict)] or [(name, arguments, call id)]
        self.finish_reason = finish_reason


SYSTEM_SUMMARY_MARK = "Rewrite the system prompt"
CONVERSATION_SUMMARY_MARK = "Summarise the conversation"
SUMMARY_RATIO = [0.25]  # length of a summary relative to its input; tests change it


def is_summary_request(body):
    """The proxy's own summarisation calls, recognised by their instruction."""
    text = json.dumps(body.get("messages", [])[:1]) + json.dumps(body.get("messages", [])[-1:])
    return SYSTEM_SUMMARY_MARK in text or CONVERSATION_SUMMARY_MARK in text


def summary_answer(body):
    """A deterministic summary. Of a system prompt: a digest and its first SUMMARY_RATIO of
    characters. Of a conversation: a digest of the messages before the instruction and their count."""
    if SYSTEM_SUMMARY_MARK in json.dumps(body["messages"][:1]):
        text = body["messages"][-1]["content"]
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return Answer(content="SUMMARY %s: %s" % (digest, text[:int(len(text) * SUMMARY_RATIO[0])]),
                      reasoning="Summarising.")
    source = json.dumps(body["messages"][:-1], sort_keys=True)
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    texts = [m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
             for m in body["messages"][:-1] if m.get("role") in ("user", "assistant", "tool")]
    gist = " ".join(" ".join(texts).split())  # like a model's summary: shorter than what it covers, same language
    return Answer(content="SUMMARY %s of %d messages: %s" % (digest, len(body["messages"]) - 1,
                                                               gist[:max(200, int(len(gist) * SUMMARY_RATIO[0]) // 4)]),
                  reasoning="Summarising.")


def default_responder(body, number):
    if is_summary_request(body):
        return summary_answer(body)
    last = body["messages"][-1]
    text = last.get("content") if isinstance(last.get("content"), str) else json.dumps(last.get("content"))
    return Answer(content="Answer %d." % number,
                  reasoning="Reasoning %d about %s." % (number, hashlib.sha256(
                      (text or "").encode()).hexdigest()[:12]))


READ_LIKE = re.compile(r"read|view|cat|open|get_?file|file_?content|show", re.I)


def demo_agent(body, number):
    """A model for trying real clients by hand: when the request offers tools and the conversation's
    last message is the user's, it calls the first read-like tool offered (else the first tool) with
    a path-like argument; once a tool result is in, it answers with a short text naming what it read."""
    if is_summary_request(body):
        return summary_answer(body)
    tools = [tool.get("function") or {} for tool in body.get("tools") or ()]
    last = body["messages"][-1]
    if tools and last.get("role") == "user":
        tool = next((tool for tool in tools if READ_LIKE.search(tool.get("name") or "")), tools[0])
        properties = ((tool.get("parameters") or {}).get("properties") or {})
        arguments = {}
        for name, schema in properties.items():
            if (schema or {}).get("type", "string") == "string":
                arguments[name] = "README.md" if re.search(r"path|file|name|target", name, re.I) else "demo"
        required = (tool.get("parameters") or {}).get("required") or []
        arguments = {name: value for name, value in arguments.items() if name in required or len(arguments) == 1} \
            or arguments
        return Answer(content="Let me look at README.md first.", reasoning="I should read a file.",
                      tool_calls=[(tool.get("name"), arguments)])
    if last.get("role") == "tool":
        text = last.get("content") if isinstance(last.get("content"), str) else json.dumps(last.get("content"))
        return Answer(content="I read it: %d characters, starting %r. Demo answer %d." % (
            len(text or ""), (text or "")[:40], number), reasoning="The tool answered.")
    return default_responder(body, number)


def scripted(answers):
    """A responder that plays a list of answers in order (the last one again when they run out):
    each {"content": ..., "reasoning": ..., "tool_calls": [[name, {arguments}], ...]}."""
    def respond(body, number):
        if is_summary_request(body):
            return summary_answer(body)
        entry = answers[min(number - 1, len(answers) - 1)] if answers else {}
        return Answer(content=entry.get("content", ""), reasoning=entry.get("reasoning"),
                      tool_calls=[tuple(call) for call in entry.get("tool_calls") or ()],
                      finish_reason=entry.get("finish_reason"))
    return respond


def render_message(message):
    """The text the fake's tokenizer sees for one message."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    calls = [{"id": c.get("id"), "name": (c.get("function") or {}).get("name"),
              "arguments": (c.get("function") or {}).get("arguments")}
             for c in message.get("tool_calls") or ()]
    return "<|%s|>%s%s%s%s" % (message.get("role"), message.get("tool_call_id") or "",
                               message.get("reasoning_content") or "", content or "",
                               json.dumps(calls, sort_keys=True) if calls else "")


class PrefixCache:
    """DeepSeek's context cache, approximated: hits = longest remembered prefix, in 128-token units."""

    def __init__(self, capacity=500000):
        self.units = collections.OrderedDict()
        self.capacity = capacity
        self.lock = threading.Lock()

    @staticmethod
    def boundaries(text):
        step = UNIT_TOKENS * CHARS_PER_TOKEN
        digest = hashlib.sha256()
        encoded = text.encode("utf-8", "surrogatepass")
        for end in range(step, len(text) + 1, step):
            digest.update(text[end - step:end].encode("utf-8", "surrogatepass"))
            yield end // CHARS_PER_TOKEN, digest.copy().digest()
        del encoded

    def lookup(self, text):
        hit = 0
        with self.lock:
            for tokens, key in self.boundaries(text):
                if key in self.units:
                    hit = tokens
                else:
                    break
        return hit

    def remember(self, text):
        with self.lock:
            for _tokens, key in self.boundaries(text):
                self.units[key] = True
                self.units.move_to_end(key)
            while len(self.units) > self.capacity:
                self.units.popitem(last=False)


class FakeDeepSeek:
    """Run with start(); inspect .requests; configure the attributes below per test."""

    def __init__(self, api_key="sk-test-key-abcd"):
        self.api_key = api_key
        self.responder = default_responder
        self.reasoning_rule = "all"  # all | tool_calls | off
        self.strict_keys = True  # unknown keys in messages -> 400
        self.keepalive_comments = 0  # ": keep-alive" comment events before the first chunk
        self.chunk_delay = 0.0  # seconds between streamed chunks
        self.done_delay = 0.0  # seconds between the finish chunk and data: [DONE]
        self.connect_delay = 0.0  # seconds each new connection waits first (a TLS handshake's stand-in)
        self.close_idle = False  # close each connection after a whole answer without saying so (a stale keep-alive)
        self.connections = 0  # connections accepted so far
        self.sockets = set()  # open connections, closed by stop() as a process exit would
        self.reasoning_pieces = 3
        self.argument_fragment = 7  # characters per tool-call argument delta
        # ("status", code, body[, headers]) | ("raw", code, bytes) | ("redirect", code, location) |
        # ("drop",) | ("break", n_chunks) | ("sleep", seconds) | ("huge_line", bytes)
        self.failures = collections.deque()
        self.summary_failures = collections.deque()  # the same, for the proxy's summary calls only
        self.summary_delay = 0.0  # seconds a summary call takes
        self.summary_gate = None  # a threading.Event: summary calls wait for it (at most 10 s)
        self.requests = []  # every chat request body, in arrival order
        self.headers = []  # their headers
        self.answers = []  # every answer message produced
        self.exchanges = []  # (request body, answer message) of every answer, paired
        self.usages = []  # the usage of every answer, in order
        self.omit_usage = False  # answer without usage (to test "unmeasured")
        self.record = True  # keep requests, answers and usages (benchmarks turn it off)
        self.cache = PrefixCache()
        self.count_tokens = lambda text: max(1, math.ceil(len(text) / CHARS_PER_TOKEN))  # or a real tokenizer
        self.calls = 0
        self.lock = threading.Lock()
        self.server = None

    # -- lifecycle

    def start(self, host="127.0.0.1", port=0):
        fake = self
        self.connections = 0

        class Handler(FakeHandler):
            owner = fake

        http.server.ThreadingHTTPServer.request_queue_size = 256
        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.005},
                         daemon=True).start()
        return self

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            with self.lock:
                for sock in self.sockets:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self.sockets.clear()

    # -- the model

    def validate(self, body):
        """(status, error body) for a request DeepSeek would refuse, else None."""
        if not isinstance(body, dict):
            return 400, error("Failed to deserialize the JSON body into the target type")
        if body.get("model") not in MODELS:
            return 400, error("Model Not Exist")
        unknown = set(body) - TOP_LEVEL_FIELDS
        if unknown and self.strict_keys:
            return 400, error("unknown field `%s`" % sorted(unknown)[0])
        if not isinstance(body.get("stream", False), bool):
            return 400, error("stream: invalid type, expected a boolean")
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(
                isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools)):
            return 400, error("tools: invalid type, expected a list of function tools")
        choice = body.get("tool_choice")
        if choice is not None and choice not in ("none", "auto", "required") and not (
                isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str)):
            return 400, error("tool_choice: unknown variant")
        response_format = body.get("response_format")
        if response_format is not None:
            if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object"):
                return 400, error("response_format: unknown variant")
            if response_format["type"] == "json_object" and "json" not in json.dumps(body.get("messages")).lower():
                return 400, error("Prompt must contain the word 'json' in some form to use 'response_format' "
                                  "of type 'json_object'.")
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, list) and all(isinstance(item, str) for item in stop)):
            return 400, error("stop: invalid type")
        thinking = body.get("thinking", {"type": "enabled"})
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
            return 422, error("Failed to deserialize the JSON body into the target type: thinking: "
                              "invalid type, expected struct ThinkingOptions")
        if body.get("n", 1) != 1:
            return 400, error("n must be 1")
        if "stream_options" in body and not body.get("stream"):
            return 400, error("stream_options should be set along with stream = true")
        max_tokens = body.get("max_tokens", 1)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 393216:
            return 400, error("Invalid max_tokens value, the valid range of max_tokens is [1, 393216]")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, error("messages must not be empty")
        thinking_on = self.thinking_on(body)
        choice = body.get("tool_choice")
        if thinking_on and (choice == "required" or isinstance(choice, dict)):
            return 400, error("tool_choice 'required' or a named tool is not supported in thinking mode")
        pending = set()
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in MESSAGE_KEYS:
                return 400, error("messages[%d]: unknown variant `%s`, expected one of `system`, `user`, "
                                  "`assistant`, `tool`" % (index, role))
            extra = set(message) - MESSAGE_KEYS[role]
            if extra and self.strict_keys:
                return 400, error("messages[%d]: unknown field `%s`" % (index, sorted(extra)[0]))
            if role == "tool":
                if message.get("tool_call_id") not in pending:
                    return 400, error("Messages with role 'tool' must be a response to a preceding message "
                                      "with 'tool_calls'")
                pending.discard(message["tool_call_id"])
                continue
            if pending:
                return 400, error("An assistant message with 'tool_calls' must be followed by tool messages "
                                  "responding to each 'tool_call_id'. (insufficient tool messages following "
                                  "tool_calls message)")
            content = message.get("content")
            if role != "assistant" and not isinstance(content, (str, list)):
                return 400, error("messages[%d]: content must be a string or an array" % index)
            if role == "assistant":
                for call in message.get("tool_calls") or ():
                    pending.add(call.get("id"))
                    if not isinstance((call.get("function") or {}).get("arguments"), str):
                        return 400, error("tool_calls arguments must be a string")
                needs = self.reasoning_rule == "all" or (
                    self.reasoning_rule == "tool_calls" and message.get("tool_calls"))
                if thinking_on and body.get("tools") and needs and \
                        not isinstance(message.get("reasoning_content"), str):
                    return 400, error(REASONING_MISSING)
        if pending:
            return 400, error("insufficient tool messages following tool_calls message")
        return None

    @staticmethod
    def thinking_on(body):
        if body.get("reasoning_effort") == "none":
            return False
        return (body.get("thinking") or {"type": "enabled"}).get("type") == "enabled"

    def answer(self, body):
        with self.lock:
            self.calls += 1
            number = self.calls
        answer = self.responder(body, number)
        thinking = self.thinking_on(body)
        message = {"role": "assistant", "content": answer.content}
        if thinking:
            message["reasoning_content"] = answer.reasoning if answer.reasoning is not None else ""
        if answer.tool_calls:
            message["tool_calls"] = [
                {"index": i, "id": call[2] if len(call) > 2 else "call_%02d_%s" % (i, uuid.uuid4().hex[:24]),
                 "type": "function", "function": {"name": call[0], "arguments": json.dumps(call[1])}}
                for i, call in enumerate(answer.tool_calls)]
        finish = answer.finish_reason or ("tool_calls" if answer.tool_calls else "stop")
        prompt_text = (json.dumps(body.get("tools"), sort_keys=True) if body.get("tools") else "") + \
            "".join(render_message(m) for m in body["messages"])
        content_tokens = self.count_tokens(prompt_text)
        prompt_tokens = TEMPLATE_TOKENS + MESSAGE_TOKENS * len(body["messages"]) + content_tokens
        hit = min(self.cache.lookup(prompt_text) * content_tokens // max(1, math.ceil(len(prompt_text) / CHARS_PER_TOKEN)),
                  prompt_tokens)
        self.cache.remember(prompt_text)
        history_message = {k: v for k, v in message.items() if k != "tool_calls"}
        if answer.tool_calls:
            history_message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"}
                                             for c in message["tool_calls"]]
        self.cache.remember(prompt_text + render_message(history_message))
        reasoning_tokens = math.ceil(len(message.get("reasoning_content") or "") / CHARS_PER_TOKEN)
        completion = reasoning_tokens + math.ceil(len(json.dumps(message)) / CHARS_PER_TOKEN)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion,
                 "prompt_tokens_details": {"cached_tokens": hit},
                 "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt_tokens - hit}
        if thinking:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        with self.lock:
            if self.record:
                self.answers.append(history_message)
                self.exchanges.append((body, history_message))
                self.usages.append(usage)
        return message, finish, None if self.omit_usage else usage

    def chunks(self, body, message, finish, usage):
        """The streamed form of an answer, as DeepSeek sends it."""
        base = {"id": str(uuid.uuid4()), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body["model"], "system_fingerprint": "fp_fake"}
        include_usage = (body.get("stream_options") or {}).get("include_usage")

        def chunk(delta, finish_reason=None, last_usage=None):
            data = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish_reason}])
            if include_usage:
                data["usage"] = last_usage
            return data

        thinking = "reasoning_content" in message
        if thinking:
            yield chunk({"role": "assistant", "content": None, "reasoning_content": ""})
            reasoning = message["reasoning_content"]
            size = max(1, math.ceil(len(reasoning) / self.reasoning_pieces))
            for start in range(0, len(reasoning), size):
                yield chunk({"content": None, "reasoning_content": reasoning[start:start + size]})
        else:
            yield chunk({"role": "assistant", "content": ""})
        content = message.get("content") or ""
        for start in range(0, len(content), 5):
            yield chunk({"content": content[start:start + 5], "reasoning_content": None} if thinking
                        else {"content": content[start:start + 5]})
        for call in message.get("tool_calls") or ():
            yield chunk({"tool_calls": [{"index": call["index"], "id": call["id"], "type": "function",
                                         "function": {"name": call["function"]["name"], "arguments": ""}}]})
            arguments = call["function"]["arguments"]
            for start in range(0, len(arguments), self.argument_fragment):
                yield chunk({"tool_calls": [{"index": call["index"], "function": {
                    "arguments": arguments[start:start + self.argument_fragment]}}]})
        yield chunk({"content": "", "reasoning_content": None} if thinking else {"content": ""},
                    finish, usage)


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner = None

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.owner.lock:
            self.owner.connections += 1
            self.owner.sockets.add(self.connection)
        if self.owner.connect_delay:
            time.sleep(self.owner.connect_delay)

    def log_message(self, format, *args):
        pass

    def send_json(self, status, payload, headers=None, content_type="application/json"):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the proxy gave up waiting (timeout tests)
            self.close_connection = True

    def do_GET(self):
        if self.path in ("/models", "/v1/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": model, "object": "model", "owned_by": "deepseek"} for model in MODELS]})
        else:
            self.send_json(404, error("Not Found"))

    def do_POST(self):
        fake = self.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path not in ("/chat/completions", "/v1/chat/completions"):
            return self.send_json(404, error("Not Found"))
        auth = self.headers.get("Authorization", "")
        if auth != "Bearer " + fake.api_key:
            key = auth[7:] if auth.startswith("Bearer ") else ""
            return self.send_json(401, error("Authentication Fails, Your api key: ****%s is invalid"
                                             % key[-4:], "authentication_error"))
        try:
            body = json.loads(raw)
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates are not text
        except (ValueError, UnicodeEncodeError):
            return self.send_json(400, error("Failed to parse the request body as JSON"))
        with fake.lock:
            if fake.record:
                fake.requests.append(body)
                fake.headers.append(dict(self.headers))
            queue = fake.summary_failures if is_summary_request(body) else fake.failures
            failure = queue.popleft() if queue else None
        if is_summary_request(body) and fake.summary_delay:
            time.sleep(fake.summary_delay)
        if is_summary_request(body) and fake.summary_gate is not None:
            fake.summary_gate.wait(10)
        if failure and failure[0] == "status":
            return self.send_json(failure[1], failure[2] if len(failure) > 2 else error("injected"),
                                  failure[3] if len(failure) > 3 else None)
        if failure and failure[0] == "raw":
            return self.send_json(failure[1], failure[2], content_type="text/html")
        if failure and failure[0] == "redirect":
            return self.send_json(failure[1], b"moved", {"Location": failure[2]}, "text/plain")
        if failure and failure[0] == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if failure and failure[0] == "sleep":
            time.sleep(failure[1])
        problem = fake.validate(body)
        if problem:
            return self.send_json(*problem)
        message, finish, usage = fake.answer(body)
        if not body.get("stream"):
            if fake.close_idle:
                self.close_connection = True
            response_message = dict(message)
            for call in response_message.get("tool_calls") or ():
                call.setdefault("index", 0)
            return self.send_json(200, {
                "id": str(uuid.uuid4()), "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "choices": [{"index": 0, "message": response_message,
                                                     "logprobs": None, "finish_reason": finish}],
                "usage": usage, "system_fingerprint": "fp_fake"})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        break_after = failure[1] if failure and failure[0] == "break" else None
        if failure and failure[0] == "huge_line":
            try:
                self.wfile.write(b"data: " + b"x" * failure[1])
                self.wfile.flush()
            except OSError:
                pass
            return
        try:
            for _ in range(fake.keepalive_comments):
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
            for number, chunk in enumerate(fake.chunks(body, message, finish, usage)):
                if break_after is not None and number >= break_after:
                    self.connection.shutdown(2)
                    return
                if number and fake.chunk_delay:
                    time.sleep(fake.chunk_delay)
                self.wfile.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
                self.wfile.flush()
            if fake.done_delay:
                time.sleep(fake.done_delay)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:
            pass


def main():
    import argparse
    parser = argparse.ArgumentParser(description="A fake DeepSeek chat API on 127.0.0.1, for trying clients.")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--key", default="sk-fake", help="the API key it accepts")
    parser.add_argument("--connect-delay", type=float, default=0.0, help="seconds each new connection waits")
    parser.add_argument("--demo-agent", action="store_true",
                        help="call the first read-like tool a request offers, then answer: a tool round with any "
                             "agent (Claude Code, Codex, ...)")
    parser.add_argument("--script", metavar="ANSWERS.json",
                        help='answers to play in order: [{"content": "...", "tool_calls": [["name", {...}]]}, ...]')
    args = parser.parse_args()
    fake = FakeDeepSeek(args.key)
    if args.script:
        with open(args.script, encoding="utf-8") as handle:
            fake.responder = scripted(json.load(handle))
    elif args.demo_agent:
        fake.responder = demo_agent
    fake.record = False
    fake.connect_delay = args.connect_delay
    fake.start(port=args.port)
    print("fake DeepSeek on %s (key %s); Ctrl-C stops it" % (fake.url, args.key), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
