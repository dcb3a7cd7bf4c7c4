"""Regenerate the README tables that come from the code: every flag (the configuration constants
and the flags stages declare, with their comments) and every stage of PIPELINE (its doc line and
how to turn it off). With --check, change nothing and exit 1 if README.md differs from the code.

    python bench/docs.py            # rewrite the tables
    python bench/docs.py --check    # fail when README.md has drifted (the test suite runs this)

The benchmark tables in docs/benchmarks.md are written by their own commands (--write-docs), since
they take minutes and some columns are timings.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import deepseek_proxy as proxy  # noqa: E402

FLAGS = ("| flag | default | meaning |\n|---|---|---|\n", "\n\nAlso `--boilerplate-tag NAME`")
STAGES = ("| stage | what it does | turn off |\n|---|---|---|\n", "\n\nThe Anthropic and Responses fronts")


def flag_table():
    rows = []
    defaults = proxy.Config()
    for name, meaning in proxy.config_help().items():
        flag = proxy.flag_name(name)
        default = getattr(defaults, name)
        shown = "`%s` / `--no-%s`" % (flag, flag[2:]) if isinstance(default, bool) else "`%s`" % flag
        rows.append("| %s | `%r` | %s |" % (shown, default, meaning.replace("|", "\\|")))
    return "\n".join(rows)


def stage_table():
    return "\n".join("| `%s` | %s | %s |" % (stage.name, stage.doc.replace("|", "\\|"), stage.off)
                     for stage in proxy.PIPELINE)


def rendered(text):
    for (start, end), table in ((FLAGS, flag_table()), (STAGES, stage_table())):
        head = text.index(start) + len(start)
        text = text[:head] + table + text[text.index(end, head):]
    return text


def main(argv):
    path = os.path.join(ROOT, "README.md")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    new = rendered(text)
    if "--check" in argv:
        if new != text:
            print("README.md differs from the code: run python bench/docs.py", file=sys.stderr)
            return 1
        return 0
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
