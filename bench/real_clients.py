"""Run the real Claude Code and Codex CLI headless through the proxy against the fake DeepSeek.

    python bench/real_clients.py --install      # npm-installs both into bench/.clients/ first
    python bench/real_clients.py [--write-docs]

Each client gets one task: a tool round (Claude Code reads a file with Read; Codex runs `cat` with
exec_command, then edits the file with its freeform apply_patch tool), then a text answer that quotes
what the tool returned. The fake DeepSeek plays the model: it calls whichever of those tools the client
offers, then answers. Reported per client: its version, exit code, the requests the fake saw, whether
every tool round came back (tool results reached the model, the patch changed the file), and the
answer. Clients are found on PATH or in bench/.clients; only 127.0.0.1 is contacted.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from fake_deepseek import Answer, FakeDeepSeek  # noqa: E402
from helpers import API_KEY, ProxyProcess  # noqa: E402
from report import Report  # noqa: E402

CLIENTS = os.path.join(HERE, ".clients")
PACKAGES = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}
NOTE = "The secret word is pelican."
PATCH = "*** Begin Patch\n*** Update File: notes.txt\n@@\n-The secret word is pelican.\n+The secret word is heron.\n*** End Patch\n"


def binary(name):
    local = os.path.join(CLIENTS, "node_modules", ".bin", name)
    return local if os.path.exists(local) else shutil.which(name)


def tool_text(body):
    """Everything the tools returned so far in this request."""
    return "\n".join(str(m.get("content")) for m in body["messages"] if m["role"] == "tool")


def responder(workdir):
    def answer(body, number):
        names = {tool["function"]["name"] for tool in body.get("tools") or ()}
        results = [m for m in body["messages"] if m["role"] == "tool"]
        if not body.get("tools"):  # a side task (a title, a summary)
            return Answer(content="ok", reasoning="side task")
        if not results:
            if "Read" in names:
                return Answer(reasoning="I should read the notes.", tool_calls=[
                    ("Read", {"file_path": os.path.join(workdir, "notes.txt")})])
            if "exec_command" in names:
                return Answer(reasoning="I should cat the notes.", tool_calls=[("exec_command", {"cmd": "cat notes.txt"})])
        if len(results) == 1 and "apply_patch" in names:
            return Answer(reasoning="Now change the word.", tool_calls=[("apply_patch", {"input": PATCH})])
        word = "pelican" if "pelican" in tool_text(body) else "unknown"
        return Answer(content="DONE: the notes said %s." % word, reasoning="I have what I need.")
    return answer


def run(name, command, env, workdir, fake):
    before = len(fake.requests)
    started = __import__("time").monotonic()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    seconds = __import__("time").monotonic() - started
    requests = fake.requests[before:]
    tools_seen = sorted({m["tool_call_id"] for r in requests for m in r["messages"] if m["role"] == "tool"})
    with open(os.path.join(workdir, "notes.txt")) as handle:
        notes = handle.read()
    return {"client": name, "exit": result.returncode, "requests": len(requests), "tool results": len(tools_seen),
            "answer": "DONE: the notes said pelican." in result.stdout, "seconds": seconds,
            "patched": "heron" in notes, "output": (result.stdout + result.stderr)[-2000:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--install", action="store_true", help="npm install both clients into bench/.clients")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.install:
        os.makedirs(CLIENTS, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--prefix", CLIENTS] + list(PACKAGES.values()), check=True)
    report = Report("real-clients", args.write_docs, "Claude Code and Codex CLI through the proxy")
    fake = FakeDeepSeek(API_KEY).start()
    scratch = tempfile.mkdtemp(prefix="clients-")
    workdir = os.path.join(scratch, "work")
    os.makedirs(workdir)
    fake.responder = responder(workdir)
    proxy = ProxyProcess(fake.url, tempfile.mkdtemp(prefix="clients-data-"), ["--log-level", "INFO"])
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.path.join(scratch, "home"), "LANG": "C.UTF-8"}
    os.makedirs(base["HOME"])
    rows = []
    try:
        claude = binary("claude")
        if claude:
            with open(os.path.join(workdir, "notes.txt"), "w") as handle:
                handle.write(NOTE + "\n")
            env = dict(base, ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % proxy.port, ANTHROPIC_API_KEY="unused",
                       CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
            version = subprocess.run([claude, "--version"], capture_output=True, text=True, env=env).stdout.strip()
            row = run("Claude Code " + version, [claude, "-p", "What does notes.txt say? Use the Read tool.",
                                                 "--output-format", "json", "--allowedTools", "Read"],
                      env, workdir, fake)
            rows.append(row)
        codex = binary("codex")
        if codex:
            with open(os.path.join(workdir, "notes.txt"), "w") as handle:
                handle.write(NOTE + "\n")
            home = os.path.join(scratch, "codex")
            os.makedirs(home)
            with open(os.path.join(home, "config.toml"), "w") as handle:
                handle.write('model = "gpt-5.5"\nmodel_provider = "proxy"\n\n[model_providers.proxy]\n'
                             'name = "deepseek-proxy"\nbase_url = "http://127.0.0.1:%d/v1"\nenv_key = "DSPROXY_KEY"\n'
                             'wire_api = "responses"\n' % proxy.port)
            env = dict(base, CODEX_HOME=home, DSPROXY_KEY="unused")
            version = subprocess.run([codex, "--version"], capture_output=True, text=True, env=env).stdout.strip()
            rows.append(run(version, [codex, "exec", "--skip-git-repo-check", "-s", "workspace-write",
                                      "What does notes.txt say? Then change pelican to heron."], env, workdir, fake))
    finally:
        stats = json.loads(proxy.request("GET", "/stats")[2])
        proxy.stop()
        fake.stop()
    if not rows:
        report.line("Neither client found: run with --install (npm), or put claude / codex on PATH.")
    report.line("| client | exit code | requests through the proxy | tool results that reached the model "
                "| edited the file (apply_patch) | answer quotes the tool result | seconds |")
    report.line("|---|---|---|---|---|---|---|")
    for row in rows:
        report.line("| %s | %d | %d | %d | %s | %s | %.1f |" % (
            row["client"], row["exit"], row["requests"], row["tool results"],
            "yes" if row["patched"] else "-", "yes" if row["answer"] else "NO", row["seconds"]))
    report.line("\nThe proxy's /stats afterwards: %d requests, %d failed, %d reasoning restored, %d summary calls." % (
        stats["requests"]["total"], stats["requests"]["failed"], stats["reasoning"]["restored"],
        stats["proxy_calls"]["requests"]))
    for row in rows:
        if row["exit"] or not row["answer"]:
            print("--- %s output:\n%s" % (row["client"], row["output"]), file=sys.stderr)
    report.save()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
