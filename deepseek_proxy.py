#!/usr/bin/env python3
"""deepseek-proxy: an OpenAI-compatible proxy for DeepSeek that cuts what agents spend.

Point any OpenAI client (the OpenAI SDKs, VS Code Copilot's custom endpoint, Cline, Roo, Continue,
Aider) at http://127.0.0.1:8000/v1. Every chat request is rewritten by a fixed PIPELINE of stages and
forwarded to DeepSeek with urllib; streamed answers are relayed event by event as they arrive.

The pipeline, in order of work (each stage is one function below, each can be switched off):
  normalise_messages      make the request valid for DeepSeek (developer role, unknown keys)
  restore_reasoning       give back the reasoning_content of earlier assistant turns, which
                          DeepSeek's thinking mode with tools demands and most clients drop
  dedup_boilerplate       remove repeated XML-tagged boilerplate blocks (F-1, SHA-256 fingerprints)
  dedup_tool_outputs      a tool result equal to an earlier one becomes a one-line reference
  dedup_markdown_blocks   a fenced code block equal to an earlier one becomes a reference
  compress_system_prompt  send a DeepSeek-made summary of a long system prompt (pre_sys/, post_sys/)
  summarise_over_budget   replace older turns by a summary when the conversation passes the budget

DeepSeek bills a cached prompt prefix at a fifth of the price of a miss, and clients resend
their history append-only. So every stage is a deterministic function of the history that never
rewrites what it produced for earlier messages: what was sent once is sent byte-identical again.

All model parameters a client sends are ignored: the model, max_tokens and thinking mode come from the
configuration block below (each constant is also a command-line flag, see --help).

The DeepSeek key comes from the environment variable DEEPSEEK_API_KEY, else from the file K.dat.
This proxy spends that key for whoever can reach it: it listens on 127.0.0.1 by default. Do not expose
it to the internet.

Standard library only. License: MIT.
"""

import argparse
import collections
import hashlib
import hmac
import itertools
import http.server
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

__version__ = "0.1.0"

# =====================================================================================================
# Configuration. Every constant in this block is also a command-line flag (--lower-case-name, or the
# name in FLAG_NAMES); its comment is the flag's help. Nothing else in the file defines a knob.
# =====================================================================================================

# -- Upstream and model (these override whatever the client asks for)
DEEPSEEK_BASE = "https://api.deepseek.com"  # upstream base URL (env DEEPSEEK_BASE_URL sets the default)
DEFAULT_MODEL = "deepseek-v4-flash"  # model every request is sent to, whatever the client names
MAX_OUTPUT_TOKENS = 128000  # tokens; forced max_tokens of every answer (reasoning included)
THINKING_MODE = "auto"  # enabled | disabled | auto (on, except when tool_choice forces a tool)
REASONING_EFFORT = ""  # low | high | max, sent upstream when set; empty: DeepSeek's default
UPSTREAM_TIMEOUT = 900.0  # seconds a socket read from DeepSeek may stall before the call fails
UPSTREAM_MAX_RETRIES = 2  # retries of 429/5xx/connection errors before any byte reached the client
UPSTREAM_RETRY_BASE_SLEEP = 1.0  # seconds before the first retry, doubled each attempt

# -- Reasoning cache (thinking mode with tools)
MAX_CACHE_SIZE = 500  # entries in the reasoning_content LRU
PERSIST_REASONING = True  # keep the reasoning cache in DATA_DIR/reasoning_cache.jsonl across restarts

# -- Deduplication
DEDUP_BOILERPLATE = True  # remove XML boilerplate blocks already sent earlier in the conversation (F-1)
MAX_FINGERPRINT_HISTORY = 100  # segments remembered per conversation (LRU) by the boilerplate stage
MIN_SEGMENT_CHARS = 0  # characters; user-message paragraphs this long are fingerprinted too (0: off)
DEDUP_TOOL_OUTPUTS = True  # a tool result equal to an earlier one becomes a reference to it
MIN_TOOL_OUTPUT_CHARS = 200  # characters; shorter tool results are always sent in full
MARKDOWN_DEDUP = "first"  # off | first (cache-safe) | latest (keeps the last copy, rewrites history) | auto
MIN_BLOCK_CHARS = 200  # characters; shorter fenced blocks are never replaced

# -- System-prompt compression
COMPRESS_SYSTEM = True  # summarise long system prompts once through DeepSeek and send the summary
SYSTEM_MIN_CHARS = 8000  # characters; shorter system prompts are sent as they are
SYSTEM_MAX_RATIO = 0.7  # a summary longer than this fraction of the original is rejected
SYSTEM_WAIT = 0.0  # seconds a request waits for a new summary; 0: send the original, summarise behind
SYSTEM_SUMMARY_MAX_TOKENS = 8000  # tokens; max_tokens of a system-prompt summary call

# -- Conversation summarisation
SUMMARISE = True  # summarise older turns when a conversation passes SUMMARY_RATIO x MAX_CONTEXT
MAX_CONTEXT = 128000  # tokens the proxy budgets one conversation to
SUMMARY_RATIO = 0.8  # fraction of MAX_CONTEXT that triggers summarisation
SUMMARY_WATERMARK = 0.7  # fraction of MAX_CONTEXT from which the summary is made in the background (0: off)
TAIL_RATIO = 0.25  # fraction of MAX_CONTEXT of recent turns always kept verbatim
SUMMARY_MODEL = ""  # model of the proxy's summary calls; empty: DEFAULT_MODEL (whose prompt cache it shares)
SUMMARY_MAX_TOKENS = 4000  # tokens; max_tokens of a conversation summary call
SUMMARISE_MAX_RETRIES = 3  # attempts of a summarisation call on 429/5xx/timeouts
SUMMARISE_RETRY_BASE_SLEEP = 2.0  # seconds before the second attempt, doubled each attempt
UPSTREAM_CONTEXT_WINDOW = 1048576  # tokens DeepSeek itself accepts; past it the oldest turns are dropped
PERSIST_SUMMARIES = True  # keep conversation summaries in DATA_DIR/summary_cache.jsonl across restarts
PERSIST_STATS = True  # keep /stats totals in DATA_DIR/stats.json across restarts (saved each minute)

# -- Files (under DATA_DIR: pre_sys/ post_sys/ pre_msg/ post_msg/)
DATA_DIR = "."  # folder of the proxy's files and caches
SAVE_PREPOST_MSGS = False  # dump each request as received (pre_msg/) and as sent upstream (post_msg/)
SAVE_PREPOST_SYSTEM = True  # keep original system prompts in pre_sys/ beside their summaries
MAX_DUMP_FILES = 1000  # message dumps kept per folder; the oldest are removed

# -- Prices, USD per 1M tokens (deepseek-v4-flash list price at launch)
PRICE_INPUT_CACHE_HIT = 0.028  # USD per 1M prompt tokens served from DeepSeek's prefix cache
PRICE_INPUT_CACHE_MISS = 0.14  # USD per 1M prompt tokens not in the cache
PRICE_OUTPUT = 0.28  # USD per 1M completion tokens (reasoning included)

# -- Server
HOST = "127.0.0.1"  # address to listen on; anything but loopback needs --proxy-key or --allow-open
PORT = 8000  # port to listen on (0: any free port, printed at start)
PROXY_KEY = ""  # bearer key clients must send (env PROXY_API_KEY); empty: any key is accepted
ALLOW_OPEN = False  # allow a non-loopback HOST without PROXY_KEY
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # bytes; larger request bodies get 413 without being read
CLIENT_TIMEOUT = 120.0  # seconds a client may stall while sending its request
SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish after SIGTERM/SIGINT
LOG_LEVEL = "INFO"  # DEBUG | INFO | WARNING | ERROR

# -- End of the flag block.

FLAG_NAMES = {"DEEPSEEK_BASE": "upstream"}  # flags not named after their constant
CHOICES = {
    "THINKING_MODE": ("enabled", "disabled", "auto"),
    "REASONING_EFFORT": ("", "low", "high", "max"),
    "MARKDOWN_DEDUP": ("off", "first", "latest", "auto"),
    "LOG_LEVEL": ("DEBUG", "INFO", "WARNING", "ERROR"),
}

# Boilerplate blocks clients repeat in message after message: tag name -> (open tag, close tag).
# The open tag may carry attributes (<attachment filePath="...">). Extend with --boilerplate-tag NAME.
BOILERPLATE_PATTERNS = {
    name: ("<%s>" % name, "</%s>" % name)
    for name in (
        "environment_info", "workspace_info", "userMemory", "sessionMemory", "repoMemory",
        "reminderInstructions", "environment_details", "system-reminder", "attachment", "instructions", "toolUseInstructions", "editFileInstructions",
        "outputFormatting", "memoryInstructions", "custom_instructions",
    )
}

DATA_SUBDIRS = ("pre_sys", "post_sys", "pre_msg", "post_msg")
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
MODEL_PATHS = ("/v1/models", "/models")


def config_help():
    """Flag help from this file's own configuration block: NAME = value  # help."""
    helps = {}
    try:
        with open(os.path.abspath(__file__), encoding="utf-8") as source:
            for line in source:
                match = re.match(r"^([A-Z][A-Z0-9_]*) = .*?  # (.*)$", line)
                if match:
                    helps[match.group(1)] = match.group(2)
                if line.startswith("# -- End of the flag block"):
                    break
    except OSError:
        pass
    return helps


def parse_args(argv=None):
    """Build one flag per configuration constant and write the parsed values back into the module."""
    helps = config_help()
    parser = argparse.ArgumentParser(
        description="OpenAI-compatible proxy for DeepSeek that cuts tokens and cost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module = globals()
    env_defaults = {"DEEPSEEK_BASE": os.environ.get("DEEPSEEK_BASE_URL"),
                    "PROXY_KEY": os.environ.get("PROXY_API_KEY")}
    for name, help_text in helps.items():
        default = env_defaults.get(name) or module[name]
        flag = "--" + FLAG_NAMES.get(name, name.lower()).replace("_", "-")
        kwargs = {"dest": name, "default": default, "help": help_text}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(module[name])
            if name in CHOICES:
                kwargs["choices"] = CHOICES[name]
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--boilerplate-tag", action="append", default=[], metavar="NAME",
                        help="another XML tag whose blocks count as boilerplate (repeatable)")
    args = parser.parse_args(argv)
    for name in helps:
        module[name] = getattr(args, name)
    for name in args.boilerplate_tag:
        BOILERPLATE_PATTERNS[name] = ("<%s>" % name, "</%s>" % name)
    return args


# =====================================================================================================
# Small utilities: logging, hashing, atomic files, a thread-safe LRU, token estimates, error bodies.
# =====================================================================================================

