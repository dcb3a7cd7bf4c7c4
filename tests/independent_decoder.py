"""A decoder of the proxy's notation written from docs/design.md ("One notation") alone.

It shares no code with deepseek_proxy.py (it does not import it): if the notes said something other
than what the proxy does, this decoder and the proxy's own rebuild() would disagree, and the tests
that run both on every request of the bench sessions and the recorded clients would fail.

decode(messages) -> messages: every note replaced by the text it stands for.
"""

import json
import re

REPEAT = re.compile(r"\[Repeat of (.+?), unchanged\.\]")
CHANGE = re.compile(r"\[Changed copy of (.+?); its changes follow, (\d+) lines? of unified diff without context lines\."
                    r"(?: Its lines (\d+) to (\d+) start with the line numbers (\d+) to (\d+)"
                    r"(?: \(right-aligned to (\d+) characters\))?, then (\"(?:[^\"\\]|\\.)*\"), left out of the diff\.)?\]")
DISTANCE = re.compile(r"^(.*) (\d+) messages? (above|below)(?: \(its (\d+)(?:st|nd|rd|th) text part\))?"
                      r"(?: \(its JSON's ((?:\[\d+\]|\.[A-Za-z_][A-Za-z0-9_]*)+)\))?$")
TAG_PLACE = re.compile(r"^the <([^>]+)> block (\d+) messages? above(?: \(its (\d+)(?:st|nd|rd|th) of them\))?$")
COPY_PLACE = re.compile(r"^the copy of this block (\d+) messages? (above|below) \(that message's (\d+)(?:st|nd|rd|th) "
                        r"fenced block\)$")
CONTENTS_PLACE = re.compile(r"^the contents of the <attachment> block (\d+) messages? above"
                            r"(?: \(its (\d+)(?:st|nd|rd|th) of them\))?$")
