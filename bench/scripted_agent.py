"""A deterministic model that drives a real coding agent through its own tools (bench/record.py).

It plays the fake DeepSeek's responder: given the chat body a client's request became, it picks the
next step of one plan (list the project, read files whole and in ranges, grep, run the tests, fix the
bug with the client's own edit tool, re-read, re-run) and expresses it with whichever tools that
client offers, found by their names and parameter schemas. The step is the number of tool results
already in the conversation, so the same history always gets the same answer. Requests without
tools (titles, side questions) get a short plain answer; the proxy's own summary calls get the
fake's deterministic summary, as a model would give.
"""

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from fake_deepseek import Answer, is_summary_request, summary_answer  # noqa: E402

TESTS = "python3 -m unittest discover -s tests -q"
BUG = "        if quantity > threshold:\n"
FIX = "        if quantity >= threshold:\n"
BUG2 = "        return on_shelves + held\n"  # the second task: reserved units must not count as free
FIX2 = "        return on_shelves - held\n"
# (what, argument...): the plan every client follows; ('edit', path, old, new) changes old into new.
# Two tasks, as an agent session has them: the pricing bug, then the store's reservations (a larger
# file, read whole and in ranges, edited, read again).
PLAN = [
    ("list", "."),
    ("read", "README.md"),
    ("run", TESTS),
    ("grep", "def bulk_discount"),
    ("read", "inventory/pricing.py"),
    ("read", "tests/test_pricing.py"),
    ("read_range", "inventory/pricing.py", 16, 12),
    ("read", "inventory/util.py"),
    ("grep", "price_for"),
    ("read", "inventory/report.py"),
    ("read", "docs/pricing.md"),
    ("edit", "inventory/pricing.py", BUG, FIX),
    ("read", "inventory/pricing.py"),
    ("run", TESTS),
    ("read_range", "tests/test_pricing.py", 1, 20),
    ("grep", "threshold"),
    ("read", "CHANGELOG.md"),
    ("read", "inventory/pricing.py"),
    ("run", TESTS),
    ("read", "tests/test_store.py"),
    ("grep", "def available"),
    ("read", "inventory/store.py"),
    ("read_range", "inventory/store.py", 76, 50),
    ("read", "inventory/models.py"),
    ("read_range", "inventory/store.py", 110, 16),
    ("edit", "inventory/store.py", BUG2, FIX2),
    ("read_range", "inventory/store.py", 76, 50),
    ("run", TESTS),
    ("grep", "reserved"),
    ("read", "inventory/store.py"),
    ("read_range", "inventory/store.py", 150, 44),
    ("run", TESTS),
]
DONE = ("Fixed: bulk discounts now apply from the threshold (`>=` in inventory/pricing.py), and reserved units "
        "no longer count as available (inventory/store.py); all 22 tests pass.")

PATH_NAMES = ("file_path", "filePath", "filepath", "absolute_path", "path", "target_file", "file", "filename", "dir_path", "dirpath",
              "directory", "dir")
KINDS = [  # (kind, name pattern), first match wins for each tool
    ("edit", r"^(edit|editor|edit_file|str_replace\w*|replace|replace_in_file|search_replace|apply_patch|multi_?edit)$"),
    ("read", r"^(read|read_file|read_files|view|view_file|readfile|read_many_files|open_file)$"),
    ("list", r"^(ls|list|list_dir|list_directory|list_files|listfiles)$"),
    ("grep", r"^(grep|search|search_codebase|search_files|search_file_content|grep_search|rg|ripgrep)$"),
    ("glob", r"^(glob|find_files|file_search)$"),
    ("run", r"^(bash|shell|run_commands|exec_command|run_shell_command|execute_command|run_terminal_cmd|terminal|run_command|"
            r"shell_command|local_shell|exec)$"),
    ("write", r"^(write|write_file|write_to_file|create_file)$"),
]


def schema_of(tool):
    function = tool.get("function") or {}
    parameters = function.get("parameters") or {}
    return function.get("name") or "", parameters.get("properties") or {}, parameters.get("required") or []


def classify(tools):
    """{kind: (name, properties, required)} for the tools a request offers."""
    found = {}
    for tool in tools or ():
        name, properties, required = schema_of(tool)
        for kind, pattern in KINDS:
            if kind not in found and re.match(pattern, name, re.I):
                found[kind] = (name, properties, required)
                break
    return found


