"""The real client: the official OpenAI Python SDK against the proxy (skipped without the package)."""

import json
import unittest

from helpers import ProxyTestCase
from fake_deepseek import Answer

try:
    import openai
except ImportError:  # .ci/run installs it; a bare checkout may not have it
    openai = None

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]


@unittest.skipIf(openai is None, "the openai package is not installed (pip install -r requirements-dev.txt)")
class OpenAISDK(ProxyTestCase):
    def client(self):
        return openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.proxy.port, api_key="anything",
                             max_retries=0, timeout=30)

    def test_non_streaming(self):
        completion = self.client().chat.completions.create(
            model="gpt-4o", messages=[{"role": "developer", "content": "Be brief."},
                                      {"role": "user", "content": "Hello"}])
        self.assertEqual(completion.choices[0].message.content, "Answer 1.")
        self.assertGreater(completion.usage.prompt_tokens, 0)
        self.assertEqual(completion.model_extra.get("system_fingerprint", completion.system_fingerprint),
                         "fp_fake")

    def test_streaming_with_usage(self):
        stream = self.client().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hello"}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        self.assertEqual(text, "Answer 1.")
        self.assertEqual(chunks[-1].usage.prompt_tokens, self.fake.requests[-1] and chunks[-1].usage.prompt_tokens)
        self.assertIsNotNone(chunks[-1].usage)

    def test_tool_loop_streaming_and_not(self):
        """Two tool rounds with thinking on: the SDK never sends reasoning_content back."""
        def responder(body, number):
            if body["messages"][-1]["role"] == "user":
                return Answer(reasoning="I should check the weather.",
                              tool_calls=[("get_weather", {"city": "Hangzhou"}),
                                          ("get_weather", {"city": "Paris"})])
            if number == 2:
                return Answer(reasoning="One more look.", tool_calls=[("get_weather", {"city": "Rome"})])
            return Answer(content="Sunny everywhere.", reasoning="All done.")
        self.fake.responder = responder
        client = self.client()
        for stream in (False, True):
            self.fake.calls = 0
            messages = [{"role": "user", "content": "Weather in Hangzhou and Paris?"}]
            for _ in range(4):
                if stream:
                    calls, content = {}, ""
                    for chunk in client.chat.completions.create(model="x", messages=messages, tools=TOOLS,
                                                                stream=True):
                        delta = chunk.choices[0].delta
                        content += delta.content or ""
                        for call in delta.tool_calls or ():
                            slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                            slot["id"] = call.id or slot["id"]
                            slot["name"] = (call.function.name or slot["name"])
                            slot["arguments"] += call.function.arguments or ""
                    tool_calls = [calls[i] for i in sorted(calls)]
                else:
                    message = client.chat.completions.create(model="x", messages=messages,
                                                             tools=TOOLS).choices[0].message
                    content = message.content or ""
                    tool_calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                                  for c in message.tool_calls or ()]
                if not tool_calls:
                    break
                messages.append({"role": "assistant", "content": content, "tool_calls": [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["name"], "arguments": c["arguments"]}} for c in tool_calls]})
                for call in tool_calls:
                    city = json.loads(call["arguments"])["city"]
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": "Sunny in " + city})
            self.assertEqual(content, "Sunny everywhere.", "stream=%s" % stream)

    def test_typed_exceptions(self):
        client = self.client()
        cases = ((400, openai.BadRequestError), (401, openai.AuthenticationError),
                 (402, openai.APIStatusError), (422, openai.UnprocessableEntityError),
                 (429, openai.RateLimitError), (500, openai.InternalServerError))
        for status, exception in cases:
            self.fake.failures.extend([("status", status, {"error": {
                "message": "injected %d" % status, "type": "x", "param": None, "code": "c"}})] * 3)
            with self.assertRaises(exception) as caught:
                client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])
            self.assertEqual(caught.exception.status_code, status)
            if status not in (401, 402):  # those are about the proxy's own key: the proxy's words
                self.assertIn("injected %d" % status, caught.exception.message)
            self.fake.failures.clear()

    def test_bad_request_from_the_proxy_itself(self):
        with self.assertRaises(openai.BadRequestError):
            self.client().chat.completions.create(model="x", messages=[])

    def test_error_mid_stream_raises(self):
        self.fake.failures.append(("break", 3))
        stream = self.client().chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Hi"}], stream=True)
        with self.assertRaises(openai.APIError):
            list(stream)

    def test_models(self):
        models = self.client().models.list()
        self.assertEqual([model.id for model in models], ["deepseek-v4-flash"])


if __name__ == "__main__":
    unittest.main()
