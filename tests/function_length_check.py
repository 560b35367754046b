#!/usr/bin/env python3
"""function_length_check.py — the headers that carry the course's ideas stay readable: no
function in them is longer than a screen, and the README's table of them is current.

    /usr/bin/python3 tests/function_length_check.py --root SOURCE_DIR [--update-readme] [--print]
                                                     [--max-lines 60]

Without flags it fails (exit 1) when
  1. a function in an idea header (IDEA_HEADERS) is longer than --max-lines (60) lines,
     counted from the first line of its signature to its closing brace; each offender is
     printed as file:line: name: N lines; or
  2. the README's table between <!-- idea-headers:begin --> and <!-- idea-headers:end -->
     (header, chapter, line count) differs from the sources.
--update-readme rewrites that table; --print prints it.

Functions are found by a heuristic, not a C++ parser: comments, string and character literals
and preprocessor lines are blanked, then braces are matched. A `{` at namespace or class scope
whose preceding text (since the last `;`, `{` or `}`) holds a `(` opens a function body (free
functions, member functions, constructors, operators, a lambda assigned at namespace scope);
`namespace ... {` and `struct/class/union ... {` open scopes that are searched in turn;
anything else (an enum, a braced initializer) is skipped.
"""

import argparse
import os
import re
import sys

BEGIN, END = "<!-- idea-headers:begin -->", "<!-- idea-headers:end -->"
# (header, chapter that introduces it): the headers the tutorials ask a reader to read.
IDEA_HEADERS = [
    ("gpt.hpp", 0), ("train.hpp", 0),
    ("process_groups.hpp", 1), ("collectives.hpp", 1), ("data_parallel.hpp", 1),
    ("sharding.hpp", 2), ("tensor_parallel.hpp", 2), ("vocab_parallel.hpp", 2), ("tp_model.hpp", 2),
    ("pipeline_parallel.hpp", 3), ("pipeline_schedule.hpp", 3), ("pipeline_engine.hpp", 3), ("memory.hpp", 3),
    ("recompute.hpp", 3), ("activation_meter.hpp", 3),
    ("trainer.hpp", 4),
    ("checkpoint.hpp", 5),
    ("parity.hpp", 6),
    ("zero.hpp", 7), ("zero3.hpp", 7),
    ("ring_attention.hpp", 8), ("context_parallel.hpp", 8),
]
DEFAULT_MAX_LINES = 60
ROW = re.compile(r"^\|\s*`([^`]+\.hpp)`\s*\|\s*(\d+)\s*\|\s*([\d,]+)\s*\|")


def blank_non_code(text):
    """The text with comments, string/char literals and preprocessor lines replaced by spaces
    (newlines kept, so that offsets still give line numbers)."""
    out, i, n = [], 0, len(text)
    at_line_start = True
    while i < n:
        c = text[i]
        if at_line_start and c == "#":  # preprocessor line (with continuations)
            j = i
            while j < n and (text[j] != "\n" or text[j - 1] == "\\"):
                j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
            continue
        if c == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
            continue
        if c == "/" and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
            continue
        m = re.match(r'R"([^(\s]*)\(', text[i:i + 20]) if c == "R" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")) else None
        if m:  # raw string literal
            close = ")" + m.group(1) + '"'
            j = text.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
            continue
        if c in "\"'":
            if c == "'" and i > 0 and text[i - 1].isalnum():  # digit separator 1'000
                out.append(" ")
                i += 1
                continue
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(" " * (j - i))
            i = j
            continue
        out.append(c)
        at_line_start = c == "\n" or (at_line_start and c in " \t")
        i += 1
    return "".join(out)


