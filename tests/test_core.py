"""The request core as pure functions: validation, normalisation, the stage contract, the answer
collector, settle()."""

import json
import unittest
from unittest import mock

from helpers import ProxyTestCase, tool_rounds
import deepseek_proxy as dp

STATE = dp.ProxyState(persist=False, api_key="")


def prepare(messages, **extra):
    return dp.prepare(dict({"model": "x", "messages": messages}, **extra), STATE)


class Validation(unittest.TestCase):
    def test_good_bodies_pass(self):
        for messages in ([{"role": "user", "content": "hi"}],
                         [{"role": "developer", "content": "rules"}, {"role": "user", "content": [
                             {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
                         [{"role": "user", "content": "go"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                          {"role": "tool", "tool_call_id": "c", "content": "ok"}]):
            dp.validate_chat_request({"messages": messages})

    def test_bad_bodies_say_what_is_wrong(self):
        cases = [([], "JSON object"), ({"messages": []}, "non-empty array"),
                 ({"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
                 ({"messages": [{"role": "user"}]}, "content is required"),
                 ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "with a 'type'"),
                 ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]}, "tool_calls must be"),
                 ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id must be"),
                 ({"messages": [{"role": "user", "content": "x", "reasoning_content": 1}]}, "reasoning_content"),
                 ({"messages": [{"role": "user", "content": "x"}], "tools": {}}, "'tools' must be"),
                 ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "'stream' must be")]
        for body, words in cases:
            with self.assertRaises(dp.ClientError) as caught:
                dp.validate_chat_request(body)
            self.assertEqual(caught.exception.status, 400)
            self.assertIn(words, caught.exception.message)


class Normalisation(unittest.TestCase):
    def test_developer_unknown_keys_and_object_arguments(self):
        messages = [{"role": "developer", "content": "rules", "cot_id": 1},
                    {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]},
                    {"role": "assistant", "content": None, "reasoning_content": None, "tool_calls": [
                        {"id": "c", "type": "function", "index": 0,
                         "function": {"name": "f", "arguments": {"a": 1}}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "ok", "name": "f"}]
        out = dp.normalise_messages(messages, dp.RequestContext({}, STATE))
        self.assertEqual(out, [{"role": "system", "content": "rules"},
                               {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                               {"role": "assistant", "content": None, "tool_calls": [
                                   {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
                               {"role": "tool", "tool_call_id": "c", "content": "ok"}])

    def test_clean_messages_pass_as_the_same_objects(self):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        out = dp.normalise_messages(messages, dp.RequestContext({}, STATE))
        self.assertTrue(all(a is b for a, b in zip(out, messages)))


class StageContract(unittest.TestCase):
    def test_an_optional_stage_that_fails_is_skipped_with_a_note(self):
        def broken(messages, ctx):
            raise RuntimeError("bug")
        stages = [dp.Stage("normalise_messages", dp.normalise_messages, required=True),
                  dp.Stage("broken", broken)]
        with mock.patch.object(dp, "PIPELINE", stages), self.assertLogs("deepseek_proxy", "WARNING") as logs:
            prepared = prepare([{"role": "developer", "content": "x"}])
        self.assertEqual(prepared.upstream_body["messages"], [{"role": "system", "content": "x"}])
        self.assertIn("broken failed", prepared.ctx.notes)
        self.assertIn("Traceback", "\n".join(logs.output), "our own bug: logged with its traceback")

    def test_a_required_stage_that_fails_fails_the_request(self):
        def broken(messages, ctx):
            raise RuntimeError("bug")
        with mock.patch.object(dp, "PIPELINE", [dp.Stage("normalise_messages", broken, required=True)]):
            with self.assertRaises(RuntimeError):
                prepare([{"role": "developer", "content": "x"}])

    def test_disabled_stages_do_not_run(self):
        calls = []
        stage = dp.Stage("counted", lambda m, c: calls.append(1) or m, enabled=lambda config: False,
                         answer=lambda c, a, u: calls.append(2))
        with mock.patch.object(dp, "PIPELINE", [stage]):
            prepared = prepare([{"role": "user", "content": "x"}])
            collector = dp.AnswerCollector()
            collector.feed_response({"choices": [{"message": {"content": "y"}, "finish_reason": "stop"}]})
            dp.settle(prepared, collector)
        self.assertEqual(calls, [])

    def test_every_stage_has_a_name_and_the_valid_making_ones_are_required(self):
        names = [stage.name for stage in dp.PIPELINE]
        self.assertEqual(names[:2], ["normalise_messages", "restore_reasoning"])
        self.assertTrue(all(stage.required for stage in dp.PIPELINE[:2]))
        self.assertFalse(any(stage.required for stage in dp.PIPELINE[2:]))


class Chains(unittest.TestCase):
    def test_a_requests_chains_reuse_shared_objects_and_equal_the_pure_function(self):
        state = dp.ProxyState(persist=False, api_key="")
        ctx = dp.RequestContext({}, state)
        messages = [{"role": "user", "content": "m%d" % i} for i in range(30)]
        changed = messages[:10] + [dict(messages[10], content="other")] + messages[11:]
        for exact in (True, False, True):
            for batch in (messages, messages[:12], changed, changed[:5], [], messages):
                self.assertEqual(ctx.history_chain_of(batch, exact), dp.history_chain(batch, exact=exact))
        seeded = dp.RequestContext({}, state)
        seeded.seed = b"team"
        self.assertEqual(seeded.history_chain_of(messages, True), dp.history_chain(messages, exact=True, seed=b"team"))


class Collector(unittest.TestCase):
    def test_stream_deltas_rebuild_the_message(self):
        collector = dp.AnswerCollector()
        events = [{"choices": [{"delta": {"role": "assistant", "content": None, "reasoning_content": ""}}]},
                  {"choices": [{"delta": {"reasoning_content": "thi"}}]},
                  {"choices": [{"delta": {"reasoning_content": "nk"}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                          "function": {"name": "f", "arguments": ""}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]},
                  {"choices": [{"delta": {"content": ""}, "finish_reason": "tool_calls"}],
                   "usage": {"prompt_tokens": 5}}]
        for event in events:
            collector.feed_event(b"data: " + json.dumps(event).encode() + b"\n\n")
        collector.feed_event(b": keep-alive\n\ndata: not json\n\n")
        self.assertTrue(collector.complete)
        self.assertEqual(collector.message(), {"role": "assistant", "content": None, "reasoning_content": "think",
                                               "tool_calls": [{"id": "c1", "type": "function", "function": {
                                                   "name": "f", "arguments": '{"a": 1}'}}]})
        self.assertEqual(collector.usage, {"prompt_tokens": 5})

    def test_odd_answers_are_not_understood_but_do_not_raise(self):
        collector = dp.AnswerCollector()
        collector.feed_response({"choices": "nonsense"})
        collector.feed_event(b'data: {"choices": [1]}\n\n')
        self.assertFalse(collector.complete)


class Settle(unittest.TestCase):
    def prepared(self):
        return prepare([{"role": "user", "content": "x"}])

    def test_outcomes(self):
        failure = dp.UpstreamError(429, dp.error_body("slow down"))
        self.assertEqual(dp.settle(self.prepared(), None, failure).status, 429)
        self.assertFalse(dp.settle(self.prepared(), None, dp.UpstreamError(502, {})).upstream_called)
        collector = dp.AnswerCollector()
        self.assertEqual(dp.settle(self.prepared(), collector).status, 502, "the answer broke off")
        self.assertEqual(dp.settle(self.prepared(), collector, client_gone=True).status, 499)
        collector.feed_response({"choices": [{"message": {"content": "y"}, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 3}})
        outcome = dp.settle(self.prepared(), collector)
        self.assertEqual((outcome.status, outcome.usage, outcome.failed), (200, {"prompt_tokens": 3}, False))

    def test_answer_hooks_run_once(self):
        calls = []
        stage = dp.Stage("counted", lambda m, c: m, answer=lambda c, a, u: calls.append(a["content"]))
        with mock.patch.object(dp, "PIPELINE", [stage]):
            prepared = self.prepared()
            collector = dp.AnswerCollector()
            collector.feed_response({"choices": [{"message": {"content": "y"}, "finish_reason": "stop"}]})
            dp.answer_ended(prepared, collector)
            dp.settle(prepared, collector)
        self.assertEqual(calls, ["y"])


class UpstreamBody(unittest.TestCase):
    def test_assembled_from_cached_pieces_byte_identical_to_json_dumps(self):
        state = dp.ProxyState(persist=False, api_key="")
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        body = {"model": "x", "tools": tools, "tool_choice": "auto", "stream": True, "messages": [
            {"role": "system", "content": "rules " * 100}, {"role": "user", "content": "caf\u00e9 \U0001F600 " * 50},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                   "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "output " * 100},
            {"role": "user", "content": "lone \ud800 surrogate " * 20}]}
        for _ in range(2):  # the second time from the cache
            prepared = dp.prepare(json.loads(json.dumps(body)), state)
            expected = json.dumps(prepared.upstream_body, ensure_ascii=False).encode("utf-16-le", "surrogatepass") \
                .decode("utf-16-le", "replace").encode("utf-8")
            self.assertEqual(dp.encode_json(prepared.upstream_body, state.message_json, prepared.ctx.tools_json),
                             expected)


class SeveralProxiesInOneProcess(unittest.TestCase):
    def test_states_share_nothing(self):
        first, second = dp.ProxyState(persist=False, api_key="a"), dp.ProxyState(persist=False, api_key="b")
        first.reasoning.remember("c", "k", "r")
        self.assertIsNone(second.reasoning.recall("c", "k"))
        self.assertIsNot(first.stats, second.stats)
        self.assertIsNot(first.calibration, second.calibration)


if __name__ == "__main__":
    unittest.main()


class ConfigurationIsAValue(ProxyTestCase):
    """Configuration is built once and handed to the state: two proxies with different
    configurations serve side by side in one process, and no function reads a flag constant."""

    def test_two_configurations_side_by_side(self):
        plain = self.start_proxy(["--no-dedup-tool-outputs", "--no-near-duplicates", "--no-dedup-boilerplate"])
        output = "the same long tool output line, again and again\n" * 20
        body = {"model": "x", "messages": tool_rounds(output, output, tool="run")}
        for _ in range(2):
            for proxy in (self.proxy, plain):
                self.assertEqual(proxy.chat(body)[0], 200)
        sent = [request["messages"][4]["content"] for request in self.fake.requests]
        self.assertEqual([text == output for text in sent], [False, True, False, True])
        self.assertTrue(self.proxy.state.config.DEDUP_TOOL_OUTPUTS)
        self.assertFalse(plain.state.config.DEDUP_TOOL_OUTPUTS)

    def test_no_function_reads_a_flag_constant(self):
        import ast
        names = set(dp.config_help()) | {"BOILERPLATE_PATTERNS"}
        with open(dp.__file__, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        skipped = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "Config":  # builds the value from the defaults
                skipped.update(id(inner) for inner in ast.walk(node))
        readers = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.Lambda)) and id(node) not in skipped:
                for inner in (node.body if isinstance(node.body, list) else [node.body]):
                    for name in ast.walk(inner):
                        if isinstance(name, ast.Name) and name.id in names and isinstance(name.ctx, ast.Load):
                            readers.append("%s line %d: %s" % (getattr(node, "name", "lambda"), name.lineno, name.id))
        self.assertEqual(readers, [])
