"""Record real coding agents, run headless through the proxy, as the benchmark's traffic.

    python bench/record.py --install           # npm and pip install the clients into bench/.clients/
    python bench/record.py [--clients claude,codex,...] [--write-docs]

Each client gets a copy of a small real project (bench/fixture_project: a package whose tests fail
on a bulk-discount bug and a reservations bug) and one task, and runs headless against the proxy (its default pipeline),
which forwards to the fake DeepSeek playing a scripted model (bench/scripted_agent.py: the same plan
for every client, expressed with each client's own tools: list, read whole and in ranges, grep, run
the tests, edit with the client's own edit tool, re-read, re-run). Between the client and the proxy
sits a recorder: every request the client sent, byte for byte (with its method, path and headers,
the key headers removed) and its HTTP status, goes into bench/traffic/CLIENT.jsonl.gz (a line of the
client's name, version and front; a line per request; then the model's answers in order, which the
replay needs to bill output and to key the reasoning cache). The table says per client: its
version, the front it spoke, exit code, requests, whether its tool loop worked (tool results came back
and the edit landed: the project's tests pass afterwards), streaming, and thinking (reasoning
restored or sent back). bench/replay_traffic.py then bills the recordings.

Clients are found in bench/.clients (or on PATH); only 127.0.0.1 is contacted.
"""

import argparse
import gzip
import http.client
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

from fake_deepseek import FakeDeepSeek, is_summary_request  # noqa: E402
from helpers import API_KEY, ProxyProcess  # noqa: E402
from report import Report  # noqa: E402
import scripted_agent  # noqa: E402

CLIENTS = os.path.join(HERE, ".clients")
FIXTURE = os.path.join(HERE, "fixture_project")
TRAFFIC = os.path.join(HERE, "traffic")
NPM = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex", "opencode": "opencode-ai", "cline": "cline",
       "kilo": "@kilocode/cli@7.7", "qwen": "@qwen-code/qwen-code", "continue": "@continuedev/cli"}
PYPI = {"aider": "aider-chat", "llm": "llm"}
TASK = ("The tests of this project fail. Find the cause with your tools, fix it, and run the tests again "
        "(python3 -m unittest discover -s tests -q).")
SECRET_HEADERS = ("authorization", "x-api-key", "api-key")
MODEL = "deepseek-v4-flash"
PROJECT = "/work/project"  # where the recordings say the project was (the real scratch path is replaced)
YES_NO = {True: "yes", False: "no", None: "n/a"}


# -- the recorder between a client and the proxy

class Recorder(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, target_port):
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.target_port = target_port
        self.records = []
        self.lock = threading.Lock()
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(length) if length else b""
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
        with self.server.lock:
            index = len(self.server.records)
            self.server.records.append({"method": self.command, "path": self.path,
                                        "headers": {k: v for k, v in headers.items() if k.lower() not in SECRET_HEADERS},
                                        "body": body.decode("utf-8", "surrogateescape")})
        connection = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=300)
        headers["Content-Length"] = str(len(body))
        connection.request(self.command, self.path, body=body if body or self.command != "GET" else None,
                           headers=headers)
        response = connection.getresponse()
        with self.server.lock:
            self.server.records[index]["status"] = response.status
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            piece = response.read1(65536)
            if not piece:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = relay

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


# -- each client: how to install, configure and run it headless

def find(name):
    for path in (os.path.join(CLIENTS, "node_modules", ".bin", name), os.path.join(CLIENTS, "py", "bin", name)):
        if os.path.exists(path):
            return path
    return shutil.which(name)


def version(command, env):
    try:
        out = subprocess.run(command + ["--version"], capture_output=True, text=True, env=env, timeout=60)
        return (out.stdout.strip() or out.stderr.strip()).splitlines()[-1][:60]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def claude(base, env, work, home):
    env.update(ANTHROPIC_BASE_URL=base, ANTHROPIC_API_KEY=API_KEY, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               DISABLE_AUTOUPDATER="1", DISABLE_TELEMETRY="1", ANTHROPIC_MODEL="claude-sonnet-4-5")
    # as root, --dangerously-skip-permissions is refused: allow the tools the plan uses by name instead
    return [[find("claude"), "-p", TASK, "--output-format", "json", "--permission-mode", "acceptEdits",
             "--allowedTools", "Read,Edit,Write,Bash,Grep,Glob,LS", "--max-turns", "40"]], "anthropic"


