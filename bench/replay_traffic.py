"""Bill the recorded traffic of real clients (bench/traffic/, written by bench/record.py).

    python bench/replay_traffic.py [--clients claude,codex,...] [--write-docs]

Each client's recorded requests are translated by the proxy's own front (chat, Anthropic Messages or
Responses) and replayed in order through the pipeline, in this process, with the model's recorded
answers, and billed under the fake DeepSeek's prefix cache (bench/replay.py). Per client:

- direct: a perfect direct client, the same requests with the pipeline off (only what makes them
  valid: message hygiene and the reasoning restore; for the Anthropic and Responses clients, their
  translated requests). The other figures are relative to it.
- floor: the client's own lossless floor, the direct requests with every run of 3 or more lines that
  an earlier message of the request already carried removed for free: what a perfect lossless
  rewrite could at best reach, by this measure.
- proxy: the proxy's defaults.

Columns: history kept (requests that start with the previous request's messages: the client kept its
own history, so DeepSeek's prefix cache could hit; the others are side requests such as titles, and
Aider's, which moves its chat files); billed cost (input and output) as a ratio of direct; cache-hit share of input tokens;
repeated lines left (characters of repeated lines of 20+ characters in tool and user messages, as
a share of direct's, for the proxy and for the floor, which leaves the repeated lines that do not come
in runs of 3), and the part of the proxy's that comes in runs of 3+ such lines (what a lossless
rewrite could still remove; the floor's is 0 by construction); requests the strict fake would refuse (a tool-call turn without its reasoning,
a tool call without its answer); pipeline milliseconds per request.
"""

import argparse
import gzip
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import replay  # noqa: E402
from replay import proxy  # noqa: E402
from report import Report  # noqa: E402

TRAFFIC = os.path.join(HERE, "traffic")
CLIENT_ORDER = ("claude", "codex", "opencode", "opencode-anthropic", "opencode-responses", "cline", "kilo", "qwen",
                "qwen-anthropic", "continue", "aider", "llm")
RUN = 3  # lines: a repeated run at least this long is free at the floor
KEY = "sk-test-key-abcd"  # the key the recordings were made with (their reasoning seals use it)


def recording(name):
    return os.path.join(TRAFFIC, name + ".jsonl.gz")


def recorded_clients():
    """The clients of CLIENT_ORDER that have a recording, in that order."""
    return [name for name in CLIENT_ORDER if os.path.exists(recording(name))]