def functions(text):
    """[(line of the signature's start, name, length in lines)] of the functions at namespace
    or class scope."""
    code = blank_non_code(text)
    line_of = lambda pos: code.count("\n", 0, pos) + 1
    found, stack = [], []  # stack of (kind, start position of the signature, name)
    last_stop = 0  # position after the last ; { or }
    for i, c in enumerate(code):
        if c == ";":
            last_stop = i + 1
        elif c == "{":
            head = code[last_stop:i]
            kind = "other"
            scope = stack[-1][0] if stack else "namespace"
            if scope in ("namespace", "class"):
                if re.search(r"\bnamespace\b", head) or re.search(r'\bextern\s*$', head.strip() + " "):
                    kind = "namespace"
                elif re.search(r"\benum\b", head):
                    kind = "other"
                elif re.search(r"\b(struct|class|union)\b", head) and "(" not in re.sub(r"<[^<>]*>", "", head):
                    kind = "class"
                elif "(" in head:
                    kind = "function"
                    # `Foo(int a) : x_(a), y_{b} {`: the braces of `y_{b}` belong to the
                    # member initializer list, not to the body that follows
                    if re.search(r"\)\s*(noexcept\s*)?:[^:]", head) and re.search(r"[\w>]\s*$", head):
                        kind = "init"
            start = last_stop + (len(head) - len(head.lstrip()))
            name = ""
            if kind == "function":
                before = head[:head.find("(")].rstrip()
                m = re.search(r"(operator\s*\S+|~?[A-Za-z_]\w*)\s*$", before)
                name = m.group(1) if m else "?"
            stack.append((kind, start, name, last_stop))
            if kind != "init":
                last_stop = i + 1
        elif c == "}":
            last_stop = i + 1
            if stack:
                kind, start, name, saved = stack.pop()
                if kind == "function":
                    first = line_of(start)
                    found.append((first, name, line_of(i) - first + 1))
                elif kind == "init":
                    last_stop = saved  # the constructor's head goes on to its body
    return found


def header_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().count("\n")


def markdown(include_dir):
    lines = [BEGIN, "| Header | Chapter | Lines |", "|---|---|---|"]
    for h, chapter in IDEA_HEADERS:
        lines.append(f"| `{h}` | {chapter} | {header_lines(os.path.join(include_dir, h)):,} |")
    total = sum(header_lines(os.path.join(include_dir, h)) for h, _ in IDEA_HEADERS)
    lines.append(f"| all {len(IDEA_HEADERS)} | | {total:,} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def readme_block(text):
    b, e = text.find(BEGIN), text.find(END)
    if b < 0 or e < b:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block: add one to the section "
                         "'The headers that carry the ideas', then run --update-readme")
    return b, e + len(END)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="lightron's source directory")
    ap.add_argument("--max-lines", type=int, default=DEFAULT_MAX_LINES, help="longest function allowed")
    ap.add_argument("--print", action="store_true", help="print the README table computed from the sources")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's table from the sources")
    args = ap.parse_args()
    include_dir = os.path.join(args.root, "include", "lightron")
    readme = os.path.join(args.root, "README.md")
    table = markdown(include_dir)
    if args.print:
        sys.stdout.write(table)
        return 0
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    b, e = readme_block(text)
    if args.update_readme:
        with open(readme, "w", encoding="utf-8") as f:
            f.write(text[:b] + table.rstrip("\n") + text[e:])
        print(f"rewrote the idea-header table in {readme} ({len(IDEA_HEADERS)} headers)")
        return 0

    failed = False
    if text[b:e].strip() != table.strip():
        failed = True
        print("function_length: README.md's idea-header table does not match the sources:")
        shown = {m.group(1): (m.group(2), m.group(3)) for m in map(ROW.match, text[b:e].splitlines()) if m}
        for line in table.splitlines():
            m = ROW.match(line)
            if m and shown.get(m.group(1)) != (m.group(2), m.group(3)):
                was = shown.get(m.group(1))
                print(f"  {m.group(1)}: README {'has no row' if was is None else f'says chapter {was[0]}, {was[1]} lines'}"
                      f"; the sources: chapter {m.group(2)}, {m.group(3)} lines")
        print(f"  regenerate it: /usr/bin/python3 tests/function_length_check.py --root {args.root} --update-readme")
    else:
        print(f"function_length: README.md's idea-header table matches the {len(IDEA_HEADERS)} headers")

    offenders, count = [], 0
    for h, _ in IDEA_HEADERS:
        path = os.path.join(include_dir, h)
        with open(path, encoding="utf-8") as f:
            found = functions(f.read())
        count += len(found)
        offenders += [(f"include/lightron/{h}", line, name, n) for line, name, n in found if n > args.max_lines]
    if offenders:
        failed = True
        print(f"function_length: {len(offenders)} function(s) longer than {args.max_lines} lines "
              "(split them: a function a student reads should fit on a screen):")
        for path, line, name, n in sorted(offenders, key=lambda o: -o[3]):
            print(f"  {path}:{line}: {name}: {n} lines")
    else:
        print(f"function_length: all {count} functions of the idea headers are at most {args.max_lines} lines")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