def fill_required(arguments, properties, required):
    """Give every required parameter not set yet a plausible value of its type."""
    for name in required:
        if name in arguments:
            continue
        schema = properties.get(name) or {}
        kind = schema.get("type")
        if "enum" in schema and schema["enum"]:
            arguments[name] = schema["enum"][0]
        elif kind == "boolean":
            arguments[name] = False
        elif kind in ("integer", "number"):
            arguments[name] = 1
        elif kind == "array":
            arguments[name] = []
        elif kind == "object":
            arguments[name] = {}
        else:
            arguments[name] = "Run the project's tests" if "desc" in name.lower() else "."
    return arguments


def path_argument(properties, root, relative):
    for name in PATH_NAMES:
        if name in properties:
            return name, os.path.join(root, relative) if relative != "." else root
    return None, None


def read_call(kinds, root, path, start=None, count=None):
    if "read" in kinds:
        name, properties, required = kinds["read"]
        key, value = path_argument(properties, root, path)
        arguments = {key or "path": value or os.path.join(root, path)}
        if name.lower() == "read_many_files":
            arguments = {"paths": [os.path.join(root, path)]}
        if "files" in properties:  # Cline 3: a list of {path, start_line, end_line}
            entry = {"path": os.path.join(root, path)}
            if start is not None:
                entry.update(start_line=start, end_line=start + count - 1)
            return name, {"files": [entry]}
        if start is not None:
            for first, amount in (("offset", "limit"), ("start_line", "end_line"), ("line", "limit")):
                if first in properties:
                    arguments[first] = start if first != "offset" or "0-based" not in str(properties[first]) else start - 1
                    if amount in properties:
                        arguments[amount] = count if amount == "limit" else start + count - 1
                    break
        return name, fill_required(arguments, properties, required)
    if start is not None:
        return run_call(kinds, root, "sed -n '%d,%dp' %s" % (start, start + count - 1, path))
    return run_call(kinds, root, "cat " + path)


def run_call(kinds, root, command):
    if "run" not in kinds:
        return None
    name, properties, required = kinds["run"]
    if "commands" in properties:  # Cline 3: a list of commands
        return name, {"commands": [command]}
    arguments = {}
    for key in ("command", "cmd", "commandLine"):
        if key in properties:
            kind = (properties[key] or {}).get("type")
            arguments[key] = ["bash", "-lc", command] if kind == "array" else command
            break
    else:
        arguments["command"] = command
    for key in ("workdir", "cwd", "directory", "working_directory"):
        if key in properties:
            arguments[key] = root
    if "description" in properties:
        arguments["description"] = "Run: " + command[:40]
    return name, fill_required(arguments, properties, required)


def step_call(step, kinds, root):
    """(tool name, arguments) for one plan step with this client's tools; None to skip the step."""
    what, target = step[0], step[1]
    if what == "list":
        if "list" in kinds:
            name, properties, required = kinds["list"]
            key, value = path_argument(properties, root, target)
            return name, fill_required({key: value} if key else {}, properties, required)
        if "glob" in kinds:
            name, properties, required = kinds["glob"]
            return name, fill_required({"pattern": "**/*"}, properties, required)
        return run_call(kinds, root, "ls -R")
    if what == "read":
        return read_call(kinds, root, target)
    if what == "read_range":
        return read_call(kinds, root, target, step[2], step[3])
    if what == "grep":
        if "grep" in kinds:
            name, properties, required = kinds["grep"]
            if "queries" in properties:  # Cline 3: a list of regexes over the codebase
                return name, {"queries": [target]}
            arguments = {}
            for key in ("pattern", "regex", "query", "search"):
                if key in properties:
                    arguments[key] = target
                    break
            key, value = path_argument(properties, root, ".")
            if key:
                arguments[key] = value
            return name, fill_required(arguments, properties, required)
        return run_call(kinds, root, "grep -rn '%s' ." % target)
    if what == "run":
        return run_call(kinds, root, target)
    if what == "edit":
        return edit_call(kinds, root, target, step[2], step[3])
    raise ValueError(what)