log = logging.getLogger("deepseek_proxy")


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def data_path(*parts):
    return os.path.join(DATA_DIR, *parts)


_disk_warned = set()


def warn_once(what, error):
    """Disk trouble is reported once per kind, then the feature quietly does without the disk."""
    if what not in _disk_warned:
        _disk_warned.add(what)
        log.warning("%s: %s (continuing without it)", what, error)


def atomic_write(path, text):
    """Write a file so that readers see the old or the new content, never half of it."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_text(path):
    """A file's text, or None when it is missing, unreadable, not UTF-8 or empty."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


class LRU:
    """A thread-safe bounded mapping; the least recently used entry goes first."""

    def __init__(self, capacity):
        self.capacity = max(1, int(capacity))
        self._items = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value):
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self):
        with self._lock:
            return len(self._items)

    def items(self):
        with self._lock:
            return list(self._items.items())


_CJK = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]")
_DENSE_CHARS = str.maketrans("", "", "{}[]()<>:;,.=\"'`|\\/*+#@$%^&~-_!?\n\t")


def estimate_tokens(text):
    """DeepSeek tokens in a text: ~3.3 prose characters per token, CJK ~0.6 token per character,
    punctuation-heavy code and JSON denser. Scaled by the calibration learnt from real usage."""
    if not text:
        return 0
    cjk = len(_CJK.findall(text)) if not text.isascii() else 0
    dense = len(text) - len(text.translate(_DENSE_CHARS))  # punctuation: a token each, nearly
    plain = len(text) - cjk - dense
    return int((plain / 3.4 + dense * 0.55 + cjk * 0.6) * token_calibration.factor) + 1


class TokenCalibration:
    """Ratio of DeepSeek's prompt_tokens to our estimate, learnt as a moving average."""

    def __init__(self):
        self.factor = 1.0
        self._lock = threading.Lock()

    def observe(self, estimated, actual):
        """Fold in one (estimate, DeepSeek's prompt_tokens) pair; the estimate used self.factor."""
        if not estimated or not actual:
            return
        with self._lock:
            raw = actual / (estimated / self.factor)
            self.factor = min(3.0, max(0.33, 0.7 * self.factor + 0.3 * raw))


token_calibration = TokenCalibration()


def content_text(content):
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def map_content_text(content, transform):
    """Apply transform to each text of a content (the string, or each text part); new object."""
    if isinstance(content, str):
        return transform(content)
    if isinstance(content, list):
        return [dict(part, text=transform(part["text"]))
                if isinstance(part, dict) and isinstance(part.get("text"), str) else part
                for part in content]
    return content


def message_tokens(message):
    tokens = 4 + estimate_tokens(content_text(message.get("content")))
    tokens += estimate_tokens(message.get("reasoning_content") or "")
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        tokens += 8 + estimate_tokens(str(function.get("name", "")) + str(function.get("arguments", "")))
    return tokens


def error_body(message, error_type="invalid_request_error", code=None, param=None):
    """The one place that knows the OpenAI/DeepSeek error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param,
                      "code": code or error_type}}


def usage_cost(usage):
    """USD billed for one DeepSeek usage object."""
    if not usage:
        return 0.0
    hit = usage.get("prompt_cache_hit_tokens") or 0
    miss = usage.get("prompt_cache_miss_tokens")
    if miss is None:
        miss = max(0, (usage.get("prompt_tokens") or 0) - hit)
    return (hit * PRICE_INPUT_CACHE_HIT + miss * PRICE_INPUT_CACHE_MISS
            + (usage.get("completion_tokens") or 0) * PRICE_OUTPUT) / 1e6


def load_api_key():
    """DEEPSEEK_API_KEY, else the first non-empty, non-comment line of K.dat (data dir, then script dir)."""
    key = os.environ.get("DEEPSEEK_API_KEY", "").strip()
    if key:
        return key
    for folder in (DATA_DIR, SCRIPT_DIR):
        text = read_text(os.path.join(folder, "K.dat"))
        for line in (text or "").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                return line
    return ""


# =====================================================================================================
# Conversation state. The proxy needs no conversation id from the client: every stage works from the
# history the request carries. What survives between requests is keyed by what the client sends back:
#   reasoning_cache  tool-call id (or hash of the preceding message + the answer text) -> reasoning
#   summary_cache    SHA-256 of exactly the messages a summary replaced -> the summary
#   post_sys/        SHA-256 of a system prompt -> its summary, on disk
# =====================================================================================================

def normalise_answer_text(text):
    """Clients echo an answer back with whitespace trimmed; compare answers without it."""
    return "\n".join(line.rstrip() for line in (text or "").strip().splitlines())


def reasoning_key(message, previous):
    """The one key of an assistant turn in the reasoning cache, for writing and for reading.

    A turn with tool calls is found by its first call id: DeepSeek makes them unique and every
    client sends them back verbatim. A text-only turn is found by its trimmed text together with the
    message it answered, so that two conversations that both answered "Done." do not share reasoning.
    """
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"]:
            return "call:" + call["id"]
    answer = normalise_answer_text(content_text(message.get("content")))
    if not answer:
        return None
    asked = ""
    if previous is not None:
        asked = previous.get("tool_call_id") or normalise_answer_text(content_text(previous.get("content")))
    return "text:" + sha256_text(asked + "\x00" + answer)


class PersistentLRU:
    """An LRU (reasoning by reasoning_key, summaries by fingerprint), optionally mirrored to an
    append-only JSONL file so that a restart in the middle of a session loses nothing.

    Each new entry is appended as one line (cheap and crash-safe); the file is rewritten compactly
    when it holds more than twice the capacity. A corrupt line is skipped.
    """

    def __init__(self, capacity, path=None):
        self.entries = LRU(capacity)
        self.path = path
        self._file_lock = threading.Lock()
        self._lines = 0

    def load(self):
        if not self.path or not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    self._lines += 1
                    try:
                        entry = json.loads(line)
                        self.entries.put(entry["k"], entry["v"])
                    except (ValueError, KeyError, TypeError):
                        continue
        except (OSError, UnicodeDecodeError) as error:
            warn_once("reading " + self.path, error)
        log.info("%s: %d entries loaded", os.path.basename(self.path), len(self.entries))

    def recall(self, key):
        return self.entries.get(key) if key else None

    def remember(self, key, value):
        if not key or value is None or self.entries.get(key) == value:
            return
        self.entries.put(key, value)
        if self.path:
            self._append(json.dumps({"k": key, "v": value}) + "\n")  # ASCII: any text is safe

    def _append(self, line):
        with self._file_lock:
            try:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(line)
                self._lines += 1
                if self._lines > 2 * self.entries.capacity:
                    self._compact()
            except OSError as error:
                warn_once("writing " + self.path, error)

    def _compact(self):
        items = self.entries.items()
        atomic_write(self.path, "".join(json.dumps({"k": k, "v": v}) + "\n" for k, v in items))
        self._lines = len(items)


reasoning_cache = PersistentLRU(MAX_CACHE_SIZE)
summary_cache = PersistentLRU(MAX_CACHE_SIZE)  # region fingerprint -> {summary, pulled}


def wait_until_idle(lock, in_flight, timeout):
    """Wait until `in_flight`, a dict of Events guarded by `lock`, is empty; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            events = list(in_flight.values())
        if not events:
            return True
        events[0].wait(max(0.0, deadline - time.monotonic()))
    return False


def describe_error(error):
    """DeepSeek's own message for an UpstreamError, else the exception itself."""
    body = getattr(error, "body", None)
    return body["error"].get("message") if isinstance(body, dict) and "error" in body else error


class SystemPromptStore:
    """Summaries of system prompts by the SHA-256 of the original: post_sys/<sha256>.txt on disk
    (re-read when its mtime changes, so a hand-edited summary is used), mirrored in a small LRU.

    A new prompt is summarised by one background thread however many requests bring it at once;
    a request waits for it up to SYSTEM_WAIT seconds. A summary that is not at most SYSTEM_MAX_RATIO
    of the original is rejected by storing the original itself as the "summary", so the decision is
    not retried. A failed call is retried after a growing pause (60 s, doubled), never per request.
    """

    def __init__(self):
        self.memory = LRU(256)  # digest -> (mtime or None, text)
        self.failures = LRU(256)  # digest -> (failures so far, monotonic time of the next try)
        self.in_flight = {}  # digest -> threading.Event set when the attempt ends
        self._lock = threading.Lock()

    def lookup(self, text):
        """The text to send for this system prompt: its summary, or None while there is none."""
        digest = sha256_text(text)
        found = self._stored(digest)
        if found is not None:
            return found
        done = self._start(digest, text)
        if done is not None and SYSTEM_WAIT > 0:
            done.wait(SYSTEM_WAIT)
            return self._stored(digest)
        return None

    def _stored(self, digest):
        path = data_path("post_sys", digest + ".txt")
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = None
        cached = self.memory.get(digest)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        if mtime is None:
            return cached[1] if cached else None
        text = read_text(path)  # None when empty, unreadable or not UTF-8: made again
        if text is not None:
            self.memory.put(digest, (mtime, text))
        return text

    def _start(self, digest, text):
        with self._lock:
            if digest in self.in_flight:
                return self.in_flight[digest]
            failed = self.failures.get(digest)
            if failed and time.monotonic() < failed[1]:
                return None
            done = self.in_flight[digest] = threading.Event()
        threading.Thread(target=self._summarise, args=(digest, text, done), daemon=True,
                         name="summarise-system-" + digest[:8]).start()
        return done

    def _summarise(self, digest, text, done):
        try:
            if SAVE_PREPOST_SYSTEM:
                self._save("pre_sys", digest, text)
            summary = request_summary(
                [{"role": "system", "content": SYSTEM_SUMMARY_PROMPT}, {"role": "user", "content": text}],
                SYSTEM_SUMMARY_MAX_TOKENS)
            if len(summary) > SYSTEM_MAX_RATIO * len(text):
                log.info("system prompt %s: summary of %d chars for %d is not short enough; keeping the "
                         "original", digest[:12], len(summary), len(text))
                summary = text
            else:
                log.info("system prompt %s summarised: %d -> %d chars", digest[:12], len(text), len(summary))
            self._save("post_sys", digest, summary)
            self.memory.put(digest, (self._mtime(digest), summary))
            self.failures.put(digest, None)
        except Exception as error:  # never fatal: the original is sent meanwhile
            count = (self.failures.get(digest) or (0, 0))[0] + 1
            pause = 60.0 * 2 ** min(count - 1, 6)
            self.failures.put(digest, (count, time.monotonic() + pause))
            log.warning("system prompt %s: summarising failed (%s); sending the original, next try in %.0fs",
                        digest[:12], describe_error(error), pause)
        finally:
            with self._lock:
                self.in_flight.pop(digest, None)
            done.set()

    @staticmethod
    def _save(folder, digest, text):
        try:
            atomic_write(data_path(folder, digest + ".txt"), text)
        except OSError as error:
            warn_once("writing " + data_path(folder), error)

    @staticmethod
    def _mtime(digest):
        try:
            return os.stat(data_path("post_sys", digest + ".txt")).st_mtime_ns
        except OSError:
            return None

    def wait_idle(self, timeout=30.0):
        """Wait for summaries under way (tests, benchmarks)."""
        return wait_until_idle(self._lock, self.in_flight, timeout)


