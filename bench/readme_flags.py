"""Rewrite the flag table in README.md from deepseek_proxy.py's configuration block (the constants and
their comments), so the table is always the code's.

    python bench/readme_flags.py
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import deepseek_proxy as proxy  # noqa: E402

START = "| flag | default | meaning |\n|---|---|---|\n"
END = "\n\nAlso `--boilerplate-tag NAME`"


def table():
    rows = []
    for name, meaning in proxy.config_help().items():
        flag = "--" + proxy.FLAG_NAMES.get(name, name.lower()).replace("_", "-")
        default = getattr(proxy, name)
        shown = "`%s` / `--no-%s`" % (flag, flag[2:]) if isinstance(default, bool) else "`%s`" % flag
        rows.append("| %s | `%r` | %s |" % (shown, default, meaning.replace("|", "\\|")))
    return START + "\n".join(rows)


def main():
    path = os.path.join(ROOT, "README.md")
    text = open(path, encoding="utf-8").read()
    start, end = text.index(START), text.index(END)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text[:start] + table() + text[end:])


if __name__ == "__main__":
    main()