def edit_call(kinds, root, path, bug, fix):
    if "edit" in kinds:
        name, properties, required = kinds["edit"]
        if name == "apply_patch" or "patch" in properties or "input" in properties and not properties.get("old_string"):
            patch = "*** Begin Patch\n*** Update File: %s\n@@\n-%s+%s*** End Patch\n" % (path, bug, fix)
            return name, {"input": patch} if "input" in properties or not properties else {"patch": patch}
        if "diff" in properties:  # Cline's replace_in_file: SEARCH/REPLACE blocks
            diff = "------- SEARCH\n%s=======\n%s+++++++ REPLACE\n" % (bug, fix)
            key, value = path_argument(properties, root, path)
            return name, fill_required({key or "path": value, "diff": diff}, properties, required)
        key, value = path_argument(properties, root, path)
        arguments = {key or "file_path": value}
        for old, new in (("old_string", "new_string"), ("oldString", "newString"), ("old_str", "new_str"),
                         ("search", "replace"), ("old_text", "new_text")):
            if old in properties:
                arguments[old], arguments[new] = bug.rstrip("\n"), fix.rstrip("\n")
                break
        else:
            if "edits" in properties:
                arguments["edits"] = [{"old_string": bug.rstrip("\n"), "new_string": fix.rstrip("\n")}]
        return name, fill_required(arguments, properties, required)
    return run_call(kinds, root, "sed -i 's/%s/%s/' %s" % (bug.strip(), fix.strip(), path))


def tool_results(messages):
    return sum(1 for message in messages if message.get("role") == "tool")


def last_user_text(messages):
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def agent(root):
    """The responder for a project checked out at `root`."""
    def respond(body, number):
        if is_summary_request(body):
            return summary_answer(body)
        messages = body.get("messages") or []
        kinds = classify(body.get("tools"))
        if not kinds:
            return side_answer(body, messages, number)
        done = tool_results(messages)
        # a client may drop or batch steps; the plan resumes after the results it holds
        if done >= len(PLAN):
            return Answer(content=DONE, reasoning="The tests pass now; I have checked the file.")
        for index in range(done, len(PLAN)):
            call = step_call(PLAN[index], kinds, root)
            if call:
                return Answer(content="" if index else "I'll look at the project first.",
                              reasoning="Step %d: %s %s." % (index + 1, PLAN[index][0], PLAN[index][1]),
                              tool_calls=[call])
        return Answer(content=DONE, reasoning="Nothing left to do.")
    return respond


def side_answer(body, messages, number):
    """A request without tools: a title, a summary of the session, a plain question."""
    text = last_user_text(messages).lower()
    if "title" in text:
        return Answer(content="Fix bulk discount threshold", reasoning="A short title.")
    if "<<<<<<< search" in json.dumps(messages[:1]).lower() or "search/replace" in json.dumps(messages[:2]).lower():
        return aider_answer(messages)
    return Answer(content="The bulk discount applied only above the threshold; it should apply from it (answer %d)."
                  % number, reasoning="A plain answer.")


def aider_answer(messages):
    """Aider (no tools: edits as SEARCH/REPLACE blocks in the text). First a wrong fix, so that its
    test run sends the output back; then the right one; then plain answers."""
    history = json.dumps(messages)
    if "reservation test" in last_user_text(messages) and FIX2.strip() not in history:
        return Answer(content="Reserved units are held, so they must be subtracted from what is free.\n\n"
                      "inventory/store.py\n```python\n<<<<<<< SEARCH\n%s=======\n%s>>>>>>> REPLACE\n```\n" % (BUG2, FIX2),
                      reasoning="Edit with a SEARCH/REPLACE block.")
    if "quantity >= threshold" in history or "# Please fix" in history and history.count("<<<<<<< SEARCH") > 3:
        return Answer(content="The tests pass now: the discount applies from the threshold.", reasoning="Done.")
    tried = history.count("quantity > threshold + 0")
    if not tried:
        search, replace = BUG, "        if quantity > threshold + 0:\n"
        note = "The comparison looks off; let me make the threshold explicit first."
    else:
        search, replace = "        if quantity > threshold + 0:\n", FIX
        note = "The test output shows the threshold itself must qualify: use >=."
    return Answer(content="%s\n\ninventory/pricing.py\n```python\n<<<<<<< SEARCH\n%s=======\n%s>>>>>>> REPLACE\n```\n"
                  % (note, search, replace), reasoning="Edit with a SEARCH/REPLACE block.")