system_prompts = SystemPromptStore()


class ConversationSummaries:
    """Makes conversation summaries, at most one at a time per conversation (keyed by its head),
    in the request's thread or in the background; results go to summary_cache. After a failure the
    conversation is not summarised again for a growing pause (30 s, doubled)."""

    def __init__(self):
        self.in_flight = {}  # head fingerprint -> Event set when that conversation's summary ends
        self.failures = LRU(256)  # head fingerprint -> (failures, monotonic time of the next try)
        self._lock = threading.Lock()

    def summarise(self, plan, prefix, ctx, background=False):
        """Make the summary for plan (`prefix`: the messages as sent upstream up to plan.end).
        Returns the summary, or None (failed, backing off, or started in the background). If this
        conversation already has one under way, wait for that one instead (not in the background)."""
        with self._lock:
            failed = self.failures.get(plan.head_key)
            if failed and time.monotonic() < failed[1]:
                return None
            under_way = self.in_flight.get(plan.head_key)
            if under_way is None:
                done = self.in_flight[plan.head_key] = threading.Event()
        if under_way is not None:
            if not background:
                under_way.wait(UPSTREAM_TIMEOUT)
            return None
        if background:
            threading.Thread(target=self._run, args=(plan, prefix, ctx, done), daemon=True,
                             name="summarise-" + plan.key[:8]).start()
            return None
        return self._run(plan, prefix, ctx, done)

    def _run(self, plan, prefix, ctx, done):
        try:
            summary = self._call(prefix, ctx)
            summary_cache.remember(plan.key, {"summary": summary, "pulled": plan.pulled})
            self.failures.put(plan.head_key, None)
            log.info("[%s] summarised %d messages into %d chars", ctx.request_id, plan.end - plan.head, len(summary))
            return summary
        except Exception as error:  # never fatal: the caller falls back
            count = (self.failures.get(plan.head_key) or (0, 0))[0] + 1
            pause = 30.0 * 2 ** min(count - 1, 6)
            self.failures.put(plan.head_key, (count, time.monotonic() + pause))
            log.warning("[%s] conversation summary failed (%s); next try in %.0fs", ctx.request_id,
                        describe_error(error), pause)
            return None
        finally:
            with self._lock:
                self.in_flight.pop(plan.head_key, None)
            done.set()

    @staticmethod
    def _call(prefix, ctx):
        """Shaped for DeepSeek's prefix cache: the conversation exactly as sent before (same tools,
        thinking and reasoning), then one instruction; tool_choice none so it answers in text."""
        messages = prefix + [{"role": "user", "content": CONVERSATION_SUMMARY_PROMPT}]
        return request_summary(messages, SUMMARY_MAX_TOKENS * (3 if ctx.thinking else 1),
                               tools=ctx.tools, thinking=ctx.thinking)

    def wait_for(self, head_key):
        """Wait for this conversation's summary under way, if any; True if there was one."""
        with self._lock:
            under_way = self.in_flight.get(head_key)
        if under_way is None:
            return False
        under_way.wait(UPSTREAM_TIMEOUT)
        return True

    def wait_idle(self, timeout=30.0):
        """Wait for summaries under way (tests, benchmarks)."""
        return wait_until_idle(self._lock, self.in_flight, timeout)


conversation_summaries = ConversationSummaries()
deepseek_api_key = ""  # set by main(); never logged


class RequestContext:
    """What one request's stages know and record: decisions, savings, counters for the log."""

    def __init__(self, body):
        self.request_id = uuid.uuid4().hex[:12]
        self.tools = body.get("tools") or None
        self.thinking = thinking_enabled(body)
        self.saved = collections.Counter()  # stage name -> estimated tokens removed
        self.reasoning_restored = 0
        self.reasoning_filled = 0
        self.notes = []  # short remarks for the log line and the X-Proxy-Notes header
        self.normalised = None  # the messages after normalise_messages, as the client meant them
        self.tokens_in = 0  # estimated prompt tokens as the client sent them
        self.tokens_out = 0  # estimated prompt tokens after the pipeline
        self.estimate_error = None  # (estimate - DeepSeek's prompt_tokens) / prompt_tokens
        self._token_memo = {}  # id(message) -> (message, tokens)
        self._tools_tokens = None

    def message_tokens(self, message):
        """Estimated tokens of a message, computed once per message object in this request (the
        stages pass unchanged messages on as the same objects)."""
        entry = self._token_memo.get(id(message))
        if entry is None or entry[0] is not message:
            entry = self._token_memo[id(message)] = (message, message_tokens(message))
        return entry[1]

    def prompt_tokens(self, messages):
        """Estimated prompt tokens of messages plus this request's tool definitions."""
        if self._tools_tokens is None:
            self._tools_tokens = estimate_tokens(json.dumps(self.tools)) if self.tools else 0
        return sum(self.message_tokens(message) for message in messages) + self._tools_tokens

    def removed(self, stage, text, kept=""):
        """Record that `stage` replaced `text` by `kept`."""
        self.saved[stage] += estimate_tokens(text) - estimate_tokens(kept)


def thinking_enabled(body):
    """THINKING_MODE decides; auto is on except where DeepSeek's thinking mode rejects the request
    (tool_choice 'required' or a named tool), which then goes with thinking disabled, not failed."""
    if THINKING_MODE != "auto":
        return THINKING_MODE == "enabled"
    choice = body.get("tool_choice")
    return not (choice == "required" or isinstance(choice, dict))


# =====================================================================================================
# Pipeline stages. Each takes the messages and the RequestContext and returns new messages; none
# mutates its input, and each records what it removed in ctx. run_pipeline() keeps a failing stage's
# input, so no stage can break a request. PIPELINE, at the end of this section, is the order of work.
# =====================================================================================================

MESSAGE_KEYS = {
    "system": ("role", "content", "name"),
    "user": ("role", "content", "name"),
    "assistant": ("role", "content", "name", "reasoning_content", "tool_calls", "prefix"),
    "tool": ("role", "content", "tool_call_id"),
}
ROLE_ALIASES = {"developer": "system"}


def normalise_part(part):
    if part.get("type") == "text":
        return {"type": "text", "text": part["text"]}
    return {key: part[key] for key in ("type", "image_url", "input_audio", "file") if key in part}


def normalise_tool_call(call):
    function = call.get("function") or {}
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": call.get("id"), "type": call.get("type") or "function",
            "function": {"name": function.get("name"), "arguments": arguments}}


def is_clean(message):
    """True when normalise_messages would return the message unchanged."""
    keys = MESSAGE_KEYS.get(message["role"])
    if keys is None or not isinstance(message.get("content"), (str, type(None))) or not set(message) <= set(keys):
        return False
    if message["role"] == "assistant":
        if "content" not in message or ("tool_calls" in message and not message["tool_calls"]) \
                or ("reasoning_content" in message and not isinstance(message["reasoning_content"], str)):
            return False
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            if set(call) != {"id", "type", "function"} or set(function) != {"name", "arguments"} \
                    or not isinstance(function["arguments"], str) or not call["type"]:
                return False
    return True


def normalise_messages(messages, ctx):
    """Make the client's messages valid for DeepSeek: role developer becomes system, keys DeepSeek
    does not define (copilot_cache_control, cot_id, cache_control on parts, ...) go, tool-call
    arguments are strings. Content stays a string or a list of parts, as the client sent it."""
    result = []
    for message in messages:
        if is_clean(message):
            result.append(message)  # the same object: nothing to change, nothing to copy
            continue
        role = ROLE_ALIASES.get(message["role"], message["role"])
        clean = {"role": role}
        for key in MESSAGE_KEYS[role][1:]:
            if key in message:
                clean[key] = message[key]
        if isinstance(clean.get("content"), list):
            clean["content"] = [normalise_part(part) for part in clean["content"]]
        if role == "assistant":
            if clean.get("tool_calls"):
                clean["tool_calls"] = [normalise_tool_call(call) for call in clean["tool_calls"]]
            else:
                clean.pop("tool_calls", None)
            if clean.get("reasoning_content") is None:
                clean.pop("reasoning_content", None)  # null means "not sent": restored or left out
            if "content" not in clean:
                clean["content"] = None
        result.append(clean)
    ctx.normalised = result
    return result


def restore_reasoning(messages, ctx):
    """Give each earlier assistant turn its reasoning_content back when thinking is on and the
    request has tools (DeepSeek answers 400 otherwise). Unknown reasoning (a restart without the
    cache file, an eviction, a turn from another model) becomes "", which DeepSeek accepts. Without
    tools or without thinking DeepSeek ignores the field, so nothing is added: no bytes, no tokens."""
    if not (ctx.thinking and ctx.tools):
        return messages
    result = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and message.get("reasoning_content") is None:
            previous = messages[index - 1] if index else None
            reasoning = reasoning_cache.recall(reasoning_key(message, previous))
            if reasoning is None:
                reasoning = ""
                ctx.reasoning_filled += 1
            else:
                ctx.reasoning_restored += 1
            message = dict(message, reasoning_content=reasoning)
        result.append(message)
    return result


def boilerplate_regex():
    """One regex matching any block of BOILERPLATE_PATTERNS, attributes on the open tag allowed."""
    alternatives = []
    for open_tag, close_tag in BOILERPLATE_PATTERNS.values():
        opening = re.escape(open_tag[:-1]) + r"(?:\s[^>]*)?>" if open_tag.endswith(">") else re.escape(open_tag)
        alternatives.append(opening + r".*?" + re.escape(close_tag))
    return re.compile("|".join("(?:%s)" % alt for alt in alternatives), re.DOTALL)


_boilerplate_cache = {}


def current_boilerplate_regex():
    """The boilerplate regex for the table as it is now; rebuilt only when the table changes."""
    key = tuple(BOILERPLATE_PATTERNS.items())
    regex = _boilerplate_cache.get(key)
    if regex is None:
        regex = boilerplate_regex()
        _boilerplate_cache.clear()
        _boilerplate_cache[key] = regex
    return regex