def codex(base, env, work, home):
    write(os.path.join(home, ".codex", "config.toml"),
          'model = "gpt-5.5"\nmodel_provider = "proxy"\n\n[model_providers.proxy]\nname = "deepseek-proxy"\n'
          'base_url = "%s/v1"\nenv_key = "DSPROXY_KEY"\nwire_api = "responses"\n' % base)
    env.update(CODEX_HOME=os.path.join(home, ".codex"), DSPROXY_KEY=API_KEY)
    return [[find("codex"), "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", TASK]], \
        "responses"


def opencode(base, env, work, home, package="@ai-sdk/openai-compatible", front="chat"):
    write(os.path.join(work, "opencode.json"), json.dumps({
        "$schema": "https://opencode.ai/config.json", "autoupdate": False, "share": "disabled",
        "provider": {"dsproxy": {"npm": package, "name": "deepseek-proxy",
                                 "options": {"baseURL": base + "/v1", "apiKey": API_KEY},
                                 "models": {MODEL: {"name": "DeepSeek via proxy", "tool_call": True}}}},
        "model": "dsproxy/" + MODEL, "small_model": "dsproxy/" + MODEL,
        "permission": {"edit": "allow", "bash": "allow", "webfetch": "deny"}}, indent=1))
    env.update(OPENCODE_DISABLE_AUTOUPDATE="1", OPENCODE_DISABLE_LSP_DOWNLOAD="true")
    return [[find("opencode"), "run", "--model", "dsproxy/" + MODEL, TASK]], front


def opencode_anthropic(base, env, work, home):
    return opencode(base, env, work, home, "@ai-sdk/anthropic", "anthropic")


def opencode_responses(base, env, work, home):
    return opencode(base, env, work, home, "@ai-sdk/openai", "responses")


