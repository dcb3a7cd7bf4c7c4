"""What a benchmark prints, also written into docs/benchmarks.md (with --write-docs), so the tables in
the docs are always the output of the command named above them."""

import os
import platform
import re
import sys
import time

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")
HEADER = """# Benchmarks

Every table below is written by the command named above it (`--write-docs`), on the machine named
there; none is edited by hand. All of them run against the fake DeepSeek in `tests/fake_deepseek.py`
(4 characters a token, 128-token prefix-cache units, list prices) and contact nothing but 127.0.0.1.
"""


class Report:
    """Print lines as they come; with write=True, replace this benchmark's section of the docs."""

    def __init__(self, name, write, title):
        self.name, self.write, self.title = name, write, title
        self.lines = []

    def columns(self, *names):
        """A markdown table's header and its rule."""
        self.line("| %s |" % " | ".join(names))
        self.line("|" + "---|" * len(names))

    def line(self, text=""):
        print(text, flush=True)
        self.lines.append(text)

    def save(self):
        if not self.write:
            return
        command = "python " + " ".join(["bench/" + os.path.basename(sys.argv[0])] +
                                       [arg for arg in sys.argv[1:] if arg != "--write-docs"])
        section = "<!-- begin %s -->\n## %s\n\n`%s` (%s, %d cores, Python %s, %s):\n\n%s\n<!-- end %s -->" % (
            self.name, self.title, command, platform.machine(), os.cpu_count(), platform.python_version(),
            time.strftime("%Y-%m-%d"), "\n".join(self.lines).strip(), self.name)
        text = open(DOCS, encoding="utf-8").read() if os.path.exists(DOCS) else HEADER
        pattern = re.compile(r"<!-- begin %s -->.*?<!-- end %s -->" % (re.escape(self.name), re.escape(self.name)),
                             re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda match: section, text)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        with open(DOCS, "w", encoding="utf-8") as handle:
            handle.write(text)
        print("written to docs/benchmarks.md", file=sys.stderr)