PLACEHOLDER = "[repeated context omitted]"
DELTA_NOTE = "[lines unchanged since the previous %s omitted]"


def dedup_boilerplate(messages, ctx):
    """F-1: boilerplate blocks (BOILERPLATE_PATTERNS) in user and tool messages.

    A block whose SHA-256 was seen earlier in the conversation is removed. A block that differs
    from the previous block of its tag in only a few lines (Cline's environment_details, where only
    the time and cost change) is cut down to its new lines. With MIN_SEGMENT_CHARS > 0, plain
    paragraphs of user messages at least that long are fingerprinted too. A message left empty
    gets a short placeholder.

    The conversation is the history the request carries, scanned from the start with a bounded LRU
    of MAX_FINGERPRINT_HISTORY fingerprints. So the output for a message depends only on the
    messages before it: a restart or a second client gives the same bytes, and what was produced for
    earlier messages comes out again unchanged, which keeps DeepSeek's prefix cache hitting.
    """
    if not DEDUP_BOILERPLATE:
        return messages
    blocks = current_boilerplate_regex()
    seen = collections.OrderedDict()  # fingerprint -> True, least recently seen first
    previous_lines = {}  # tag -> set of the lines of the last block with that tag

    def already_seen(segment):
        fingerprint = hashlib.sha256(segment.encode("utf-8", "surrogatepass")).digest()
        if fingerprint in seen:
            seen.move_to_end(fingerprint)
            return True
        seen[fingerprint] = True
        if len(seen) > MAX_FINGERPRINT_HISTORY:
            seen.popitem(last=False)
        return False

    def reduce_block(block):
        """The block as sent: "" if seen, its new lines if mostly unchanged, else itself."""
        tag = re.match(r"<([^\s>]+)", block).group(1)
        lines = block.splitlines()
        known = previous_lines.get(tag)
        previous_lines[tag] = set(lines)
        if already_seen(block):
            return ""
        if known is None or len(lines) < 4:
            return block
        fresh = [line for line in lines[1:-1] if line not in known and line.strip()]
        if len(fresh) * 2 > len(lines):
            return block
        return "\n".join([lines[0], DELTA_NOTE % tag] + fresh + [lines[-1]])

    def reduce_paragraphs(text):
        parts = re.split(r"(\n\s*\n)", text)
        kept = [part for part in parts if len(part) < MIN_SEGMENT_CHARS or not already_seen(part)]
        if len(kept) == len(parts):
            return text
        reduced = "".join(kept)
        ctx.removed("dedup_boilerplate", text, reduced)
        return reduced

    def reduce_text(text, role):
        pieces, last = [], 0
        for match in blocks.finditer(text):
            plain = text[last:match.start()]
            pieces.append(reduce_paragraphs(plain) if MIN_SEGMENT_CHARS and role == "user" else plain)
            reduced = reduce_block(match.group(0))
            if reduced != match.group(0):
                ctx.removed("dedup_boilerplate", match.group(0), reduced)
            pieces.append(reduced)
            last = match.end()
        tail = text[last:]
        pieces.append(reduce_paragraphs(tail) if MIN_SEGMENT_CHARS and role == "user" else tail)
        result = "".join(pieces)
        if result == text:
            return text
        return re.sub(r"\n{3,}", "\n\n", result).strip()

    result = []
    for message in messages:
        if message["role"] in ("user", "tool") and message.get("content"):
            content = map_content_text(message["content"], lambda text, role=message["role"]: reduce_text(text, role))
            if content != message["content"]:
                if not content_text(content).strip() and not has_non_text_parts(content):
                    content = PLACEHOLDER if isinstance(content, str) else [{"type": "text", "text": PLACEHOLDER}]
                message = dict(message, content=content)
        result.append(message)
    return result


def has_non_text_parts(content):
    return isinstance(content, list) and any(part.get("type") != "text" for part in content)


def dedup_tool_outputs(messages, ctx):
    """A tool result byte-identical to an earlier one (a file read again) becomes a one-line
    reference to the earlier call. Each text part counts alone, so Cline's results, whose second
    part is an ever-changing environment_details, are caught too. The first copy always stays."""
    if not DEDUP_TOOL_OUTPUTS:
        return messages
    call_names = {}
    first_seen = {}  # SHA-256 of an output text -> the tool_call_id that first returned it
    result = []
    for message in messages:
        for call in message.get("tool_calls") or ():
            call_names[call.get("id")] = (call.get("function") or {}).get("name") or "tool"
        if message["role"] != "tool" or not message.get("content"):
            result.append(message)
            continue

        def replace_repeat(text, call_id=message.get("tool_call_id")):
            if len(text) < MIN_TOOL_OUTPUT_CHARS:
                return text
            fingerprint = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            earlier = first_seen.setdefault(fingerprint, call_id)
            if earlier == call_id:
                return text
            reference = "[Same output as tool call %s (%s) above, unchanged.]" % (
                earlier, call_names.get(earlier, "tool"))
            ctx.removed("dedup_tool_outputs", text, reference)
            return reference

        content = map_content_text(message["content"], replace_repeat)
        result.append(dict(message, content=content) if content != message["content"] else message)
    return result


_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})([^\n]*)$")


def find_fenced_blocks(text):
    """(start, end, opening line, closing line, body) of each closed fenced code block."""
    if "```" not in text and "~~~" not in text:
        return []
    blocks, offset, opening = [], 0, None
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        match = _FENCE.match(stripped)
        if opening is None:
            if match and not (match.group(2)[0] == "`" and "`" in match.group(3)):
                opening = (offset, match.group(2), stripped, offset + len(line))
        elif match and match.group(2)[0] == opening[1][0] and len(match.group(2)) >= len(opening[1]) \
                and not match.group(3).strip():
            start, _fence, open_line, body_start = opening
            blocks.append((start, offset + len(stripped), open_line, stripped, text[body_start:offset]))
            opening = None
        offset += len(line)
    return blocks


def dedup_markdown_blocks(messages, ctx):
    """Fenced code blocks (``` or ~~~) repeated exactly, in user, assistant and tool messages.

    MARKDOWN_DEDUP = first: later copies become a short reference, the first stays (cache-safe).
    latest: every copy but the last becomes a reference (the seed's rule; it rewrites history that
    DeepSeek has cached, so each repeat turns the rest of the prompt into cache misses).
    auto: like latest inside the newest stretch of messages since an assistant turn (none of it is
    cached yet, so moving the full copy later costs nothing) and like first across turns.
    """
    if MARKDOWN_DEDUP == "off":
        return messages
    occurrences = collections.defaultdict(list)  # body hash -> [(message index, turn)]
    turn = 0
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            turn += 1
        if message["role"] in ("user", "assistant", "tool"):
            for block in find_fenced_blocks(content_text(message.get("content"))):
                if len(block[4]) >= MIN_BLOCK_CHARS:
                    occurrences[sha256_text(block[4])].append((index, turn))
    keep = {}  # body hash -> index of the message whose copy stays full
    touched = set()  # messages with a copy to replace
    for fingerprint, places in occurrences.items():
        if len(places) < 2:
            continue
        if MARKDOWN_DEDUP == "latest":
            keep[fingerprint] = places[-1][0]
        elif MARKDOWN_DEDUP == "auto":
            first_turn = places[0][1]
            keep[fingerprint] = [index for index, turn_of in places if turn_of == first_turn][-1]
        else:
            keep[fingerprint] = places[0][0]
        touched.update(index for index, _turn in places if index != keep[fingerprint])
    if not touched:
        return messages

    result = []
    for index, message in enumerate(messages):
        if index in touched:
            def replace_blocks(text, index=index):
                pieces, last = [], 0
                for start, end, open_line, close_line, body in find_fenced_blocks(text):
                    fingerprint = sha256_text(body) if len(body) >= MIN_BLOCK_CHARS else None
                    if fingerprint in keep and keep[fingerprint] != index:
                        where = "below" if keep[fingerprint] > index else "above"
                        pieces.append(text[last:start])
                        pieces.append("%s\n[identical to the copy of this block %s]\n%s" % (
                            open_line, where, close_line))
                        last = end
                        ctx.removed("dedup_markdown_blocks", body)
                return "".join(pieces) + text[last:] if last else text
            content = map_content_text(message["content"], replace_blocks)
            if content != message["content"]:
                message = dict(message, content=content)
        result.append(message)
    return result


SYSTEM_SUMMARY_PROMPT = (
    "Rewrite the system prompt you are given for an AI coding assistant so that it is as short as "
    "possible while meaning exactly the same to the assistant. Keep every instruction, rule, "
    "constraint, prohibition, name, identifier, file path, tool name and tool reference, output-format "
    "requirement and example that the assistant must follow, and keep its XML section tags (such as "
    "<instructions>) in their order. Remove repetition, filler, politeness and explanations of why. "
    "Answer with the rewritten prompt only.")


def compress_system_prompt(messages, ctx):
    """A system message of at least SYSTEM_MIN_CHARS is replaced by its summary, made once per
    distinct prompt through DeepSeek and kept in post_sys/<sha256>.txt (originals in pre_sys/).
    Until the summary exists the original goes (SYSTEM_WAIT = 0), so no request waits for it."""
    if not COMPRESS_SYSTEM:
        return messages
    result = []
    for message in messages:
        if message["role"] == "system":
            text = content_text(message.get("content"))
            if len(text) >= SYSTEM_MIN_CHARS and not has_non_text_parts(message.get("content")):
                summary = system_prompts.lookup(text)
                if summary is not None and summary != text:
                    ctx.removed("compress_system_prompt", text, summary)
                    ctx.notes.append("system %d->%d chars" % (len(text), len(summary)))
                    message = dict(message, content=summary)
        result.append(message)
    return result


CONVERSATION_SUMMARY_PROMPT = (
    "Summarise the conversation above so that the work can continue from your summary alone, "
    "without the messages it replaces. Do not call tools. Write in this structure:\n"
    "Goal: what the user wants, in their terms.\n"
    "Decisions and constraints: what was agreed or required.\n"
    "Files and identifiers: every file path, function, class, command and value that matters, exactly.\n"
    "Errors seen: error messages and their causes, exactly.\n"
    "Done: what has been done, tool results that still matter.\n"
    "Remaining: what is left to do, and the next step.\n"
    "Be complete about facts and brief in words.")
SUMMARY_OPEN = "<conversation-summary>\nThe earlier part of this conversation, summarised by the proxy:\n"
SUMMARY_CLOSE = "\n</conversation-summary>"


