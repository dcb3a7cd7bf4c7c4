"""Replay the bench sessions through the pipeline and bill them under the fake's prefix cache.

    python bench/replay.py                 # every stage alone and all defaults, on every session
    python bench/replay.py --sessions copilot --configs baseline,defaults

For each session and configuration the requests are replayed in order, in-process: the pipeline
rewrites the messages exactly as the proxy would, the fake DeepSeek's prefix cache (tests/fake_deepseek.py:
4 characters a token, 128-token units, every input and input+answer remembered) decides hits and
misses, and the cost is billed at the price constants. "baseline" is what DeepSeek receives without
the proxy's compression (only the message hygiene and the reasoning restore that make the requests
valid at all). Input cost includes the proxy's own summary calls. Answers are scripted, so output tokens are equal in every configuration; the table
shows input tokens, the cache-hit share and the input cost, then the total.

System-prompt summaries and conversation summaries call DeepSeek; here a deterministic stand-in
answers them (a summary a third of the original's size), and their own cost is billed too.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

import deepseek_proxy as proxy  # noqa: E402
from fake_deepseek import CHARS_PER_TOKEN, PrefixCache, render_message  # noqa: E402
from report import Report  # noqa: E402
from sessions import SESSIONS  # noqa: E402

OFF = dict(DEDUP_BOILERPLATE=False, DEDUP_TOOL_OUTPUTS=False, NEAR_DUPLICATES=False, KEEP_EPHEMERAL=False, MARKDOWN_DEDUP="off", COMPRESS_SYSTEM=False,
           SUMMARISE=False, MIN_SEGMENT_CHARS=0, SUMMARY_WATERMARK=0.7)
CONFIGS = {
    "baseline": OFF,
    "dedup_boilerplate": dict(OFF, DEDUP_BOILERPLATE=True),
    "dedup_boilerplate+paragraphs": dict(OFF, DEDUP_BOILERPLATE=True, MIN_SEGMENT_CHARS=400),
    "dedup_tool_outputs": dict(OFF, DEDUP_TOOL_OUTPUTS=True),
    "near_duplicates": dict(OFF, NEAR_DUPLICATES=True),
    "keep_ephemeral": dict(OFF, KEEP_EPHEMERAL=True),
    "defaults-no-ephemeral": dict(KEEP_EPHEMERAL=False),
    "defaults-reanchor-0.5": dict(EPHEMERAL_REANCHOR=0.5),
    "markdown=first": dict(OFF, MARKDOWN_DEDUP="first"),
    "markdown=latest": dict(OFF, MARKDOWN_DEDUP="latest"),
    "markdown=auto": dict(OFF, MARKDOWN_DEDUP="auto"),
    "summarise": dict(OFF, SUMMARISE=True),
    "summarise-no-watermark": dict(OFF, SUMMARISE=True, SUMMARY_WATERMARK=0.0),
    "compress_system (wait)": dict(OFF, COMPRESS_SYSTEM=True, SYSTEM_WAIT=600.0),
    "compress_system (background)": dict(OFF, COMPRESS_SYSTEM=True, SYSTEM_WAIT=0.0),
    "defaults": {},
}
SUMMARY_RATIO = 0.35  # the stand-in summariser's output length relative to its input


CONVERSATION_SUMMARY_CHARS = 3000  # the stand-in's conversation summaries (~750 tokens)


def stand_in_summary(messages, max_tokens, tools=None, thinking=False, user=None):
    """Instead of DeepSeek: a system prompt comes back at SUMMARY_RATIO of its length, a
    conversation as CONVERSATION_SUMMARY_CHARS characters. The call is billed under the same
    prefix cache as the session, so a summary call that repeats the cached conversation hits."""
    if messages[0]["role"] == "system" and messages[0]["content"] == proxy.SYSTEM_SUMMARY_PROMPT:
        source = messages[-1]["content"]
        text = "Summary: " + source[:int(len(source) * SUMMARY_RATIO)]
    else:
        source = prompt_text(messages[:-1], tools)
        text = "Summary of %d messages: %s" % (len(messages) - 1, source[-CONVERSATION_SUMMARY_CHARS:])
    prompt = prompt_text(messages, tools)
    hit = min(CURRENT_CACHE[0].lookup(prompt), tokens(prompt))
    CURRENT_CACHE[0].remember(prompt)
    SUMMARY_COSTS.append(proxy.usage_cost({"prompt_tokens": tokens(prompt), "prompt_cache_hit_tokens": hit,
                                           "completion_tokens": tokens(text)}))
    return text


SUMMARY_COSTS = []
CURRENT_CACHE = [None]


def tokens(text):
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def prompt_text(messages, tools):
    import json
    return (json.dumps(tools, sort_keys=True) if tools else "") + "".join(render_message(m) for m in messages)


def repeated_line_chars(messages, tools=None, run=3):
    """(characters of tool and user messages, characters of their lines of 20+ characters that the
    same request already carried earlier, the part of those that come in runs of `run` or more such
    lines): what near-duplicate content still costs, and what of it a lossless rewrite could remove."""
    seen, total, repeated, in_runs = set(), 0, 0, 0
    for message in messages:
        text = proxy.content_text(message.get("content"))
        for call in message.get("tool_calls") or ():
            text += "\n" + call["function"]["arguments"]
        counted = message["role"] in ("tool", "user")
        streak = []  # the current run of repeated lines' sizes
        for line in text.split("\n") + [""]:
            if counted:
                total += len(line) + 1
                if len(line) >= 20 and line in seen:
                    repeated += len(line) + 1
                    streak.append(len(line) + 1)
                    continue
                if len(streak) >= run:
                    in_runs += sum(streak)
                streak = []
            seen.add(line)
        if counted:
            total -= 1  # the sentinel line
    return total, repeated, in_runs


def replay(session, settings, transform=None):
    """Bill one session under one configuration; returns a dict of totals. The requests go through
    the proxy's own request core (prepare, then settle with the scripted answer), in this process.
    `transform(messages) -> messages`, when given, rewrites what would be sent (a bench's own ideal)."""
    data_dir = tempfile.mkdtemp(prefix="bench-")
    state = proxy.ProxyState(proxy.Config(**settings), data_dir, api_key="bench", persist=False)
    state.summarise = stand_in_summary
    del SUMMARY_COSTS[:]
    cache = CURRENT_CACHE[0] = PrefixCache()
    totals = dict(requests=0, prompt=0, hit=0, output=0, cost_in=0.0, cost_out=0.0, pipeline_s=0.0,
                  largest=0, chars=0, message_chars=0, repeated_chars=0, repeated_run_chars=0)
    try:
        for request in session.requests:
            state.wait_idle()  # background summaries are ready by the next request
            body = {"model": "x", "messages": request["messages"], "tools": request["tools"]}
            started = time.perf_counter()
            prepared = proxy.prepare(body, state)
            totals["pipeline_s"] += time.perf_counter() - started
            messages = prepared.upstream_body["messages"]
            if transform:
                messages = transform(messages)
            message_chars, repeated, in_runs = repeated_line_chars(messages)
            totals["message_chars"] += message_chars
            totals["repeated_chars"] += repeated
            totals["repeated_run_chars"] += in_runs
            text = prompt_text(messages, request["tools"])
            totals["chars"] += len(text)
            prompt, hit = tokens(text), cache.lookup(text)
            hit = min(hit, prompt)
            cache.remember(text)
            answer = request["answer"]
            cache.remember(text + render_message(answer))
            output = tokens(render_message(answer))
            usage = {"prompt_tokens": prompt, "prompt_cache_hit_tokens": hit,
                     "prompt_cache_miss_tokens": prompt - hit, "completion_tokens": 0}
            collector = proxy.AnswerCollector()
            collector.feed_response({"choices": [{"message": answer, "finish_reason": "stop"}], "usage": usage})
            proxy.settle(prepared, collector)
            totals["requests"] += 1
            totals["prompt"] += prompt
            totals["largest"] = max(totals["largest"], prompt)
            totals["hit"] += hit
            totals["output"] += output
            totals["cost_in"] += proxy.usage_cost(usage, state.config)
            totals["cost_out"] += output * state.config.PRICE_OUTPUT / 1e6
    finally:
        state.wait_idle()
        shutil.rmtree(data_dir, ignore_errors=True)
    totals["summaries"] = len(SUMMARY_COSTS)
    totals["cost_in"] += sum(SUMMARY_COSTS)
    return totals


def compare(session_names, configs):
    """Replay each session under each (label, settings): yields (session name, label, totals, the
    totals of the session's first configuration); totals["total"] is the whole bill."""
    for name in session_names:
        session = SESSIONS[name]()
        first = None
        for label, settings in configs:
            totals = replay(session, settings)
            totals["total"] = totals["cost_in"] + totals["cost_out"]
            first = first or totals
            yield name, label, totals, first


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", default="copilot,cline,aider")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--write-docs", action="store_true", help="also write the table into docs/benchmarks.md")
    args = parser.parse_args()
    proxy.log.disabled = True
    report = Report("replay-" + args.sessions.replace(",", "-"), args.write_docs,
                    "Billed cost per session and configuration: " + args.sessions.replace(",", ", "))
    report.line("| session | configuration | requests | input tokens | largest prompt | cache hit | summary calls "
          "| input cost $ | total cost $ | vs baseline | pipeline ms/request |")
    report.line("|---|---|---|---|---|---|---|---|---|---|---|")
    configs = [(name, CONFIGS[name]) for name in args.configs.split(",")]
    for session_name, config_name, totals, baseline in compare(args.sessions.split(","), configs):
        report.line("| %s | %s | %d | %d | %d | %.1f%% | %d | %.4f | %.4f | %+.1f%% | %.1f |" % (
            session_name, config_name, totals["requests"], totals["prompt"], totals["largest"],
            100.0 * totals["hit"] / max(1, totals["prompt"]), totals["summaries"], totals["cost_in"], totals["total"],
            100.0 * (totals["total"] - baseline["total"]) / baseline["total"],
            1000 * totals["pipeline_s"] / totals["requests"]))
    report.save()


if __name__ == "__main__":
    main()
