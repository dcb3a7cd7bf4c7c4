"""Synthetic agent sessions in the shape of real clients (Copilot, Cline, Aider, as docs/design.md describes them), for the benchmarks.

Each session is a list of requests as the client sends them (append-only history, no
reasoning_content echoed back) plus the scripted answer to each, with its reasoning. Deterministic:
the same seed gives the same bytes.

    copilot  VS Code Copilot agent: 16K-char XML system prompt, 36 tools, a byte-stable global context
             message, per-turn <context>/<reminderInstructions>/<userRequest>, tool rounds that read,
             grep and edit files (files re-read, identical or slightly edited).
    cline    Cline/Roo: 40K-char system prompt, content as text parts, <environment_details> in every
             user and tool message (only time and cost change), line-numbered file reads.
    aider    Aider: no tools, every request re-sends the chat files fenced after the history, a
             repo map, SEARCH/REPLACE answers quoting code.
    *-rereads  an agent fixing code in each client's shape (rereads_session): files read whole and in
             overlapping ranges, edited, re-read, and a test suite re-run whose output changes a little.
"""

import json
import random

WORDS = ("config request handler stream token cache prefix summary message value result buffer parse "
         "render client server upstream session retry timeout budget estimate digest module record "
         "index offset window policy stage pipeline reasoning answer payload header status error").split()


class Generator:
    def __init__(self, seed):
        self.random = random.Random(seed)

    def words(self, count):
        return " ".join(self.random.choice(WORDS) for _ in range(count))

    def identifier(self):
        return "_".join(self.random.choice(WORDS) for _ in range(2))

    def code_file(self, lines):
        out = []
        while len(out) < lines:
            name = self.identifier()
            out.append("def %s(%s, %s):" % (name, self.identifier(), self.identifier()))
            out.append('    """%s."""' % self.words(8).capitalize())
            for _ in range(self.random.randint(3, 9)):
                out.append("    %s = %s(%s) + %d" % (self.identifier(), self.identifier(), self.identifier(),
                                                    self.random.randint(0, 99)))
            out.append("    return %s" % self.identifier())
            out.append("")
        return "\n".join(out[:lines])

    def edit(self, text):
        lines = text.split("\n")
        for _ in range(3):
            index = self.random.randrange(len(lines))
            lines[index] = "    %s = %s  # edited" % (self.identifier(), self.identifier())
        return "\n".join(lines)

    def xml_prompt(self, sections, chars):
        per = chars // len(sections)
        parts = []
        for tag in sections:
            body = []
            while sum(len(line) for line in body) < per:
                body.append("- " + self.words(14).capitalize() + ".")
            parts.append("<%s>\n%s\n</%s>" % (tag, "\n".join(body), tag))
        return "\n".join(parts)

    def tools(self, count):
        tools = []
        for index in range(count):
            properties = {self.identifier(): {"type": "string", "description": self.words(18)} for _ in range(5)}
            tools.append({"type": "function", "function": {
                "name": "tool_%d_%s" % (index, self.identifier()), "description": self.words(60),
                "parameters": {"type": "object", "properties": properties, "required": list(properties)[:2]}}})
        return tools


class Session:
    """Accumulates the client-side history and snapshots one request per model call."""

    def __init__(self, name, tools=None):
        self.name = name
        self.tools = tools
        self.history = []
        self.requests = []  # [{"messages": [...], "tools": ..., "answer": {...}}]
        self.call_number = 0

    def call(self, answer):
        """The client sends its history; the model answers `answer` (with reasoning_content)."""
        self.call_number += 1
        answer = dict(answer, reasoning_content="Reasoning %d of %s: %s" % (
            self.call_number, self.name, answer.pop("why", "")))
        self.requests.append({"messages": [dict(m) for m in self.history], "tools": self.tools,
                              "answer": answer})
        echoed = {k: v for k, v in answer.items() if k != "reasoning_content"}
        self.history.append(echoed)
        return answer