class SummaryPlan:
    """Where a conversation is cut: messages[:head] stay, messages[head:end] are represented by a
    summary (with the last user message among them, `pulled`, kept verbatim before it), and
    messages[end:] stay. `key` fingerprints messages[:end] exactly: the summary cache key;
    `head_key` fingerprints messages[:head]: the conversation."""

    def __init__(self, head, end, fingerprints, pulled):
        self.head, self.end, self.pulled = head, end, pulled
        self.key, self.head_key = fingerprints[end], fingerprints[head]

    def apply(self, messages, summary):
        pulled = [messages[self.pulled]] if self.pulled is not None else []
        inserted = {"role": "user", "content": SUMMARY_OPEN + summary + SUMMARY_CLOSE}
        return messages[:self.head] + pulled + [inserted] + messages[self.end:]


def conversation_head(messages):
    """The leading part that is never summarised: system messages and the first user message
    after them (a byte-stable context message like Copilot's, or the task itself)."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    if head < len(messages) and messages[head]["role"] == "user":
        head += 1
    return head


def prefix_fingerprints(messages):
    """fingerprints[k] identifies messages[:k] exactly (a SHA-256 chain, each message hashed once)."""
    chain, fingerprints = b"", [b""]
    for message in messages:
        encoded = json.dumps(message, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        chain = hashlib.sha256(chain + hashlib.sha256(encoded).digest()).digest()
        fingerprints.append(chain)
    return [fingerprint.hex() for fingerprint in fingerprints]


def tail_start(messages, sizes, floor, tail_ratio):
    """First index of the recent messages kept verbatim: at most tail_ratio x MAX_CONTEXT tokens,
    never starting on a tool result (its tool call must stay with it), never before `floor`."""
    budget, used, start = tail_ratio * MAX_CONTEXT, 0, len(messages)
    while start > floor and used + sizes[start - 1] <= budget:
        start -= 1
        used += sizes[start]
    if start == len(messages):
        start -= 1  # the last message is always kept
    while start > floor and messages[start]["role"] == "tool":
        start -= 1  # back to the assistant message whose calls these results answer
    return start


def summarise_over_budget(messages, ctx):
    """Past SUMMARY_RATIO x MAX_CONTEXT estimated tokens, replace the older turns by a summary.

    Kept verbatim: system messages, the first user message, the last user message, and the recent
    turns (TAIL_RATIO x MAX_CONTEXT). The summary is cached under the fingerprint of exactly what it
    replaced, so the next requests of the conversation get identical bytes (DeepSeek's cache keeps
    hitting) until the budget is crossed again; then summary and newer turns are summarised anew.
    From SUMMARY_WATERMARK on, the next summary is made in the background, so that the request that
    crosses the budget finds it ready instead of waiting for it. If summarising fails, the
    conversation goes whole, or without its oldest turns if DeepSeek's own window would refuse it.
    This stage never fails a request.
    """
    if not SUMMARISE:
        return messages
    budget = SUMMARY_RATIO * MAX_CONTEXT
    watermark = SUMMARY_WATERMARK * MAX_CONTEXT if 0 < SUMMARY_WATERMARK < SUMMARY_RATIO else budget
    total = ctx.prompt_tokens(messages)
    if total < watermark:
        return messages
    head = conversation_head(messages)
    fingerprints = prefix_fingerprints(messages)
    current, done_until, current_tokens, newest = choose_summary(messages, ctx, head, fingerprints, budget)
    if current_tokens >= budget and conversation_summaries.wait_for(fingerprints[head]):
        current, done_until, current_tokens, newest = choose_summary(messages, ctx, head, fingerprints, budget)
    if current_tokens < watermark or (current_tokens < budget and newest > done_until):
        return current  # under the watermark, or the next summary is ready for when it is needed
    early = current_tokens < budget  # prepared ahead: by the crossing the tail will have grown
    tail_ratio = max(TAIL_RATIO / 2, TAIL_RATIO - (SUMMARY_RATIO - SUMMARY_WATERMARK)) if early else TAIL_RATIO
    end = tail_start(messages, [ctx.message_tokens(message) for message in messages], done_until, tail_ratio)
    if end <= done_until:
        return current  # nothing older than the tail is left to summarise
    users = [index for index in range(head, end) if messages[index]["role"] == "user"]
    plan = SummaryPlan(head, end, fingerprints, users[-1] if users else None)
    offset = len(current) - len(messages)  # current[k + offset] is messages[k] for k >= done_until
    prefix = current[:end + offset]
    if early:
        conversation_summaries.summarise(plan, prefix, ctx, background=True)
        ctx.notes.append("summary of %d messages started in the background" % (end - head))
        return current
    summary = conversation_summaries.summarise(plan, prefix, ctx)
    if summary is None:
        return fit_upstream_window(current, ctx)
    result = plan.apply(messages, summary)
    ctx.saved["summarise_over_budget"] = total - ctx.prompt_tokens(result)
    ctx.notes.append("summarised %d messages" % (end - head))
    return result


def choose_summary(messages, ctx, head, fingerprints, budget):
    """(messages to send, index up to which a summary stands in, their tokens, the end of the
    newest cached summary).

    Among the cached summaries of this conversation (and none at all), the oldest that brings the
    conversation under the budget: it is the one the previous requests used, so the bytes stay the
    same until the budget forces the next one. If none does, the newest."""
    candidates = [(head, None)] + [(end, summary_cache.recall(fingerprints[end]))
                                   for end in range(head + 1, len(messages))]
    candidates = [(end, entry) for end, entry in candidates if end == head or entry]
    total = ctx.prompt_tokens(messages)
    for end, entry in candidates:
        if entry is None:
            current = messages
        else:
            current = SummaryPlan(head, end, fingerprints, entry["pulled"]).apply(messages, entry["summary"])
        current_tokens = ctx.prompt_tokens(current)
        if current_tokens < budget:
            break
    if end > head:
        ctx.saved["summarise_over_budget"] = total - current_tokens
    return current, end, current_tokens, candidates[-1][0]


def fit_upstream_window(messages, ctx):
    """After a failed summary: send everything if DeepSeek's window takes it, else drop the oldest
    whole turns after the head (a turn: a message with the tool results that answer it), never the
    last user message nor the newest turn."""
    limit = UPSTREAM_CONTEXT_WINDOW - MAX_OUTPUT_TOKENS
    total = ctx.prompt_tokens(messages)
    head = conversation_head(messages)
    turns = []
    for message in messages[head:]:
        if message["role"] == "tool" and turns:
            turns[-1].append(message)
        else:
            turns.append([message])
    last_user = max([i for i, turn in enumerate(turns) if turn[0]["role"] == "user"] or [-1])
    dropped = set()
    for index, turn in enumerate(turns[:-1]):
        if total <= limit:
            break
        if index != last_user:
            dropped.add(index)
            total -= sum(ctx.message_tokens(message) for message in turn)
    if not dropped:
        ctx.notes.append("summary failed; sent unsummarised")
        return messages
    ctx.notes.append("summary failed; dropped %d oldest turns" % len(dropped))
    return messages[:head] + [message for index, turn in enumerate(turns) if index not in dropped
                              for message in turn]

PIPELINE = [
    normalise_messages,
    restore_reasoning,
    dedup_boilerplate,
    dedup_tool_outputs,
    dedup_markdown_blocks,
    compress_system_prompt,
    summarise_over_budget,
]


def run_pipeline(messages, ctx):
    """Apply PIPELINE in order. A stage that raises is logged and skipped: its input goes on."""
    for stage in PIPELINE:
        try:
            messages = stage(messages, ctx)
        except Exception as error:  # a compression bug must never fail a request
            log.warning("[%s] stage %s failed, skipped: %r", ctx.request_id, stage.__name__, error,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            ctx.notes.append(stage.__name__ + " failed")
    return messages


# =====================================================================================================
# Upstream client: the forced request body, urllib calls with timeouts and bounded retries.
# =====================================================================================================

FORWARDED_FIELDS = ("tools", "tool_choice", "response_format", "stop")  # client fields DeepSeek gets
RETRYABLE_STATUSES = (429, 500, 502, 503, 504)


class UpstreamError(Exception):
    """DeepSeek could not be used: status and JSON body to answer the client with."""

    def __init__(self, status, body):
        super().__init__(status)
        self.status = status
        self.body = body  # dict in the error envelope


def build_upstream_body(body, messages, ctx):
    """The request DeepSeek receives: our model, max_tokens and thinking, the client's messages as
    the pipeline left them, and only the functional fields. Sampling knobs, n, logprobs, seed, store,
    metadata, user, parallel_tool_calls and the client's own model settings are dropped."""
    upstream = {"model": DEFAULT_MODEL, "messages": messages, "max_tokens": MAX_OUTPUT_TOKENS,
                "thinking": {"type": "enabled" if ctx.thinking else "disabled"}}
    if REASONING_EFFORT and ctx.thinking:
        upstream["reasoning_effort"] = REASONING_EFFORT
    for field in FORWARDED_FIELDS:
        if body.get(field) is not None:
            upstream[field] = body[field]
    if body.get("stream"):
        # Always ask for usage: the proxy measures every call. The client gets DeepSeek's chunks
        # unchanged either way ("usage": null on earlier chunks is valid OpenAI shape).
        upstream["stream"] = True
        upstream["stream_options"] = {"include_usage": True}
    return upstream


def _opener_for(url):
    """Environment proxies apply to DeepSeek, never to a loopback upstream (tests, local relays)."""
    host = urllib.request.urlparse(url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def open_upstream(payload, api_key, retries=None, base_sleep=None, timeout=None):
    """POST payload to DeepSeek's chat endpoint; returns the open response (status 200).

    429, 5xx, timeouts and connection failures are retried `retries` times, sleeping base_sleep
    doubled each time; other HTTP errors are raised at once as UpstreamError with DeepSeek's body."""
    retries = UPSTREAM_MAX_RETRIES if retries is None else retries
    base_sleep = UPSTREAM_RETRY_BASE_SLEEP if base_sleep is None else base_sleep
    url = DEEPSEEK_BASE.rstrip("/") + "/chat/completions"
    data = json.dumps(payload).encode("ascii")  # \u escapes: the C encoder's fast path
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + api_key,
               "Accept": "text/event-stream" if payload.get("stream") else "application/json",
               "User-Agent": "deepseek-proxy/" + __version__}
    opener = _opener_for(url)
    for attempt in range(retries + 1):
        retry_note = " after %d attempts" % (attempt + 1) if attempt else ""
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            return opener.open(request, timeout=timeout or UPSTREAM_TIMEOUT)
        except urllib.error.HTTPError as error:
            status, raw = error.code, _read_quietly(error)
            failure = UpstreamError(status, upstream_error_body(status, raw))
            if status not in RETRYABLE_STATUSES:
                raise failure
        except (TimeoutError, socket.timeout) as error:
            failure = UpstreamError(504, error_body("DeepSeek did not answer in time%s: %s" % (
                retry_note, error), "upstream_timeout"))
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            failure = UpstreamError(502, error_body("Cannot reach DeepSeek at %s%s: %s" % (
                DEEPSEEK_BASE, retry_note, reason), "upstream_unreachable"))
        if attempt < retries:
            delay = base_sleep * (2 ** attempt)
            log.info("upstream attempt %d failed (%s), retrying in %.1fs", attempt + 1, failure.status, delay)
            time.sleep(delay)
    raise failure


