"""Request bodies parsed from where the conversation's last request left off (RecentBodies,
parse_body): the same value json.loads gives, the repeated messages shared as the same objects, and
nothing in the proxy changes a parsed body in place (later requests reuse it)."""

import copy
import gzip
import json
import os
import unittest
from unittest import mock

from helpers import ProxyTestCase, ROOT, chat_body, wait_for
import deepseek_proxy as dp

TRAFFIC = os.path.join(ROOT, "bench", "traffic")


def parsed(raw, bodies=None, user=None):
    """(layout or None, what it resumed from) for raw bytes, as the handler parses them."""
    previous = bodies.match(raw, user) if bodies else None
    return dp.parse_body(raw, raw.decode("utf-8"), previous, user), previous


class ParseBody(unittest.TestCase):
    def test_the_same_value_as_json_loads(self):
        bodies = [
            '{"model": "x", "messages": [{"role": "user", "content": "hi"}]}',
            ' \n{ "messages" :[ ] , "n":1 }\r\n',
            '{"messages":[{"role":"user","content":"caf\\u00e9 \\ud83d\\ude00 \u00e9\u4e2d"},{"a":[1,{"b":null}]}],'
            '"tools":[{"x":NaN}],"stream":true}',
            '{"model":"a","messages":[{"role":"user","content":"x"}],"model":"b"}',
            '{"model":"a","model":"b","messages":[{"role":"user","content":"x"}]}',
        ]
        for text in bodies:
            layout, _ = parsed(text.encode("utf-8"))
            self.assertIsNotNone(layout, text)
            self.assertEqual(json.dumps(layout.body), json.dumps(json.loads(text)), text)
            self.assertEqual(list(layout.body), list(json.loads(text)), text)  # the members' order too

    def test_what_it_leaves_to_json_loads(self):
        for text in ('[1]', '{"messages": 3}', '{"messages": [1,]}', '{"messages": [1]} x', '{"messages": [1]',
                     '{"messages": [1], "messages": [1]}', '{"a": 1 "messages": []}', '', '{"messages": [1] ,}'):
            layout, _ = parsed(text.encode("utf-8"))
            self.assertIsNone(layout, text)

    def test_a_resumed_parse_shares_the_repeated_messages(self):
        bodies = dp.RecentBodies(1 << 20)
        first = chat_body(messages=[{"role": "system", "content": "s\u00e9"}, {"role": "user", "content": "q"}])
        raw = json.dumps(first, ensure_ascii=False).encode("utf-8")
        layout, previous = parsed(raw, bodies)
        self.assertIsNone(previous)
        bodies.keep(layout)
        grown = dict(first, messages=first["messages"] + [{"role": "assistant", "content": "a"},
                                                          {"role": "user", "content": "\u4e2d"}], stream=True)
        raw2 = json.dumps(grown, ensure_ascii=False).encode("utf-8")
        layout2, previous = parsed(raw2, bodies)
        self.assertEqual(previous[1], 2)
        self.assertEqual(layout2.body, json.loads(raw2))
        self.assertIs(layout2.body["messages"][0], layout.body["messages"][0])
        self.assertIs(layout2.body["messages"][1], layout.body["messages"][1])
        # an edited last message: the messages before it are reused, it is parsed again
        edited = dict(grown, messages=grown["messages"][:3] + [{"role": "user", "content": "other"}])
        raw3 = json.dumps(edited, ensure_ascii=False).encode("utf-8")
        bodies.keep(layout2, layout)
        layout3, previous = parsed(raw3, bodies)
        self.assertEqual((previous[0], previous[1]), (layout2, 3))
        self.assertEqual(layout3.body, json.loads(raw3))
        # another key's bodies are never used
        self.assertIsNone(bodies.match(raw3, "someone"))

    def test_bounded_in_bytes_and_count(self):
        bodies = dp.RecentBodies(10000)
        for number in range(40):
            raw = json.dumps(chat_body(messages=[{"role": "user", "content": "%d " % number * 20}])).encode()
            bodies.keep(parsed(raw)[0])
        self.assertLessEqual(len(bodies._items), dp.RecentBodies.ENTRIES)
        self.assertLessEqual(sum(bodies.weight(layout) for layout in bodies._items), 10000)
        huge = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 3000}])).encode()
        many = json.dumps(chat_body(messages=[{"role": "user", "content": "x"}] * 4)).encode()  # 2.5 KB each
        for raw in (huge, many):
            bodies.keep(parsed(raw)[0])
            self.assertNotIn(raw, [layout.raw for layout in bodies._items])