def load(name):
    """(meta, [(path, body)] of the model requests, [answers])."""
    with gzip.open(recording(name), "rt", encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    requests = [(entry["path"].split("?")[0], json.loads(entry["body"])) for entry in lines[1:]
                if entry.get("method") == "POST" and entry["path"].split("?")[0] in
                proxy.CHAT_PATHS + proxy.MESSAGES_PATHS + proxy.RESPONSES_PATHS]
    return lines[0], requests, [entry["answer"] for entry in lines[1:] if "answer" in entry]


class Session:
    def __init__(self, name):
        self.meta, recorded, answers = load(name)
        if len(recorded) != len(answers):
            raise SystemExit("%s: %d requests but %d answers recorded" % (name, len(recorded), len(answers)))
        state = proxy.ProxyState(persist=False, api_key=KEY)
        self.requests = []
        for (path, body), answer in zip(recorded, answers):
            if path in proxy.MESSAGES_PATHS:
                chat = proxy.AnthropicFront.exchange(body, state).chat_body
            elif path in proxy.RESPONSES_PATHS:
                chat = proxy.ResponsesFront.exchange(body, state).chat_body
            else:
                chat = body
            self.requests.append({"messages": chat["messages"], "tools": chat.get("tools"), "answer": answer})


def floor_messages(messages):
    """Every run of RUN+ lines that earlier messages already carried, removed from tool and user
    messages: a function of each message and those before it, so an append-only history keeps its
    prefix."""
    seen, out = set(), []
    for message in messages:
        text = proxy.content_text(message.get("content"))
        lines = text.split("\n")
        if message.get("role") in ("tool", "user") and text:
            keep, index = [], 0
            while index < len(lines):
                end = index
                while end < len(lines) and lines[end].strip() and lines[end] in seen:
                    end += 1
                if end - index >= RUN:
                    index = end
                    continue
                keep.append(lines[index])
                index += 1
            if len(keep) < len(lines):
                message = dict(message, content="\n".join(keep))
        seen.update(lines)
        for call in message.get("tool_calls") or ():
            seen.update(call["function"]["arguments"].split("\n"))
        out.append(message)
    return out


def version_of(meta):
    """The version number in what the client's --version printed."""
    import re
    found = re.search(r"\d+\.\d+(\.\d+)?", meta.get("version") or "")
    return found.group(0) if found else "?"


def extensions(session):
    """(requests that start with the previous request's messages, requests after the first): how
    often the client kept its own history, so that DeepSeek's cached prefix could hit at all."""
    kept, previous = 0, None
    for request in session.requests:
        messages = [json.dumps(m, sort_keys=True) for m in request["messages"]]
        if previous is not None and messages[:len(previous)] == previous:
            kept += 1
        previous = messages
    return kept, max(0, len(session.requests) - 1)


def refused(messages):
    """Whether the strict fake would refuse these messages (DeepSeek's rules)."""
    pending = set()
    for message in messages:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            if not message.get("reasoning_content"):
                return True
            pending.update(call["id"] for call in message["tool_calls"])
        elif message.get("role") == "tool":
            pending.discard(message.get("tool_call_id"))
        elif pending:
            return True
    return bool(pending)


def checked(counter):
    def transform(messages):
        counter[0] += refused(messages)
        return messages
    return transform


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default=",".join(CLIENT_ORDER))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    proxy.log.disabled = True
    report = Report("replay-traffic", args.write_docs, "Recorded real clients, billed")
    report.columns("client", "front", "requests", "history kept", "direct $", "floor", "proxy", "proxy - floor",
                   "cache hit direct / proxy", "repeated lines left: proxy / floor", "of them in runs of 3+: proxy",
                   "refused", "pipeline ms/request")
    for name in args.clients.split(","):
        if not os.path.exists(recording(name)):
            report.line("| %s | not recorded | | | | | | | | | | |" % name)
            continue
        session = Session(name)
        direct = replay.replay(session, replay.OFF)
        floor = replay.replay(session, replay.OFF, floor_messages)
        failures = [0]
        ours = replay.replay(session, {}, checked(failures))
        cost = {label: totals["cost_in"] + totals["cost_out"] for label, totals in
                (("direct", direct), ("floor", floor), ("proxy", ours))}
        report.line("| %s %s | %s | %d | %d of %d | %.4f | %.3fx | %.3fx | %+.3f | %.1f%% / %.1f%% | %.1f%% / %.1f%% "
                    "| %.1f%% | %d | %.1f |" % (
            session.meta["client"], version_of(session.meta),
            session.meta["front"], ours["requests"], *extensions(session), cost["direct"], cost["floor"] / cost["direct"],
            cost["proxy"] / cost["direct"], (cost["proxy"] - cost["floor"]) / cost["direct"],
            100.0 * direct["hit"] / max(1, direct["prompt"]), 100.0 * ours["hit"] / max(1, ours["prompt"]),
            100.0 * ours["repeated_chars"] / max(1, direct["repeated_chars"]),
            100.0 * floor["repeated_chars"] / max(1, direct["repeated_chars"]),
            100.0 * ours["repeated_run_chars"] / max(1, direct["repeated_chars"]), failures[0],
            1000 * ours["pipeline_s"] / max(1, ours["requests"])))
    report.save()


if __name__ == "__main__":
    main()