def qwen(base, env, work, home, auth="openai"):
    env.update(OPENAI_BASE_URL=base + "/v1", OPENAI_API_KEY=API_KEY, OPENAI_MODEL=MODEL,
               ANTHROPIC_BASE_URL=base, ANTHROPIC_API_KEY=API_KEY, ANTHROPIC_MODEL=MODEL)
    write(os.path.join(home, ".qwen", "settings.json"), json.dumps({
        "security": {"auth": {"selectedType": auth}}, "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False}}))
    return [[find("qwen"), "-p", TASK, "--yolo", "--auth-type", auth]], "chat" if auth == "openai" else auth


def qwen_anthropic(base, env, work, home):
    return qwen(base, env, work, home, "anthropic")


def continue_cli(base, env, work, home):
    config = os.path.join(home, "continue.yaml")
    write(config, "name: proxy\nversion: 1.0.0\nschema: v1\nmodels:\n  - name: deepseek\n    provider: openai\n"
                  "    model: %s\n    apiBase: %s/v1\n    apiKey: %s\n    roles: [chat, edit, apply]\n"
                  "    capabilities: [tool_use]\n" % (MODEL, base, API_KEY))
    env.update(CONTINUE_GLOBAL_DIR=os.path.join(home, ".continue"))
    return [[find("cn"), "-p", TASK, "--config", config, "--auto"]], "chat"


def cline(base, env, work, home):
    env.update(CLINE_DIR=os.path.join(home, ".cline"))
    setup = [find("cline"), "auth", "--provider", "openai", "--apikey", API_KEY, "--modelid", MODEL,
             "--baseurl", base + "/v1"]
    return [setup, [find("cline"), "--json", "--auto-approve", "true", "--compaction", "off", TASK]], "chat"


def kilo(base, env, work, home):
    write(os.path.join(work, "kilo.json"), json.dumps({
        "$schema": "https://app.kilo.ai/config.json", "autoupdate": False,
        "provider": {"dsproxy": {"npm": "@ai-sdk/openai-compatible", "name": "deepseek-proxy",
                                 "options": {"baseURL": base + "/v1", "apiKey": API_KEY},
                                 "models": {MODEL: {"name": "DeepSeek via proxy", "tool_call": True}}}},
        "model": "dsproxy/" + MODEL, "small_model": "dsproxy/" + MODEL,
        "permission": {"edit": "allow", "bash": "allow", "webfetch": "deny"}}, indent=1))
    return [[find("kilo"), "run", "--auto", "--model", "dsproxy/" + MODEL, TASK]], "chat"


def aider(base, env, work, home):
    env.update(OPENAI_API_BASE=base + "/v1", OPENAI_API_KEY=API_KEY, AIDER_ANALYTICS="false",
               AIDER_CHECK_UPDATE="false")
    common = [find("aider"), "--model", "openai/" + MODEL, "--yes-always", "--no-git", "--no-show-model-warnings",
              "--no-pretty", "--stream", "--edit-format", "diff", "--restore-chat-history", "--test-cmd", scripted_agent.TESTS, "--auto-test",
              "--map-tokens", "1024", "--no-check-update", "--analytics-disable"]
    files = ["inventory/pricing.py", "tests/test_pricing.py"]
    questions = [("Explain in two sentences what bulk_discount does now.", []),
                 ("Does report.py use the discount anywhere?", ["inventory/report.py"]),
                 ("The reservation test still fails: fix Store.available.", ["inventory/store.py", "tests/test_store.py"]),
                 ("Is the store thread-safe when two orders take the same SKU?", ["inventory/store.py"]),
                 ("What happens to an unknown category?", []),
                 ("Does the CSV loader keep tags in order?", ["inventory/io.py"]),
                 ("Which of these files has no tests?", ["inventory/cli.py"]),
                 ("Summarise what changed in this session in one line.", [])]
    runs, added = [common + ["--message", TASK] + files], list(files)
    for question, more in questions:
        added += more
        runs.append(common + ["--message", question] + added)
    return runs, "chat"


def llm(base, env, work, home):
    write(os.path.join(home, "llm", "extra-openai-models.yaml"),
          "- model_id: dsproxy\n  model_name: %s\n  api_base: %s/v1\n  api_key_name: dsproxy\n" % (MODEL, base))
    write(os.path.join(home, "llm", "keys.json"), json.dumps({"dsproxy": API_KEY}))
    env.update(LLM_USER_PATH=os.path.join(home, "llm"))
    with open(os.path.join(FIXTURE, "inventory", "pricing.py"), encoding="utf-8") as handle:
        source = handle.read()
    first = [find("llm"), "-m", "dsproxy", "Why might this function fail its tests?\n\n" + source]
    return [first] + [[find("llm"), "-c", question] for question in (
        "Show the corrected line.", "What does the docstring promise?", "Write one test for the threshold.",
        "And one for a negative quantity.", "Would Decimal be better than float here?",
        "Rewrite the function with the fix and a type hint.", "Now the docstring in one sentence.")], "chat"


RUNNERS = {"claude": (claude, "Claude Code"), "codex": (codex, "Codex CLI"), "opencode": (opencode, "OpenCode"),
           "opencode-anthropic": (opencode_anthropic, "OpenCode (Anthropic provider)"),
           "opencode-responses": (opencode_responses, "OpenCode (OpenAI provider)"),
           "cline": (cline, "Cline CLI"),
           "kilo": (kilo, "Kilo Code CLI"), "qwen": (qwen, "Qwen Code"),
           "qwen-anthropic": (qwen_anthropic, "Qwen Code (Anthropic auth)"),
           "continue": (continue_cli, "Continue CLI"), "aider": (aider, "Aider"), "llm": (llm, "llm")}
BINARIES = {"claude": "claude", "codex": "codex", "opencode": "opencode", "opencode-anthropic": "opencode",
            "opencode-responses": "opencode", "cline": "cline", "kilo": "kilo",
            "qwen": "qwen", "qwen-anthropic": "qwen", "continue": "cn", "aider": "aider", "llm": "llm"}


# tried and not possible here, with why (listed in the tables)
NOT_POSSIBLE = [
    ("Cline CLI (Anthropic provider)", "3.0.65", "anthropic",
     "`cline auth -p anthropic -b URL` answers \"base URL is only supported for OpenAI and OpenAI-compatible "
     "providers\": use its OpenAI-compatible provider"),
    ("Crush", "", "", "`@charmland/crush` downloads its binary at install time: it cannot be installed here"),
]
README = os.path.join(ROOT, "README.md")


def write_readme_table(rows):
    """The README's compatibility table, between its markers, from this run's rows."""
    lines = ["| client | version | API the proxy serves it | text | tool loop | streaming | thinking with tools |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("missing"):
            continue
        tools = "works" if row["fixed"] and row["tool_results"] else ("n/a (no tools)" if not row["tool_results"] and
                                                                       row["key"] in ("aider", "llm") else "FAILS")
        if row["key"] == "aider":
            tools = "works (edit blocks, test runs)" if row["fixed"] else "FAILS"
        works = not any(code != 0 for code in row["exit"]) and not row["failures"]
        lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            row["client"], version_number(row["version"]), FRONT_NAMES[row["front"]], "works" if works else "FAILS",
            tools, "works" if row["streamed"] else "-", {True: "works", False: "FAILS", None: "n/a"}[row["thinking"]]))
    for client, number, front, why in NOT_POSSIBLE:
        lines.append("| %s | %s | %s | not possible: %s | | | |" % (client, number, FRONT_NAMES.get(front, ""), why))
    text = open(README, encoding="utf-8").read()
    start, end = "<!-- begin compatibility (python bench/record.py --write-docs) -->", "<!-- end compatibility -->"
    if start not in text:
        raise SystemExit("README.md has no compatibility markers")
    head, rest = text.split(start, 1)
    _old, tail = rest.split(end, 1)
    with open(README, "w", encoding="utf-8") as handle:
        handle.write(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)


FRONT_NAMES = {"chat": "Chat Completions", "anthropic": "Anthropic Messages", "responses": "Responses", "": ""}


def version_number(text):
    import re
    found = re.search(r"\d+\.\d+(\.\d+)?", text or "")
    return found.group(0) if found else "?"


def tests_pass(work):
    result = subprocess.run(scripted_agent.TESTS.split(), cwd=work, capture_output=True, text=True, timeout=60)
    return result.returncode == 0


def record_client(key, fake, proxy, scratch, timeout):
    runner, label = RUNNERS[key]
    binary = find(BINARIES[key])
    if not binary:
        return {"client": label, "key": key, "missing": True}
    work = os.path.join(scratch, key, "project")
    home = os.path.join(scratch, key, "home")
    shutil.copytree(FIXTURE, work)
    os.makedirs(home)
    recorder = Recorder(proxy.port)
    base = "http://127.0.0.1:%d" % recorder.port
    env = {"PATH": os.pathsep.join([os.path.dirname(binary), os.environ.get("PATH", "")]), "HOME": home,
           "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1", "CI": "1", "NODE_OPTIONS": "--no-deprecation"}
    fake.responder = scripted_agent.agent(work)
    before, answered = len(fake.requests), len(fake.exchanges)
    commands, front = runner(base, env, work, home)
    started, outputs, codes = time.monotonic(), [], []
    for command in commands:
        try:
            result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout,
                                    stdin=subprocess.DEVNULL)
            codes.append(result.returncode)
            outputs.append(result.stdout[-3000:] + result.stderr[-3000:])
        except subprocess.TimeoutExpired as error:
            codes.append("timeout")
            outputs.append(str(error.stdout or "")[-2000:] + str(error.stderr or "")[-2000:])
    seconds = time.monotonic() - started
    recorder.shutdown()
    upstream = fake.requests[before:]
    records = [r for r in recorder.records if r["method"] == "POST"]
    # the model's answers, in order, for the replay (the proxy's own summary calls left out)
    answers = [answer for body, answer in fake.exchanges[answered:] if not is_summary_request(body)]
    version_text = version([binary], env)
    os.makedirs(TRAFFIC, exist_ok=True)
    with gzip.open(os.path.join(TRAFFIC, key + ".jsonl.gz"), "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"client": label, "version": version_text, "front": front}) + "\n")
        for entry in recorder.records:
            entry = dict(entry, body=entry["body"].replace(work, PROJECT).replace(home, "/home/user"))
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        for answer in answers:
            handle.write(json.dumps({"answer": json.loads(json.dumps(answer).replace(
                json.dumps(work)[1:-1], PROJECT))}, ensure_ascii=False) + "\n")
    agent_requests = [r for r in upstream if r.get("tools") or "SEARCH" in json.dumps(r["messages"][:1])]
    streamed = any(json.loads(r["body"] or "{}").get("stream") for r in records if r["body"].startswith("{"))
    turns = [m for r in upstream for m in r["messages"] if m.get("role") == "assistant" and m.get("tool_calls")]
    thinking = None if not turns else all(m.get("reasoning_content") for m in turns)  # DeepSeek's 400 rule
    tool_results = max([sum(1 for m in r["messages"] if m.get("role") == "tool") for r in upstream] or [0])
    return {"client": label, "key": key, "version": version_text, "failures": sum(
                r.get("status", 0) >= 400 for r in recorder.records), "front": front, "exit": codes,
            "requests": len(records), "upstream": len(upstream), "agent_requests": len(agent_requests),
            "tool_results": tool_results, "fixed": None if key == "llm" else tests_pass(work), "streamed": streamed, "thinking": thinking,
            "seconds": seconds, "output": "\n".join(outputs)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--install", action="store_true")
    parser.add_argument("--clients", default=",".join(RUNNERS))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.install:
        os.makedirs(CLIENTS, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", CLIENTS] + list(NPM.values()),
                       check=True)
        for package in ("@anthropic-ai/claude-code", "opencode-ai", "cline", "@kilocode/cli"):  # postinstalls
            folder = os.path.join(CLIENTS, "node_modules", package)
            script = next((name for name in ("install.cjs", "postinstall.mjs") if os.path.exists(
                os.path.join(folder, name))), None)
            if script:
                subprocess.run(["node", script], cwd=folder, check=False)
        subprocess.run([sys.executable, "-m", "venv", os.path.join(CLIENTS, "py")], check=True)
        subprocess.run([os.path.join(CLIENTS, "py", "bin", "pip"), "install", "-q"] + list(PYPI.values()), check=True)
    fake = FakeDeepSeek(API_KEY).start()
    scratch = tempfile.mkdtemp(prefix="record-")
    os.makedirs(os.path.join(scratch, "data"))
    proxy = ProxyProcess(fake.url, os.path.join(scratch, "data"), ["--log-level", "INFO"])
    rows = []
    try:
        for key in args.clients.split(","):
            row = record_client(key, fake, proxy, scratch, args.timeout)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "output"}), flush=True)
            if row.get("missing") is None and (not row["fixed"] or any(code != 0 for code in row["exit"])):
                print("--- %s output:\n%s" % (row["client"], row["output"][-4000:]), file=sys.stderr, flush=True)
    finally:
        proxy.stop()
        fake.stop()
        # what a client left running (Cline CLI starts a hub daemon in the project folder)
        subprocess.run(["pkill", "-f", scratch], check=False)
    report = Report("record", args.write_docs, "Real clients through the proxy")
    report.line("| client | version | front | exit codes | requests | failed | tool results | fixed the bug (tests pass) "
                "| streaming | reasoning in every tool turn | seconds |")
    report.line("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row.get("missing"):
            report.line("| %s | not installed | | | | | | | | | |" % row["client"])
            continue
        row["version"] = version_number(row["version"])
        report.line("| %s | %s | %s | %s | %d | %d | %d | %s | %s | %s | %.0f |" % (
            row["client"], row["version"], row["front"], ",".join(map(str, row["exit"])), row["requests"], row["failures"],
            row["tool_results"], YES_NO[row["fixed"]], YES_NO[row["streamed"]], YES_NO[row["thinking"]], row["seconds"]))
    for client, number, front, why in NOT_POSSIBLE:
        report.line("| %s | %s | %s | not possible: %s | | | | | | | |" % (client, number, front, why))
    report.save()
    if args.write_docs and set(args.clients.split(",")) == set(RUNNERS):
        write_readme_table(rows)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