def _read_quietly(response):
    try:
        return response.read()
    except (OSError, ValueError):
        return b""


def upstream_error_body(status, raw):
    """DeepSeek's error JSON as it came, or an envelope around whatever else it sent."""
    try:
        parsed = json.loads(raw.decode("utf-8"))
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return parsed
    except (ValueError, UnicodeDecodeError):
        pass
    text = raw.decode("utf-8", "replace").strip()[:500] or http.HTTPStatus(status).phrase
    return error_body("DeepSeek answered %d: %s" % (status, text), "upstream_error")


def call_deepseek_json(payload, api_key, retries, base_sleep, timeout=None):
    """One non-streaming call for the proxy's own use (summaries): returns the parsed answer."""
    response = open_upstream(payload, api_key, retries=retries, base_sleep=base_sleep, timeout=timeout)
    with response:
        return json.loads(response.read().decode("utf-8"))


def request_summary(messages, max_tokens, tools=None, thinking=False):
    """The proxy's own summarisation call: SUMMARY_MODEL, not streamed, SUMMARISE_MAX_RETRIES
    attempts on 429/5xx/timeouts with SUMMARISE_RETRY_BASE_SLEEP doubling. With tools, they are
    sent as the conversation had them (the cached prefix includes them) and tool_choice is none.
    Returns the text; raises UpstreamError or ValueError. Its usage goes to /stats apart."""
    payload = {"model": SUMMARY_MODEL or DEFAULT_MODEL, "messages": messages, "max_tokens": max_tokens,
               "thinking": {"type": "enabled" if thinking else "disabled"}, "stream": False}
    if tools:
        payload["tools"], payload["tool_choice"] = tools, "none"
    return summary_text(call_deepseek_json(payload, deepseek_api_key, SUMMARISE_MAX_RETRIES - 1,
                                           SUMMARISE_RETRY_BASE_SLEEP))


def summary_text(answer):
    stats.record_summary(answer.get("usage"))
    choice = (answer.get("choices") or [{}])[0]
    text = ((choice.get("message") or {}).get("content") or "").strip()
    if not text or choice.get("finish_reason") not in (None, "stop"):
        raise ValueError("no usable summary (finish_reason %s)" % choice.get("finish_reason"))
    return text


# =====================================================================================================
# Response side: reading DeepSeek's answer (streamed or not), remembering reasoning, accounting.
# =====================================================================================================