FENCED_PLACE = re.compile(r"^(?:an assistant's|the) fenced block(?: `(.*)`)?$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
NUMBER_PREFIX = re.compile(r"^( *)([1-9]\d{0,6}|0)(\t| \| |\| |: |\u2192)")


def parts_of(message):
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return []


def with_parts(message, texts):
    content = message.get("content")
    if isinstance(content, str):
        return dict(message, content=texts[0])
    out, taken = [], iter(texts)
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            part = dict(part, text=next(taken))
        out.append(part)
    return dict(message, content=out)


def fences(text):
    """(start offset, end offset, opening line, closing line, body) of each fenced block."""
    found, offset, opening = [], 0, None
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        match = FENCE.match(bare)
        if opening is None:
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                opening = (offset, bare, match.group(1), offset + len(line))
        elif match and match.group(1)[0] == opening[2][0] and len(match.group(1)) >= len(opening[2]) \
                and not match.group(2).strip():
            found.append((opening[0], offset + len(bare), opening[1], bare, text[opening[3]:offset]))
            opening = None
        offset += len(line)
    return found


def info_of(opening_line):
    return opening_line.strip().lstrip("`~").strip()[:80]


def numbered(lines):
    """(lines with the numbered run's prefixes removed) per the rule in design.md."""
    for start in range(min(4, len(lines))):
        first = NUMBER_PREFIX.match(lines[start])
        if first:
            break
    else:
        return lines
    width = len(first.group(1)) + len(first.group(2)) if first.group(1) else 0
    number, separator = int(first.group(2)), first.group(3)
    end, stripped = start, []
    while end < len(lines):
        prefix = str(number + end - start).rjust(width) + separator
        if not lines[end].startswith(prefix):
            break
        stripped.append(lines[end][len(prefix):])
        end += 1
    if end - start < 3 or len(lines) - end > 3:
        return lines
    return lines[:start] + stripped + lines[end:]


def patch(old, diff):
    """The lines the zero-context unified diff makes of `old`."""
    out, used, row = [], 0, 0
    while row < len(diff):
        header = re.fullmatch(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@", diff[row])
        if header is None:
            raise ValueError("expected a hunk header, found %r" % diff[row][:60])
        a, b, _c, d = map(int, header.groups())
        until = a - 1 if b else a
        out += old[used:until]
        row += 1
        if b and row < len(diff) and diff[row] == "-[%d lines]" % b:
            row += 1
        else:
            if any(not line.startswith("-") for line in diff[row:row + b]):
                raise ValueError("expected %d removed lines" % b)
            row += b
        added = diff[row:row + d]
        if len(added) != d or any(not line.startswith("+") for line in added):
            raise ValueError("expected %d added lines" % d)
        out += [line[1:] for line in added]
        row += d
        used = until + b
    return out + old[used:]


class Decoder:
    def __init__(self, messages):
        self.out = [dict(message) for message in messages]

    def text_at(self, index, where):
        """The text WHERE names, seen from message `index` (already decoded messages only above)."""
        tag = TAG_PLACE.match(where)
        if tag:
            other = index - int(tag.group(2))
            text = "\n".join(parts_of(self.out[other]))
            blocks, at = [], 0
            opener = re.compile(r"<%s(?:\s[^<>]*)?>" % re.escape(tag.group(1)))
            close = "</%s>" % tag.group(1)
            while True:
                found = opener.search(text, at)
                if not found:
                    break
                end = text.find(close, found.end())
                if end < 0:
                    at = found.end()
                    continue
                blocks.append(text[found.start():end + len(close)])
                at = end + len(close)
            return blocks[int(tag.group(3) or 1) - 1]
        contents = CONTENTS_PLACE.match(where)
        if contents:
            text = "\n".join(parts_of(self.out[index - int(contents.group(1))]))
            blocks = re.findall(r"<attachment(?:\s[^<>]*)?>(.*?)</attachment>", text, re.S)
            inner = blocks[int(contents.group(2) or 1) - 1]
            inner = inner[1:] if inner.startswith("\n") else inner
            return inner[:-1] if inner.endswith("\n") else inner
        copy = COPY_PLACE.match(where)
        if copy:
            distance = int(copy.group(1))
            other = index - distance if copy.group(2) == "above" else index + distance
            text = "\n".join(parts_of(self.out[other]))
            return fences(text)[int(copy.group(3)) - 1][4]
        place = DISTANCE.match(where)
        if not place or place.group(3) != "above":
            raise ValueError("cannot read WHERE %r" % where)
        head, other = place.group(1), index - int(place.group(2))
        texts = parts_of(self.out[other])
        text = texts[int(place.group(4) or 1) - 1]
        if place.group(5):
            value = json.loads(text)
            for step in re.findall(r"\[(\d+)\]|\.([A-Za-z_][A-Za-z0-9_]*)", place.group(5)):
                value = value[int(step[0])] if step[0] else value[step[1]]
            text = value
        fenced = FENCED_PLACE.match(head)
        if fenced:
            wanted = fenced.group(1) or ""
            for _s, _e, opening, _c, body in fences(text):
                if info_of(opening) == wanted:
                    return body[:-1] if body.endswith("\n") else body
            raise ValueError("no fenced block %r" % wanted)
        if head.startswith("the paragraph"):
            raise ValueError("paragraph notes are not decoded here")
        return text

    def change(self, index, text):
        """A text that is one change note (a tool output's, a Cline result's, a fenced body's), decoded."""
        change = CHANGE.match(text)
        if not change or change.group(1).startswith("the <"):
            return None
        rest = text[change.end():]
        count = int(change.group(2))
        diff = rest[1:].split("\n") if count else []
        if (rest[:1] != "\n" if count else rest) or len(diff) != count:
            raise ValueError("the note promises %d diff lines" % count)
        source = self.text_at(index, change.group(1)).split("\n")
        lines = patch(numbered(source) if change.group(3) else source, diff)
        if change.group(3):
            k, l, m = int(change.group(3)), int(change.group(4)), int(change.group(5))
            width, separator = int(change.group(7) or 0), json.loads(change.group(8))
            lines[k - 1:l] = [str(m + i).rjust(width) + separator + line for i, line in enumerate(lines[k - 1:l])]
        return "\n".join(lines)

    def in_json(self, index, text):
        """A tool result in compact JSON with a change note as one of its strings (depth 1 or 2)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if json.dumps(value, ensure_ascii=False, separators=(",", ":")) != text:
            return None
        holders = [value] if isinstance(value, dict) else [v for v in value if isinstance(v, dict)] \
            if isinstance(value, list) else []
        for holder in holders:
            for key, item in holder.items():
                if isinstance(item, str) and item.startswith("[Changed copy of "):
                    holder[key] = self.change(index, item)
                    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return None

    def repeat(self, index, text):
        """A text that is one repeat of a tool output or a Cline result, decoded."""
        repeat = REPEAT.fullmatch(text)
        if repeat and not repeat.group(1).startswith(("the <", "the copy of this block")):
            return self.text_at(index, repeat.group(1))
        return None

    def fenced(self, index, text, decode_body):
        pieces, at = [], 0
        for start, end, opening, closing, body in fences(text):
            replaced = decode_body(body[:-1] if body.endswith("\n") else body)
            if replaced is not None:
                pieces.append(text[at:start] + opening + "\n" + replaced + "\n" + closing)
                at = end
        return "".join(pieces) + text[at:]

    def markdown_copy(self, index, body):
        copy = REPEAT.fullmatch(body)
        if copy and COPY_PLACE.match(copy.group(1)):
            text = self.text_at(index, copy.group(1))
            return text[:-1] if text.endswith("\n") else text
        return None

    def boilerplate(self, index, text):
        """The boilerplate notes inside a text, decoded."""
        out, at = [], 0
        while True:
            candidates = [next((m for m in pattern.finditer(text, at) if m.group(1).startswith("the <")), None)
                          for pattern in (REPEAT, CHANGE)]
            candidates = [m for m in candidates if m]
            if not candidates:
                return "".join(out) + text[at:]
            note = min(candidates, key=lambda m: m.start())
            out.append(text[at:note.start()])
            block = self.text_at(index, note.group(1))
            if note.re is REPEAT:
                out.append(block)
                at = note.end()
            else:
                count = int(note.group(2))
                diff = text[note.end() + 1:].split("\n")[:count] if count else []
                out.append("\n".join(patch(block.split("\n"), diff)))
                at = note.end() + (1 + len("\n".join(diff)) if count else 0)

    def layer(self, decode_text):
        for index in range(len(self.out)):
            texts = parts_of(self.out[index])
            if texts:
                self.out[index] = with_parts(self.out[index], [decode_text(index, text) for text in texts])

    def decode(self):
        """The layers in the reverse of the order the proxy wrote them (design.md): a later layer's
        note can sit inside an earlier layer's text (a diff's + line carrying a boilerplate note), and
        each layer reads its sources as the layers before it left them."""
        self.layer(lambda i, text: self.fenced(i, text, lambda body: self.markdown_copy(i, body)))
        self.layer(lambda i, text: self.change(i, text) if self.change(i, text) is not None
                   else self.in_json(i, text) if text[:1] in "[{" and self.in_json(i, text) is not None
                   else self.fenced(i, text, lambda body: self.change(i, body)))
        self.layer(lambda i, text: self.repeat(i, text) if self.repeat(i, text) is not None else text)
        self.layer(self.boilerplate)
        return self.out


def decode(messages):
    return Decoder(messages).decode()