def tool_call(session, name, arguments):
    return {"id": "call_%02d_%s%06d" % (0, session.name, session.call_number * 10 + len(session.history)),
            "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def copilot_session(seed=1, user_turns=9, rounds=6):
    gen = Generator(seed)
    session = Session("copilot", gen.tools(36))
    system = gen.xml_prompt(["instructions", "toolUseInstructions", "editFileInstructions", "outputFormatting",
                             "memoryInstructions"], 16000)
    reminder = "<reminderInstructions>\n%s\n</reminderInstructions>" % gen.words(400)
    files = {"src/mod%d.py" % i: gen.code_file(gen.random.randint(120, 260)) for i in range(14)}
    tree = "\n".join(sorted(files))
    session.history += [
        {"role": "system", "content": system},
        {"role": "user", "content": "<environment_info>\nOS: linux\n%s\n</environment_info>\n<workspace_info>\n```\n"
                                    "%s\n```\n</workspace_info>\n<userMemory>\n%s\n</userMemory>"
                                    % (gen.words(80), tree, gen.words(120))}]
    for turn in range(user_turns):
        session.history.append({"role": "user", "content": "<context>\nThe current date is 2026-11-%02d.\n"
                                "Terminals: bash\n</context>\n%s\n<userRequest>\n%s\n</userRequest>"
                                % (turn + 1, reminder, gen.words(30))})
        for round_number in range(rounds):
            path = gen.random.choice(list(files))
            name = gen.random.choice(["read_file", "read_file", "grep_search", "replace_string_in_file"])
            call = tool_call(session, name, {"filePath": path})
            session.call({"role": "assistant", "content": "", "tool_calls": [call], "why": "look at " + path})
            if name == "replace_string_in_file":
                files[path] = gen.edit(files[path])
                output = "The file %s was edited." % path
            elif name == "grep_search":
                output = "\n".join("%s:%d: %s" % (path, gen.random.randint(1, 200), gen.words(8)) for _ in range(15))
            else:
                output = files[path]
            session.history.append({"role": "tool", "tool_call_id": call["id"], "content": output})
        snippet = "\n".join(files[gen.random.choice(list(files))].split("\n")[:40])
        session.call({"role": "assistant", "content": "Done. The relevant part now reads:\n\n```python\n%s\n```\n\n%s"
                      % (snippet, gen.words(60)), "why": "summarise turn %d" % turn})
    return session


def cline_session(seed=2, user_turns=7, rounds=7):
    gen = Generator(seed)
    session = Session("cline", gen.tools(12))
    system = gen.xml_prompt(["role", "tool_use", "rules", "capabilities", "objective"], 40000)
    files = {"app/part%d.ts" % i: gen.code_file(gen.random.randint(100, 220)) for i in range(12)}
    clock = [0]

    def environment(first=False):
        clock[0] += 1
        listing = ("\n\n# Current Working Directory Files\n" + "\n".join(sorted(files))) if first else ""
        return ("<environment_details>\n# VSCode Visible Files\n%s\n\n# VSCode Open Tabs\n%s\n\n# Current Time\n"
                "2026-11-28 10:%02d:%02d\n\n# Current Cost\n$%.2f\n\n# Current Mode\nact\n\n# Todo\n%s%s\n"
                "</environment_details>" % (sorted(files)[0], " ".join(sorted(files)[:5]), clock[0] // 60,
                                            clock[0] % 60, clock[0] * 0.013, gen_todo, listing))

    gen_todo = "\n".join("| %d | %s | pending |" % (i, gen.words(6)) for i in range(6))
    session.history.append({"role": "system", "content": system})
    for turn in range(user_turns):
        session.history.append({"role": "user", "content": [
            {"type": "text", "text": "<task>\n%s\n</task>" % gen.words(40)},
            {"type": "text", "text": environment(first=turn == 0)}]})
        for round_number in range(rounds):
            path = gen.random.choice(list(files))
            call = tool_call(session, "read_file", {"path": path})
            session.call({"role": "assistant", "content": "I'll read %s." % path, "tool_calls": [call],
                          "why": "read " + path})
            if gen.random.random() < 0.2:
                files[path] = gen.edit(files[path])
            numbered = "\n".join("%d | %s" % (i + 1, line) for i, line in enumerate(files[path].split("\n")))
            session.history.append({"role": "tool", "tool_call_id": call["id"], "content": [
                {"type": "text", "text": "[read_file for '%s'] Result:\n%s" % (path, numbered)},
                {"type": "text", "text": environment()}]})
        session.call({"role": "assistant", "content": "Task step %d complete. %s" % (turn, gen.words(40)),
                      "why": "finish %d" % turn})
    return session


def aider_session(seed=3, turns=30, edit_format="diff", add_every=0, lint_every=0):
    """Aider: system prompt, repo map, the history (requests and answers), then every chat file in
    full after the history (not kept in it), then the new request with the reminder.
    edit_format "diff" answers with SEARCH/REPLACE blocks, "whole" with whole files; add_every: a file
    is /add-ed to the chat every so many turns; lint_every: a lint-fix round (the linter's output as
    the next request) every so many turns."""
    gen = Generator(seed)
    session = Session("aider" if edit_format == "diff" else "aider-" + edit_format)
    reminder = "Reply with SEARCH/REPLACE blocks. " + gen.words(200)
    system = "Act as an expert software developer. " + gen.words(600) + "\n" + reminder
    pool = {"lib/core%d.py" % i: gen.code_file(gen.random.randint(250, 400)) for i in range(20)}
    files = dict(sorted(pool.items())[:14 if not add_every else 6])
    repo_map = "\n".join("%s:\n  def %s\n  def %s" % (path, gen.identifier(), gen.identifier())
                         for path in sorted(pool) + ["lib/extra%d.py" % i for i in range(40)])
    done = []  # Aider's "done" messages: the history, append-only
    lint = None
    for turn in range(turns):
        if add_every and turn and turn % add_every == 0 and len(files) < len(pool):
            added = sorted(set(pool) - set(files))[0]
            files[added] = pool[added]
        fenced = "\n\n".join("%s\n```python\n%s\n```" % (path, text) for path, text in sorted(files.items()))
        current = [
            {"role": "user", "content": "Here are summaries of some files present in my git repository.\n" + repo_map},
            {"role": "assistant", "content": "Ok, I won't try and edit those files without asking first."}]
        request = lint or gen.words(25)
        session.history = [{"role": "system", "content": system}] + current + done + [
            {"role": "user", "content": "I have *added these files to the chat* so you can go ahead and edit them.\n\n"
                                        + fenced},
            {"role": "assistant", "content": "Ok, any changes I propose will be to those files."},
            {"role": "user", "content": request + "\n\n" + reminder}]
        path = gen.random.choice(sorted(files))
        old = "\n".join(files[path].split("\n")[10:30])
        files[path] = gen.edit(files[path])
        pool[path] = files[path]
        new = "\n".join(files[path].split("\n")[10:30])
        if edit_format == "whole":
            content = "%s\n```python\n%s\n```" % (path, files[path])
        else:
            content = "%s\n```python\n<<<<<<< SEARCH\n%s\n=======\n%s\n>>>>>>> REPLACE\n```" % (path, old, new)
        answer = session.call({"role": "assistant", "content": content, "why": "edit " + path})
        done += [{"role": "user", "content": request},
                 {k: v for k, v in answer.items() if k != "reasoning_content"}]
        lint = ("# Fix any errors below, if possible.\n\n## Running: flake8 %s\n\n%s:%d:1: E302 expected 2 blank "
                "lines, found 1" % (path, path, gen.random.randint(10, 200))) if lint_every and turn % lint_every == 0 \
            and not lint else None
    return session


def test_run(gen, names, failing):
    """A test runner's output: one line per test, a few failing, a summary."""
    lines = ["============================= test session starts =============================",
             "platform linux -- Python 3.11.7, pytest-8.3.2, pluggy-1.5.0", "rootdir: /work/project",
             "collected %d items" % len(names), ""]
    for name in names:
        lines.append("tests/%s PASSED%s" % (name, " " * 20) if name not in failing else "tests/%s FAILED" % name)
    for name in sorted(failing):
        lines += ["", "_________________________ %s _________________________" % name,
                  "    def %s():" % name.split("::")[1], ">       assert compute(3) == 4",
                  "E       assert %d == 4" % gen.random.randint(5, 9), ""]
    lines.append("========== %d failed, %d passed in %.2fs ==========" % (
        len(failing), len(names) - len(failing), gen.random.uniform(1, 3)))
    return "\n".join(lines)


def edit_lines(gen, text):
    """An agent's edit: a few lines changed, sometimes one inserted or removed."""
    lines = text.split("\n")
    for _ in range(gen.random.randint(1, 3)):
        index = gen.random.randrange(len(lines))
        choice = gen.random.random()
        if choice < 0.6:
            lines[index] = "    %s = %s(%s)  # fixed" % (gen.identifier(), gen.identifier(), gen.identifier())
        elif choice < 0.8:
            lines.insert(index, "    %s = %s  # added" % (gen.identifier(), gen.identifier()))
        else:
            del lines[index]
    return "\n".join(lines)


def rereads_session(shape, seed=11, turns=6, rounds=8):
    """An agent fixing code: reads files whole and in overlapping ranges, edits them, re-reads them, and
    re-runs a test suite whose output changes in a few lines; in the shape of one client:
    copilot (raw tool results), cline (text parts, numbered lines, environment_details), cline-xml
    (no native tools: results come back as user messages), continue (no tools: files attached to user
    messages as fenced blocks whose info string is the path)."""
    gen = Generator(seed)
    native = shape in ("copilot", "cline")
    session = Session(shape + "-rereads", gen.tools(20) if native else None)
    files = {"src/file%d.py" % i: gen.code_file(gen.random.randint(150, 280)) for i in range(6)}
    tests = ["test_%s.py::test_%s" % (gen.identifier(), gen.identifier()) for _ in range(40)]
    failing = set(gen.random.sample(tests, 4))
    clock = [0]

    def environment():
        clock[0] += 1
        return "<environment_details>\n# Current Time\n2026-11-28 11:%02d:%02d\n# Current Cost\n$%.2f\n" \
               "</environment_details>" % (clock[0] // 60, clock[0] % 60, clock[0] * 0.01)

    def view(path, first=None, last=None):
        lines = files[path].split("\n")
        first, last = first or 1, min(last or len(lines), len(lines))
        chosen = lines[first - 1:last]
        if shape.startswith("cline"):
            return "\n".join("%d | %s" % (first + i, line) for i, line in enumerate(chosen))
        return "\n".join(chosen)

    system = gen.xml_prompt(["instructions", "rules"], 6000)
    session.history.append({"role": "system", "content": system})
    for turn in range(turns):
        path = gen.random.choice(sorted(files))
        request = "Fix the failing tests in %s. %s" % (path, gen.words(20))
        if shape == "continue":
            request = "```%s\n%s\n```\n\n%s" % (path, files[path], request)
        session.history.append({"role": "user", "content": request if shape != "cline" else [
            {"type": "text", "text": "<task>\n%s\n</task>" % request}, {"type": "text", "text": environment()}]})
        for round_number in range(rounds):
            kind = gen.random.choice(["read", "range", "edit", "test", "read", "test"])
            size = len(files[path].split("\n"))
            if kind == "range":
                start = gen.random.randint(1, max(1, size - 120))
                name, arguments, output = "read_file", {"path": path, "start": start, "end": start + 100}, \
                    view(path, start, start + 100)
            elif kind == "edit":
                files[path] = edit_lines(gen, files[path])
                name, arguments, output = "replace_string_in_file", {"path": path}, "Edited %s." % path
            elif kind == "test":
                if failing and gen.random.random() < 0.5:
                    failing.discard(sorted(failing)[0])
                name, arguments, output = "run_in_terminal", {"command": "pytest -q"}, test_run(gen, tests, failing)
            else:
                name, arguments, output = "read_file", {"path": path}, view(path)
            if shape == "continue":
                if kind in ("read", "range", "edit"):  # the user attaches the file again
                    session.call({"role": "assistant", "content": "Please show me %s again." % path,
                                  "why": "need " + path})
                    session.history.append({"role": "user", "content": "```%s\n%s\n```\nHere it is." % (
                        path, files[path])})
                else:
                    session.call({"role": "assistant", "content": "Run the tests and paste the output.",
                                  "why": "tests"})
                    session.history.append({"role": "user", "content": "```\n%s\n```" % output})
                continue
            if shape == "cline-xml":
                session.call({"role": "assistant", "content": "<%s>\n<path>%s</path>\n</%s>" % (name, path, name),
                              "why": "%s %s" % (name, path)})
                session.history.append({"role": "user", "content": [
                    {"type": "text", "text": "[%s for '%s'] Result:\n%s" % (name, path, output)},
                    {"type": "text", "text": environment()}]})
                continue
            call = tool_call(session, name, arguments)
            session.call({"role": "assistant", "content": "", "tool_calls": [call], "why": "%s %s" % (name, path)})
            content = output if shape == "copilot" else [
                {"type": "text", "text": "[%s for '%s'] Result:\n%s" % (name, path, output)},
                {"type": "text", "text": environment()}]
            session.history.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        session.call({"role": "assistant", "content": "Turn %d done. %s" % (turn, gen.words(30)), "why": "done"})
    return session


def scripted_responder(session, model_seconds=0.0):
    """A responder for the fake DeepSeek (tests/fake_deepseek.py) that answers a session's requests
    with its scripted answers, same tool-call ids, taking model_seconds each; summaries as the fake's."""
    import time
    from fake_deepseek import Answer, is_summary_request, summary_answer
    answers = iter(request["answer"] for request in session.requests)

    def responder(body, number):
        if is_summary_request(body):
            return summary_answer(body)
        time.sleep(model_seconds)
        answer = next(answers)
        return Answer(content=answer.get("content") or "", reasoning=answer["reasoning_content"],
                      tool_calls=[(c["function"]["name"], json.loads(c["function"]["arguments"]), c["id"])
                                  for c in answer.get("tool_calls") or ()])
    return responder


SESSIONS = {"copilot": copilot_session, "cline": cline_session, "aider": aider_session,
            "copilot-long": lambda: copilot_session(seed=4, user_turns=16, rounds=8),
            "cline-long": lambda: cline_session(seed=5, user_turns=13, rounds=8),
            "aider-whole": lambda: aider_session(seed=6, turns=24, edit_format="whole"),
            "aider-add-lint": lambda: aider_session(seed=7, turns=30, add_every=6, lint_every=4),
            "copilot-rereads": lambda: rereads_session("copilot"),
            "cline-rereads": lambda: rereads_session("cline"),
            "cline-xml-rereads": lambda: rereads_session("cline-xml"),
            "continue-rereads": lambda: rereads_session("continue")}


if __name__ == "__main__":
    for name, make in SESSIONS.items():
        session = make()
        session.name = name
        last = session.requests[-1]
        chars = sum(len(json.dumps(m)) for m in last["messages"]) + len(json.dumps(last["tools"] or ""))
        print("%-8s requests=%3d last request ~%d chars (~%dK tokens at 4 chars/token)"
              % (name, len(session.requests), chars, chars // 4000))