class AnswerCollector:
    """Rebuilds the assistant message and the usage from streamed chunks or a whole response."""

    def __init__(self):
        self.reasoning, self.content, self.tool_calls = [], [], {}
        self.saw_reasoning = False
        self.finish_reason = None
        self.usage = None
        self.done = False

    def feed_event(self, block):
        for line in block.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                self.feed_chunk(json.loads(data))
            except (ValueError, TypeError, AttributeError, KeyError):
                continue  # an odd chunk is still relayed as it came; it just is not understood

    def feed_chunk(self, chunk):
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content") is not None:
                self.saw_reasoning = True
                self.reasoning.append(delta["reasoning_content"])
            if delta.get("content"):
                self.content.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = self.tool_calls.setdefault(call.get("index", 0), {
                    "id": None, "type": "function", "function": {"name": None, "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] = function.get("name") or slot["function"]["name"]
                slot["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def feed_response(self, response):
        self.usage = response.get("usage")
        choice = (response.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        self.finish_reason = choice.get("finish_reason")
        if message.get("reasoning_content") is not None:
            self.saw_reasoning = True
            self.reasoning.append(message["reasoning_content"])
        self.content.append(message.get("content") or "")
        for index, call in enumerate(message.get("tool_calls") or ()):
            self.tool_calls[index] = call

    def message(self):
        message = {"role": "assistant", "content": "".join(self.content) or None}
        if self.saw_reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[index] for index in sorted(self.tool_calls)]
        return message


def remember_answer(ctx, answer):
    """Store the answer's reasoning under the key the client's echo of this turn will have."""
    if answer.get("reasoning_content") is None or not ctx.normalised:
        return
    reasoning_cache.remember(reasoning_key(answer, ctx.normalised[-1]), answer["reasoning_content"])


class Stats:
    """Running totals from DeepSeek's own usage figures, per model, and a per-minute series.
    A call whose usage is missing counts in `unmeasured_calls`, never as zero tokens."""

    SERIES_MINUTES = 1440  # one day of per-minute points
    REQUIRED = ("requests", "upstream_requests", "summary_requests", "failed_requests",
                "client_prompt_tokens_estimate", "sent_prompt_tokens_estimate", "upstream_prompt_tokens",
                "cache_hit_tokens", "cache_miss_tokens", "completion_tokens", "reasoning_tokens", "cost_usd",
                "summary_cost_usd", "tokens_saved_estimate", "saved_usd_estimate", "reasoning_restored",
                "reasoning_filled_empty", "unmeasured_calls")

    def __init__(self):
        self.started = time.time()
        self.totals = collections.Counter()
        self.per_model = collections.defaultdict(collections.Counter)
        self.series = collections.OrderedDict()  # minute start (epoch seconds) -> Counter
        self._lock = threading.Lock()

    def _add(self, model, values):
        minute = int(time.time() // 60 * 60)
        with self._lock:
            self.totals.update(values)
            self.per_model[model].update(values)
            self.series.setdefault(minute, collections.Counter()).update(values)
            while len(self.series) > self.SERIES_MINUTES:
                self.series.popitem(last=False)

    @staticmethod
    def usage_values(usage, prefix=""):
        if not usage:
            return {prefix + "unmeasured_calls": 1}
        hit = usage.get("prompt_cache_hit_tokens") or 0
        prompt = usage.get("prompt_tokens") or 0
        miss = usage.get("prompt_cache_miss_tokens")
        return {prefix + "upstream_prompt_tokens": prompt, prefix + "cache_hit_tokens": hit,
                prefix + "cache_miss_tokens": max(0, prompt - hit) if miss is None else miss,
                prefix + "completion_tokens": usage.get("completion_tokens") or 0,
                prefix + "reasoning_tokens": (usage.get("completion_tokens_details") or {}).get(
                    "reasoning_tokens") or 0,
                prefix + "cost_usd": usage_cost(usage)}

    def record_request(self, ctx, usage, failed, upstream_called):
        saved = sum(ctx.saved.values())
        values = collections.Counter({"requests": 1, "failed_requests": int(failed),
                                      "upstream_requests": int(upstream_called),
                                      "client_prompt_tokens_estimate": ctx.tokens_in,
                                      "sent_prompt_tokens_estimate": ctx.tokens_out,
                                      "tokens_saved_estimate": saved,
                                      # a lower bound: removed tokens priced as if all were cache hits
                                      "saved_usd_estimate": saved * PRICE_INPUT_CACHE_HIT / 1e6,
                                      "reasoning_restored": ctx.reasoning_restored,
                                      "reasoning_filled_empty": ctx.reasoning_filled})
        for stage, tokens in ctx.saved.items():
            values["saved_by_" + stage] += tokens
        if upstream_called and not failed:
            values.update(self.usage_values(usage))
        self._add(DEFAULT_MODEL, values)

    def record_summary(self, usage):
        values = collections.Counter({"summary_requests": 1})
        values.update(self.usage_values(usage, prefix="summary_"))
        self._add(SUMMARY_MODEL or DEFAULT_MODEL, values)

    def snapshot(self):
        with self._lock:
            totals = dict(self.totals)
            per_model = {model: dict(values) for model, values in self.per_model.items()}
            series = [dict(values, minute=minute) for minute, values in self.series.items()]
        for name in self.REQUIRED:
            totals.setdefault(name, 0)
        totals["cache_hit_ratio"] = round(totals["cache_hit_tokens"] / totals["upstream_prompt_tokens"], 4) \
            if totals["upstream_prompt_tokens"] else None
        return {"uptime_s": round(time.time() - self.started, 1), **totals, "totals": totals,
                "per_model": per_model, "per_minute": series,
                "prices_usd_per_million": {"input_cache_hit": PRICE_INPUT_CACHE_HIT,
                                           "input_cache_miss": PRICE_INPUT_CACHE_MISS, "output": PRICE_OUTPUT},
                "reasoning_cache_entries": len(reasoning_cache.entries),
                "summary_cache_entries": len(summary_cache.entries)}

    def save(self, path):
        with self._lock:
            state = {"totals": dict(self.totals), "per_model": {m: dict(v) for m, v in self.per_model.items()},
                     "series": [[minute, dict(values)] for minute, values in self.series.items()]}
        try:
            atomic_write(path, json.dumps(state))
        except OSError as error:
            warn_once("writing " + path, error)

    def load(self, path):
        text = read_text(path)
        if text is None:
            return
        try:
            state = json.loads(text)
            with self._lock:
                self.totals.update(state["totals"])
                for model, values in state["per_model"].items():
                    self.per_model[model].update(values)
                for minute, values in state["series"]:
                    self.series[int(minute)] = collections.Counter(values)
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable %s: %s", path, error)


stats = Stats()


DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deepseek-proxy</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px}small{color:#667}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border-radius:8px;padding:12px 16px;min-width:150px;box-shadow:0 1px 2px #0002}
.card b{display:block;font-size:22px}.card span{color:#667;font-size:12px}
.chart{background:#fff;border-radius:8px;padding:12px;margin:12px 0;box-shadow:0 1px 2px #0002}
.chart h2{font-size:14px;margin:0 0 6px}svg{width:100%;height:180px}
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;border-radius:2px}
td{padding:2px 12px 2px 0}
</style></head><body>
<h1>deepseek-proxy</h1><small id="meta">loading...</small>
<div class="cards" id="cards"></div>
<div class="chart"><h2>Cost per minute (USD, from DeepSeek's usage)</h2><svg id="cost"></svg>
<div class="legend"><i style="background:#3b6fd8"></i>chat<i style="background:#e08a1e"></i>proxy's own summaries</div></div>
<div class="chart"><h2>Prompt tokens per minute</h2><svg id="tokens"></svg>
<div class="legend"><i style="background:#2a9d6f"></i>cache hit<i style="background:#d84b3b"></i>cache miss
<i style="background:#8a8fa3"></i>removed by the pipeline (estimate)</div></div>
<div class="chart"><h2>Tokens removed, by stage (estimate)</h2><table id="stages"></table></div>
<script>
function fmt(n,d){return n==null?"-":Number(n).toLocaleString(undefined,{maximumFractionDigits:d||0})}
function usd(n){return "$"+Number(n||0).toFixed(4)}
function bars(svg,points,series){
  var w=svg.clientWidth||800,h=180,max=1e-12,out="",slot=w/Math.max(points.length,30);
  points.forEach(function(p){var t=0;series.forEach(function(s){t+=p[s.key]||0});max=Math.max(max,t)});
  points.forEach(function(p,i){var y=h-4;series.forEach(function(s){var v=(p[s.key]||0)/max*(h-20);y-=v;
    out+='<rect x="'+(i*slot+1).toFixed(1)+'" y="'+y.toFixed(1)+'" width="'+Math.max(slot-2,1).toFixed(1)+'" height="'+v.toFixed(1)+'" fill="'+s.color+'"><title>'+new Date(p.minute*1000).toLocaleTimeString()+" "+s.key+": "+fmt(p[s.key],6)+'</title></rect>'})});
  out+='<text x="4" y="12" font-size="11" fill="#667">max '+fmt(max,4)+' per minute; last '+points.length+' min</text>';
  svg.innerHTML=points.length?out:'<text x="10" y="90" fill="#667">no requests yet</text>'}
function refresh(){fetch("stats").then(function(r){return r.json()}).then(function(s){
  document.getElementById("meta").textContent="up "+fmt(s.uptime_s/60,1)+" min, refreshed "+new Date().toLocaleTimeString();
  var cards=[["Spent",usd(s.cost_usd+s.summary_cost_usd),"chat "+usd(s.cost_usd)+" + summaries "+usd(s.summary_cost_usd)],
    ["Saved (estimate)",usd(s.saved_usd_estimate),fmt(s.tokens_saved_estimate)+" tokens removed, priced as cache hits"],
    ["Cache hit",s.cache_hit_ratio==null?"-":(100*s.cache_hit_ratio).toFixed(1)+"%",fmt(s.cache_hit_tokens)+" of "+fmt(s.upstream_prompt_tokens)+" prompt tokens"],
    ["Requests",fmt(s.requests),fmt(s.failed_requests)+" failed, "+fmt(s.summary_requests)+" summary calls"],
    ["Reasoning restored",fmt(s.reasoning_restored),fmt(s.reasoning_filled_empty)+" filled with empty"]];
  document.getElementById("cards").innerHTML=cards.map(function(c){return '<div class="card"><span>'+c[0]+'</span><b>'+c[1]+'</b><span>'+c[2]+'</span></div>'}).join("");
  var pts=s.per_minute.slice(-120);
  bars(document.getElementById("cost"),pts,[{key:"cost_usd",color:"#3b6fd8"},{key:"summary_cost_usd",color:"#e08a1e"}]);
  bars(document.getElementById("tokens"),pts,[{key:"cache_hit_tokens",color:"#2a9d6f"},{key:"cache_miss_tokens",color:"#d84b3b"},{key:"tokens_saved_estimate",color:"#8a8fa3"}]);
  document.getElementById("stages").innerHTML=Object.keys(s).filter(function(k){return k.indexOf("saved_by_")==0}).map(function(k){return "<tr><td>"+k.slice(9)+"</td><td>"+fmt(s[k])+"</td></tr>"}).join("")||"<tr><td>nothing removed yet</td></tr>";
}).catch(function(e){document.getElementById("meta").textContent="cannot read /stats: "+e})}
refresh();setInterval(refresh,5000);
</script></body></html>
"""


_dump_sequence = itertools.count()  # orders dumps made within the same second


def dump_messages(ctx, client_body, upstream_body):
    """SAVE_PREPOST_MSGS: what the client sent -> pre_msg/, what went upstream -> post_msg/.
    Only bodies are written, never headers, so no key reaches the disk."""
    if not SAVE_PREPOST_MSGS:
        return
    name = "%s-%06d-%s.json" % (time.strftime("%Y%m%d-%H%M%S"), next(_dump_sequence), ctx.request_id)
    for folder, body in (("pre_msg", client_body), ("post_msg", upstream_body)):
        try:
            atomic_write(data_path(folder, name), json.dumps(body, ensure_ascii=False, indent=1))
            files = sorted(entry for entry in os.listdir(data_path(folder)) if entry.endswith(".json"))
            for old in files[:max(0, len(files) - MAX_DUMP_FILES)]:
                os.unlink(data_path(folder, old))
        except OSError as error:
            warn_once("writing message dumps to " + data_path(folder), error)


# =====================================================================================================
# HTTP handler: routes, request validation, and relaying answers to the client.
# =====================================================================================================

class ClientError(Exception):
    """A request the proxy refuses: answered with status and an OpenAI-style error body."""

    def __init__(self, status, message, code="invalid_request_error", close=False):
        super().__init__(message)
        self.status, self.message, self.code, self.close = status, message, code, close


def validate_chat_request(body):
    """Reject what DeepSeek would reject or the pipeline cannot read, with a message saying what."""
    if not isinstance(body, dict):
        raise ClientError(400, "The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError(400, "'messages' must be a non-empty array.", "missing_messages")
    for index, message in enumerate(messages):
        where = "messages[%d]" % index
        if not isinstance(message, dict):
            raise ClientError(400, where + " must be an object.")
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
        if role not in MESSAGE_KEYS:
            raise ClientError(400, "%s.role must be one of system, developer, user, assistant, tool; got %r."
                              % (where, message.get("role")))
        content = message.get("content")
        if content is None:
            if not (role == "assistant"):
                raise ClientError(400, where + ".content is required for role " + role + ".")
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ClientError(400, "%s.content[%d] must be an object with a 'type'." % (where, part_index))
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise ClientError(400, "%s.content[%d].text must be a string." % (where, part_index))
        elif not isinstance(content, str):
            raise ClientError(400, where + ".content must be a string, an array of parts or null.")
        if role == "assistant" and message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if not isinstance(calls, list) or not all(
                    isinstance(call, dict) and isinstance(call.get("function"), dict)
                    and isinstance(call["function"].get("name"), str) for call in calls):
                raise ClientError(400, where + ".tool_calls must be an array of {id, type, function: {name, arguments}}.")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ClientError(400, where + ".tool_call_id must be a string.")
        if not isinstance(message.get("reasoning_content", ""), (str, type(None))):
            raise ClientError(400, where + ".reasoning_content must be a string.")
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise ClientError(400, "'tools' must be an array.")
    if not isinstance(body.get("stream", False), (bool, type(None))):
        raise ClientError(400, "'stream' must be a boolean.")


# A \uD800-\uDFFF escape that is not half of a pair: valid JSON, but not text DeepSeek can take
# (a truncated emoji). Escaped pairs, as ASCII-only JSON encoders write every emoji, are fine.
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                             rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def replace_lone_surrogates(body):
    """The body with each unpaired surrogate replaced by U+FFFD."""
    text = json.dumps(body, ensure_ascii=False).encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return json.loads(text)


def bearer_token(header):
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return ""


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Routes only; each route is a short method over the layers above."""

    protocol_version = "HTTP/1.1"
    server_version = "deepseek-proxy/" + __version__

    def setup(self):
        super().setup()
        self.connection.settimeout(CLIENT_TIMEOUT)
        # Small writes (headers, then body; each SSE event) must leave at once, not wait for the
        # client's delayed ACK (Nagle): that alone costs ~40 ms per response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # the request log line is written by handle_chat
        log.debug("%s %s", self.address_string(), format % args)

    # -- routes

    def do_GET(self):
        path = self.route()
        if path in MODEL_PATHS:
            self.send_json(200, {"object": "list", "data": [
                {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "deepseek"}]})
        elif path == "/health":
            self.send_json(200, {"status": "ok", "version": __version__, "upstream": DEEPSEEK_BASE,
                                 "model": DEFAULT_MODEL, "api_key_configured": bool(deepseek_api_key)})
        elif path in ("/stats", "/v1/stats"):
            self.send_json(200, stats.snapshot())
        elif path in ("/", "/dashboard"):
            self.send_body(200, DASHBOARD_HTML.encode("utf-8"), "text/html; charset=utf-8",
                           {"Cache-Control": "no-store"})
        elif path in CHAT_PATHS:
            self.send_error_json(405, "Use POST for chat completions.", "method_not_allowed")
        else:
            self.send_error_json(404, "No route for GET %s." % path, "not_found")

    def do_POST(self):
        path = self.route()
        if path in CHAT_PATHS:
            self.with_client_errors(self.handle_chat)
        elif path in MODEL_PATHS or path in ("/health", "/stats"):
            self.discard_body()
            self.send_error_json(405, "Use GET for %s." % path, "method_not_allowed")
        else:
            self.discard_body()
            self.send_error_json(404, "No route for POST %s." % path, "not_found")

    def do_other(self):
        self.discard_body()
        self.send_error_json(405, "Method %s is not supported." % self.command, "method_not_allowed")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_other

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, headers too long, an unknown
        method) in the same JSON shape as every other error, never its HTML page."""
        self.close_connection = True
        try:
            self.send_error_json(code, message or http.HTTPStatus(code).phrase, "http_error")
        except OSError:
            pass

    def route(self):
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    # -- chat completions

    def handle_chat(self):
        started = time.monotonic()
        self.check_proxy_key()
        body = self.read_json_body()
        validate_chat_request(body)
        if not deepseek_api_key:
            raise ClientError(401, "The proxy has no DeepSeek API key: set DEEPSEEK_API_KEY or write the key "
                              "into K.dat (see K.dat.example), then restart the proxy.", "missing_api_key")
        ctx = RequestContext(body)
        ctx.tokens_in = ctx.prompt_tokens(body["messages"])
        messages = run_pipeline(body["messages"], ctx)
        ctx.tokens_out = ctx.prompt_tokens(messages)
        upstream_body = build_upstream_body(body, messages, ctx)
        dump_messages(ctx, body, upstream_body)
        outcome = {"status": None, "usage": None, "called": False}
        try:
            response = open_upstream(upstream_body, deepseek_api_key)
            outcome["called"] = True
            if upstream_body.get("stream"):
                self.relay_stream(response, ctx, outcome)
            else:
                self.relay_json(response, ctx, outcome)
        except UpstreamError as error:
            outcome["status"] = error.status
            outcome["called"] = outcome["called"] or error.status not in (502, 504)
            self.send_json(error.status, error.body, self.proxy_headers(ctx))
        finally:
            failed = outcome["status"] != 200
            stats.record_request(ctx, outcome["usage"], failed, outcome["called"])
            self.log_chat(ctx, body, outcome, time.monotonic() - started)

    def relay_json(self, response, ctx, outcome):
        try:
            with response:
                raw = response.read()
            answer = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError) as error:
            raise UpstreamError(502, error_body("DeepSeek's answer could not be read: %s" % error,
                                                "upstream_error"))
        collector = AnswerCollector()
        try:
            collector.feed_response(answer)
        except (TypeError, AttributeError, KeyError):
            pass  # an odd answer is still relayed as it came; it just is not understood
        self.finish_answer(ctx, collector, outcome)
        headers = self.proxy_headers(ctx, collector.usage)
        self.send_body(200, raw.strip(), "application/json", headers)

    def relay_stream(self, response, ctx, outcome):
        """Relay each SSE event the moment its blank line arrives; parse it on the way."""
        collector = AnswerCollector()
        self.send_response(200)
        for name, value in self.proxy_headers(ctx).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        outcome["status"] = 200
        block = []
        try:
            with response:
                while True:
                    try:
                        line = response.readline()
                    except (OSError, ValueError) as error:
                        self.end_stream_with_error(collector, "DeepSeek's stream broke off: %s" % error)
                        break
                    if not line:
                        if block:  # the last event lacked its blank line
                            event = b"".join(block) + b"\n"
                            self.write_chunk(event)
                            collector.feed_event(event)
                        if not collector.done:
                            self.end_stream_with_error(collector, "DeepSeek closed the stream before its end.")
                        break
                    if line.strip():
                        block.append(line)
                        continue
                    if block:
                        event = b"".join(block) + line
                        block = []
                        self.write_chunk(event)
                        collector.feed_event(event)
            self.write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout) as error:
            log.info("[%s] client went away mid-stream (%s); upstream closed", ctx.request_id,
                     type(error).__name__)
            outcome["status"] = 499
            self.close_connection = True
        self.finish_answer(ctx, collector, outcome)

    def end_stream_with_error(self, collector, message):
        """After a 200 has gone out the only way to report a failure is an SSE error event, which
        the OpenAI SDKs raise as APIError. A stream that had already finished just gets its [DONE]."""
        if collector.finish_reason:
            self.write_chunk(b"data: [DONE]\n\n")
            return
        log.warning("%s", message)
        event = json.dumps(error_body(message, "upstream_error", "upstream_stream_error"))
        self.write_chunk(b"data: " + event.encode("utf-8") + b"\n\n")
        self.close_connection = True

    def finish_answer(self, ctx, collector, outcome):
        """After the answer went out: usage, calibration, and the reasoning to restore later."""
        outcome["usage"] = collector.usage
        prompt_tokens = (collector.usage or {}).get("prompt_tokens")
        if prompt_tokens and ctx.tokens_out:
            ctx.estimate_error = (ctx.tokens_out - prompt_tokens) / prompt_tokens
            token_calibration.observe(ctx.tokens_out, prompt_tokens)
        if outcome["status"] in (None, 200):
            outcome["status"] = 200
        remember_answer(ctx, collector.message())

    # -- plumbing

    def check_proxy_key(self):
        if PROXY_KEY and not hmac_equal(bearer_token(self.headers.get("Authorization")), PROXY_KEY):
            self.discard_body()
            raise ClientError(401, "Invalid proxy key: send the key set with --proxy-key as the bearer token.",
                              "invalid_api_key")

    def read_json_body(self):
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ClientError(411, "Chunked request bodies are not supported: send Content-Length.",
                              "length_required", close=True)
        if length_header is None:
            raise ClientError(411, "Content-Length is required.", "length_required", close=True)
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            raise ClientError(400, "Content-Length is not a number.", close=True)
        if length > MAX_REQUEST_BYTES:
            raise ClientError(413, "Request body of %d bytes exceeds the limit of %d bytes." % (
                length, MAX_REQUEST_BYTES), "request_too_large", close=True)
        try:
            raw = self.rfile.read(length)
        except (socket.timeout, TimeoutError):
            raise ClientError(408, "Timed out reading the request body.", "request_timeout", close=True)
        if len(raw) < length:
            raise ClientError(400, "The request body is shorter than its Content-Length.", close=True)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ClientError(400, "The request body is not valid UTF-8.")
        except (ValueError, RecursionError) as error:
            raise ClientError(400, "The request body is not valid JSON: %s." % error, "invalid_json")
        if _LONE_SURROGATE.search(raw):
            body = replace_lone_surrogates(body)
        return body

    def discard_body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 <= length <= MAX_REQUEST_BYTES:
            try:
                self.rfile.read(length)
                return
            except OSError:
                pass
        self.close_connection = True

    def with_client_errors(self, handler):
        self.server.track(+1)
        try:
            handler()
        except ClientError as error:
            if error.close:
                self.close_connection = True
            self.send_error_json(error.status, error.message, error.code)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        except Exception as error:  # the proxy's own bug: a JSON 500, never a traceback to the client
            log.exception("internal error")
            self.close_connection = True
            try:
                self.send_error_json(500, "Internal proxy error: %s" % type(error).__name__, "proxy_error")
            except OSError:
                pass
        finally:
            self.server.track(-1)

    def proxy_headers(self, ctx, usage=None):
        headers = {"X-Proxy-Request-Id": ctx.request_id,
                   "X-Proxy-Tokens-In": str(ctx.tokens_in), "X-Proxy-Tokens-Out": str(ctx.tokens_out),
                   "X-Proxy-Reasoning-Restored": "%d/%d" % (ctx.reasoning_restored, ctx.reasoning_filled)}
        if usage:
            headers["X-Proxy-Cache-Hit-Tokens"] = str(usage.get("prompt_cache_hit_tokens", 0))
            headers["X-Proxy-Cost-USD"] = "%.6f" % usage_cost(usage)
        if ctx.notes:
            headers["X-Proxy-Notes"] = "; ".join(ctx.notes)[:500]
        return headers

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_body(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def send_json(self, status, payload, headers=None):
        self.send_body(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                       "application/json", headers)

    def send_error_json(self, status, message, code):
        error_type = {401: "authentication_error", 404: "not_found_error", 500: "server_error"}.get(
            status, "invalid_request_error")
        self.send_json(status, error_body(message, error_type, code))

    def log_chat(self, ctx, body, outcome, seconds):
        usage = outcome["usage"] or {}
        saved = ",".join("%s=%d" % (stage, tokens) for stage, tokens in ctx.saved.items() if tokens)
        log.info("[%s] POST %s stream=%s msgs=%d est_in=%d est_out=%d status=%s prompt=%s hit=%s "
                 "completion=%s cost=$%.6f est_err=%s reasoning restored=%d filled=%d saved=[%s]%s %.0fms",
                 ctx.request_id, self.route(), bool(body.get("stream")), len(body.get("messages") or ()),
                 ctx.tokens_in, ctx.tokens_out, outcome["status"], usage.get("prompt_tokens", "-"),
                 usage.get("prompt_cache_hit_tokens", "-"), usage.get("completion_tokens", "-"),
                 usage_cost(usage), "-" if ctx.estimate_error is None else "%+.1f%%" % (100 * ctx.estimate_error),
                 ctx.reasoning_restored, ctx.reasoning_filled, saved,
                 (" notes=" + "; ".join(ctx.notes)) if ctx.notes else "", seconds * 1000)


def hmac_equal(given, expected):
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# =====================================================================================================
# main(): configuration, key, data folders, server, signals.
# =====================================================================================================

class ProxyServer(http.server.ThreadingHTTPServer):
    """One daemon thread per connection; counts requests being answered (not idle keep-alives)
    so that shutdown can wait for them."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # agents open many connections at once; the default 5 resets them

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.in_flight = 0
        self._count_lock = threading.Lock()

    def track(self, delta):
        with self._count_lock:
            self.in_flight += delta


def prepare_data_dir():
    for sub in DATA_SUBDIRS:
        try:
            os.makedirs(data_path(sub), exist_ok=True)
        except OSError as error:
            warn_once("creating " + data_path(sub), error)


def save_stats_every_minute():
    while True:
        time.sleep(60)
        stats.save(data_path("stats.json"))


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


def main(argv=None):
    global reasoning_cache, summary_cache, deepseek_api_key
    parse_args(argv)
    logging.basicConfig(level=LOG_LEVEL, format="%(asctime)s %(levelname)s %(message)s")
    if not is_loopback(HOST) and not PROXY_KEY and not ALLOW_OPEN:
        log.error("Refusing to listen on %s without --proxy-key: anyone who reaches it could spend your "
                  "DeepSeek key. Set --proxy-key (or PROXY_API_KEY), or pass --allow-open.", HOST)
        return 2
    if not is_loopback(HOST):
        log.warning("Listening on %s: reachable from other machines%s.", HOST,
                    "" if PROXY_KEY else " WITHOUT a proxy key")
    prepare_data_dir()
    reasoning_cache = PersistentLRU(
        MAX_CACHE_SIZE, data_path("reasoning_cache.jsonl") if PERSIST_REASONING else None)
    reasoning_cache.load()
    summary_cache = PersistentLRU(MAX_CACHE_SIZE, data_path("summary_cache.jsonl") if PERSIST_SUMMARIES else None)
    summary_cache.load()
    if PERSIST_STATS:
        stats.load(data_path("stats.json"))
        saver = threading.Thread(target=save_stats_every_minute, daemon=True, name="stats-saver")
        saver.start()
    deepseek_api_key = load_api_key()
    if not deepseek_api_key:
        log.warning("No DeepSeek API key: set DEEPSEEK_API_KEY or create K.dat. Chat requests get 401 until then.")
    if ":" in HOST:
        ProxyServer.address_family = socket.AF_INET6
    try:
        server = ProxyServer((HOST, PORT), ProxyHandler)
    except OSError as error:
        log.error("Cannot listen on %s:%d: %s", HOST, PORT, error)
        return 1
    stopping = threading.Event()

    def stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: finishing in-flight requests (up to %.0fs)", signum, SHUTDOWN_GRACE)
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    log.info("deepseek-proxy %s listening on http://%s:%d/v1 -> %s (model %s, thinking %s)",
             __version__, host, port, DEEPSEEK_BASE, DEFAULT_MODEL, THINKING_MODE)
    print("LISTENING %s:%d" % (host, port), flush=True)
    server.serve_forever(poll_interval=0.2)
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while server.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.in_flight:
        log.warning("%d requests still open at shutdown; closing them", server.in_flight)
    server.server_close()
    if PERSIST_STATS:
        stats.save(data_path("stats.json"))
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