SHAPES = ("claude", "codex", "opencode", "opencode-responses", "cline", "aider")  # each front, unusual shapes


def resumed_translations(test, front, bodies):
    """Each body parsed from the last one kept and translated with the memo its request left, as the
    handler does; each translation must equal a fresh one."""
    state = dp.ProxyState(dp.Config(), persist=False, api_key="k")
    for body in bodies:
        raw = json.dumps(body).encode()
        layout, previous = parsed(raw, state.bodies)
        objects = dp.ObjectMemo(previous[0].objects if previous else None)
        exchange = front.exchange(layout.body, state, objects=objects)
        test.assertEqual(exchange.chat_body, front.exchange(json.loads(raw), state).chat_body)
        layout.objects = objects
        state.bodies.keep(layout, previous and previous[0])


class ResumedTranslation(unittest.TestCase):
    def test_responses_items_grouped_into_turns_resume_anywhere(self):
        items = [{"type": "message", "role": "user", "content": "fix it"},
                 {"type": "reasoning", "summary": [], "encrypted_content": "x"},
                 {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
                 {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{\"cmd\": \"ls\"}"},
                 {"type": "function_call", "call_id": "c2", "name": "shell", "arguments": "{\"cmd\": \"pwd\"}"},
                 {"type": "function_call_output", "call_id": "c1", "output": "a\nb"},
                 {"type": "function_call_output", "call_id": "c2", "output": "/w"},
                 {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
                 {"type": "message", "role": "user", "content": "thanks"}]
        # one item more each request (a turn left open at every possible point), then an edited last item
        bodies = [{"model": "m", "input": items[:count], "stream": True} for count in range(1, len(items) + 1)]
        bodies.append({"model": "m", "input": items[:-1] + [{"type": "message", "role": "user", "content": "again"}]})
        # a history cut inside the open turn, going on differently: the turn as it was after item 4
        bodies.append({"model": "m", "input": items[:4] + [
            {"type": "function_call", "call_id": "c3", "name": "shell", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "a"},
            {"type": "function_call_output", "call_id": "c3", "output": "b"}]})
        resumed_translations(self, dp.ResponsesFront, bodies)

    def test_anthropic_messages_resume(self):
        turns = [{"role": "user", "content": "fix it"},
                 {"role": "assistant", "content": [{"type": "text", "text": "Looking."},
                                                   {"type": "tool_use", "id": "t1", "name": "Read", "input": {"p": 1}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"},
                                              {"type": "text", "text": "and?"}]},
                 {"role": "assistant", "content": "Done."}]
        resumed_translations(self, dp.AnthropicFront, [{"model": "m", "max_tokens": 5, "messages": turns[:count]}
                                                       for count in (1, 1, 3, 4)])


def recorded(name):
    """[(path, raw body, answer)] of a recording's model requests (bench/replay_traffic.load's pairing)."""
    with gzip.open(os.path.join(TRAFFIC, name + ".jsonl.gz"), "rt", encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    paths = dp.CHAT_PATHS + dp.MESSAGES_PATHS + dp.RESPONSES_PATHS
    requests = [(entry["path"].split("?")[0], entry["body"].encode("utf-8")) for entry in lines[1:]
                if entry.get("method") == "POST" and entry["path"].split("?")[0] in paths]
    answers = [entry["answer"] for entry in lines[1:] if "answer" in entry]
    return [request + (answer,) for request, answer in zip(requests, answers)]


@unittest.skipUnless(os.path.isdir(TRAFFIC) and os.listdir(TRAFFIC),
                     "no recordings in bench/traffic (python bench/record.py makes them)")
class RecordedBodies(unittest.TestCase):
    def test_no_stage_changes_a_body_that_later_requests_reuse(self):
        # every recorded client's requests, each parsed from the last one kept, through its front and
        # the pipeline with the memo the last request left, its answer settled: each translation equals
        # a fresh one, and every body still equals a fresh parse of its bytes at the end
        reused = total = 0
        recorded_names = [file[:-len(".jsonl.gz")] for file in os.listdir(TRAFFIC)]
        for name in [name for name in SHAPES if name in recorded_names]:
            state = dp.ProxyState(dp.Config(MAX_CONTEXT=100000000), persist=False, api_key="recorded")
            layouts = []
            for path, raw, answer in recorded(name):
                layout, previous = parsed(raw, state.bodies)
                self.assertEqual(layout.body, json.loads(raw), name)
                front = dp.ChatFront
                if path in dp.MESSAGES_PATHS:
                    front = dp.AnthropicFront
                elif path in dp.RESPONSES_PATHS:
                    front = dp.ResponsesFront
                # as the handler does: the request works on a memo resumed from the body it extends
                objects = dp.ObjectMemo(previous[0].objects if previous else None)
                exchange = front.exchange(layout.body, state, objects=objects)
                self.assertEqual(exchange.chat_body, front.exchange(json.loads(raw), state).chat_body, name)
                prepared = dp.prepare(exchange.chat_body, state, client_body=layout.body, objects=objects)
                layout.objects = objects
                collector = dp.AnswerCollector()
                collector.feed_response({"choices": [{"message": copy.deepcopy(answer), "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
                dp.settle(prepared, collector)
                state.bodies.keep(layout, previous and previous[0])
                layouts.append(layout)
                reused += previous is not None
                total += 1
            for layout in layouts:
                self.assertEqual(layout.body, json.loads(layout.raw), name)
        self.assertGreater(reused, total * 0.8, "most recorded requests repeat their last one")


class ThroughTheProxy(ProxyTestCase):
    def growing(self, proxy, rounds, **extra):
        messages = [{"role": "system", "content": "Be brief."}]
        for number in range(rounds):
            messages = messages + [{"role": "user", "content": "question %d \u00e9" % number}]
            status, _, answer = proxy.chat(chat_body(messages=messages, **extra))
            self.assertEqual(status, 200, answer)
            messages = messages + [answer["choices"][0]["message"]]
        return messages

    def test_a_conversation_is_parsed_from_where_it_left_off(self):
        self.growing(self.proxy, 4)
        kept = self.proxy.state.bodies._items
        self.assertEqual(len(kept), 1, "each answered request replaces the one it extended")
        self.assertEqual(len(kept[0].body["messages"]), 8)  # the system prompt, 4 questions, 3 answers
        self.assertEqual(self.fake.requests[-1]["messages"][-1]["content"], "question 3 \u00e9")

    def test_an_idle_kept_open_connection_holds_no_body(self):
        handlers, setup = [], dp.ProxyHandler.setup
        with mock.patch.object(dp.ProxyHandler, "setup", lambda handler: (handlers.append(handler), setup(handler))):
            self.growing(self.proxy, 2)  # helpers' client keeps its connection open
        self.assertTrue(handlers)
        # the handler lets go once the request is over, which is just after its answer's last bytes
        self.assertTrue(wait_for(lambda: all(handler.layout is None for handler in handlers)))

    def test_refused_requests_and_explain_keep_nothing(self):
        self.fake.failures.append(("status", 400, {"error": {"message": "no", "type": "invalid_request_error"}}))
        status, _, _ = self.proxy.chat(chat_body(messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(status, 400)
        self.proxy.request("POST", "/v1/proxy/explain", chat_body(messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(len(self.proxy.state.bodies._items), 0)

    def test_off(self):
        proxy = self.start_proxy(["--body-memory-bytes", "0"])
        self.growing(proxy, 3)
        self.assertEqual(len(proxy.state.bodies._items), 0)


if __name__ == "__main__":
    unittest.main()
