#!/usr/bin/env python3
"""tutorial_commands.py — the course cannot drift from the code: every command the tutorials
tell a reader to run is run, every output they show is compared with what it printed, and
every C++ snippet they show is compared with the source region it was taken from.

    /usr/bin/python3 tests/tutorial_commands.py --root SOURCE_DIR [--timeout 300] [--only 05]
                                                [--list] [--no-run] [--update]

Runnable blocks. A block with the info string `sh runnable` is run:

    ```sh runnable
    build/examples/00_single_device --data-path data/fortunes_text_document ...
    ```

Each such block of tutorials/*.md (files in name order, blocks in file order) runs as one
`bash` script with `set -e`, from the repository root, under a time limit; later blocks may
use what earlier ones wrote (runs/...). Like the reader, the blocks expect `build/` (where
`make test` builds) and `data/` (the corpus `make data` prepares).

Printed outputs. A block with the info string `text output` shows what the closest
`sh runnable` block above it (in the same tutorial) prints, stdout and stderr together:

    ```text output
    model: 1063680 parameters (L 4, C 128, H 4, T 64, V 2048) | <*>
    iteration    1/150 | loss 7.6328 | lr 6.00e-05 | grad norm 2.333 | ~136 ms/iter
    ...
    ```

  - Every shown line must be printed, in the order shown; printed lines in between are allowed
    (a line `...` says so to the reader, and is otherwise ignored, as are blank lines).
  - Lines are compared with runs of whitespace collapsed, so the rows of a printed table are
    compared row by row, cell by cell.
  - A number written with a decimal point or an exponent (7.6328, 6.00e-05) may differ from
    the printed one by max(2e-3 relative, 1e-3 absolute): another CPU, BLAS build or thread
    count adds the partial sums of a matrix product in another order, and the last printed
    digits of a loss or a gradient norm move with it (values below 1e-3 are therefore shown,
    not checked). An integer (1063680, 150, 00001) must be printed exactly. A block overrides
    the tolerance in its info string: `text output tol=0.05` (relative), `atol=0.01`.
  - Values that vary from run to run: `~` before a number (`~136 ms/iter`) accepts any number
    there, `<*>` accepts any text (also none).

C++ snippets. A source region is marked by two line comments of their own:

    // [snippet: clip]
    ... the lines a tutorial shows ...
    // [end snippet: clip]            (or just `// [end snippet]`: closes the innermost region)

(regions may nest or overlap by name; marker lines are never part of a region's text).
A tutorial shows a region as a ```cpp block directly preceded by an HTML comment that names
the file (from the repository root) and the region:

    <!-- snippet: include/lightron/train.hpp#clip -->
    ```cpp
    // include/lightron/train.hpp
    ... the region's lines ...
    ```

The block's first line may be a caption, `// ` followed by the same path (and any words);
it is not compared. The rest must equal the region after both are stripped of their common
indentation (and of trailing spaces). A reference to a missing file or region fails; a region
that no tutorial shows is fine. Every other ```cpp block must say why it is not taken from the
sources, with `<!-- illustration: REASON -->` directly before it (code the reader is asked to
add, a sketch of something that is not in the sources), except in the tutorials listed in
UNCONVERTED, where an unmarked block is only a warning.

--update rewrites the tutorials from the sources and the outputs instead of failing: every
snippet block from its region (keeping or adding the caption), and every output block's
numbers from what the command printed (keeping the shown lines, `~` and `<*>`); a shown line
that nothing printed resembles stays as it was and is reported. --no-run checks the snippets
(and with --update rewrites them) without running anything.

Also checked: every image `![...](../notebooks/NAME.png)` a tutorial shows exists (only a
warning while notebooks/ has no PNG at all). Prints each block, its status and time; exits
1 if any check failed, naming tutorial:line.
"""

import argparse
import difflib
import glob
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(.*)$")
NOTEBOOK_IMAGE = re.compile(r"!\[[^\]]*\]\((\.\./notebooks/[^)\s]+\.png)\)")
TAIL_LINES = 60  # of a failed block's output
SNIPPET_REF = re.compile(r"^\s*<!--\s*snippet:\s*([^#\s]+)#([\w.-]+)\s*-->\s*$")
ILLUSTRATION = re.compile(r"^\s*<!--\s*illustration:\s*(.*?)\s*-->\s*$")
REGION_BEGIN = re.compile(r"^\s*//\s*\[snippet:\s*([\w.-]+)\s*\]\s*$")
REGION_END = re.compile(r"^\s*//\s*\[end snippet(?::\s*([\w.-]+))?\s*\]\s*$")
CPP_LANGS = {"cpp", "c++", "cxx", "cc"}
# Tutorials not yet converted to snippets: an unmarked ```cpp block there is a warning only.
UNCONVERTED = ()
DEFAULT_RTOL, DEFAULT_ATOL = 2e-3, 1e-3
NUM = r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
SHOWN_TOKEN = re.compile(r"(?P<any><\*>)|~(?P<vary>" + NUM + r")|(?P<num>" + NUM + r")|(?P<space>\s+)|(?P<char>.)")
SKIP_LINES = {"...", "…"}


# ---------------------------------------------------------------------------- Markdown blocks

class Block:
    """A fenced block: `line` is the 1-based line of its opening fence, body lines are
    lines[start:end] (0-based, the closing fence at `end`)."""

    def __init__(self, line, indent, info, start, end, body, comment):
        self.line, self.indent, self.info = line, indent, info
        self.start, self.end, self.body, self.comment = start, end, body, comment
        self.words = info.split()

    def is_runnable(self):
        return self.words[:1] == ["sh"] and "runnable" in self.words[1:]

    def is_output(self):
        return self.words[:1] == ["text"] and "output" in self.words[1:]

    def is_cpp(self):
        return bool(self.words) and self.words[0].lower() in CPP_LANGS

    def option(self, key, default):
        for w in self.words[1:]:
            if w.startswith(key + "="):
                return float(w.split("=", 1)[1])
        return default


def parse_blocks(lines):
    """The fenced blocks of a Markdown file, each with the HTML comment line just above it."""
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            j += 1
        body = [l[len(indent):] if l.startswith(indent) else l.lstrip() for l in lines[i + 1:j]]
        comment = lines[i - 1] if i > 0 else ""
        blocks.append(Block(i + 1, indent, info, i + 1, j, body, comment))
        i = j + 1
    return blocks


def runnable_blocks(path):
    """[(line number, script)] of the ```sh runnable blocks in a Markdown file."""
    lines = open(path, encoding="utf-8").read().splitlines()
    return [(b.line, "\n".join(b.body)) for b in parse_blocks(lines) if b.is_runnable()]


def replace_bodies(lines, replacements):
    """replacements: [(block, new body lines)]; returns the new lines of the file."""
    out = list(lines)
    for block, body in sorted(replacements, key=lambda r: -r[0].start):
        out[block.start:block.end] = [(block.indent + l) if l else l for l in body]
    return out


# ---------------------------------------------------------------------------- snippets

def source_regions(path):
    """{name: (1-based line of the begin marker, [lines])}, or raises ValueError."""
    regions, open_regions = {}, []
    for n, line in enumerate(open(path, encoding="utf-8").read().splitlines(), start=1):
        b, e = REGION_BEGIN.match(line), REGION_END.match(line)
        if b:
            name = b.group(1)
            if name in regions or any(r[0] == name for r in open_regions):
                raise ValueError(f"{path}:{n}: snippet region '{name}' is defined twice")
            open_regions.append([name, n, []])
        elif e:
            if not open_regions:
                raise ValueError(f"{path}:{n}: [end snippet] without a [snippet: ...] above it")
            idx = len(open_regions) - 1
            if e.group(1):
                idx = next((k for k, r in enumerate(open_regions) if r[0] == e.group(1)), None)
                if idx is None:
                    raise ValueError(f"{path}:{n}: [end snippet: {e.group(1)}] closes no open region")
            name, begin, body = open_regions.pop(idx)
            regions[name] = (begin, body)
        else:
            for r in open_regions:
                r[2].append(line)
    if open_regions:
        raise ValueError(f"{path}:{open_regions[0][1]}: snippet region '{open_regions[0][0]}' is never closed")
    return regions


def normalized(lines):
    text = textwrap.dedent("\n".join(l.rstrip() for l in lines))
    out = text.split("\n")
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return out


def check_snippets(root, path, update, warn_unmarked):
    """-> (problems, warnings, new file lines or None)"""
    name = os.path.relpath(path, root)
    lines = open(path, encoding="utf-8").read().splitlines()
    problems, warnings, replacements, cache = [], [], [], {}
    blocks = parse_blocks(lines)
    referenced = {b.start - 2 for b in blocks}
    for n, line in enumerate(lines):
        if (SNIPPET_REF.match(line) or ILLUSTRATION.match(line)) and n not in referenced:
            problems.append(f"{name}:{n + 1}: '{line.strip()}' is not directly followed by a ``` block")
    for b in blocks:
        ref, ill = SNIPPET_REF.match(b.comment), ILLUSTRATION.match(b.comment)
        if ref:
            src, region = ref.groups()
            where = f"{name}:{b.line}: snippet {src}#{region}"
            if not b.is_cpp():
                problems.append(f"{where}: the block after the snippet comment is not ```cpp")
                continue
            full = os.path.join(root, src)
            if not os.path.isfile(full):
                problems.append(f"{where}: {src} does not exist")
                continue
            try:
                regions = cache.setdefault(src, source_regions(full))
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            if region not in regions:
                problems.append(f"{where}: {src} has no region '{region}' (mark it with // [snippet: {region}] "
                                f"... // [end snippet]); it has: {', '.join(sorted(regions)) or 'none'}")
                continue
            body = list(b.body)
            caption = body.pop(0) if body and re.match(r"^\s*//\s*" + re.escape(src) + r"\b", body[0]) else None
            shown, source = normalized(body), normalized(regions[region][1])
            if shown == source:
                continue
            if update:
                replacements.append((b, [caption or f"// {src}"] + source))
                print(f"update {where}: rewritten from {src}:{regions[region][0]}")
                continue
            diff = list(difflib.unified_diff(shown, source, f"{name}:{b.line} (shown)",
                                             f"{src}:{regions[region][0]} ({region})", n=1, lineterm=""))
            problems.append(f"{where}: the block differs from the source region "
                            f"({src}:{regions[region][0]}); --update rewrites it\n      "
                            + "\n      ".join(diff[:16] + (["      ..."] if len(diff) > 16 else [])))
        elif ill:
            if not ill.group(1):
                problems.append(f"{name}:{b.line}: <!-- illustration: --> needs a reason")
        elif b.is_cpp():
            msg = (f"{name}:{b.line}: a ```cpp block that is neither a snippet (<!-- snippet: FILE#REGION -->) "
                   f"nor marked <!-- illustration: REASON -->")
            (warnings if warn_unmarked else problems).append(msg)
    new_lines = replace_bodies(lines, replacements) if replacements else None
    return problems, warnings, new_lines


# ---------------------------------------------------------------------------- printed outputs

def shown_pattern(line):
    """(compiled regex, [(kind, text)] for each captured number: kind 'num' or 'vary')."""
    pattern, numbers = "", []
    for m in SHOWN_TOKEN.finditer(line.strip()):
        if m.group("any"):
            pattern += ".*?"
        elif m.group("vary"):
            pattern += f"({NUM})"
            numbers.append(("vary", m.group("vary")))
        elif m.group("num"):
            pattern += f"({NUM})"
            numbers.append(("num", m.group("num")))
        elif m.group("space"):
            pattern += r"\s+"
        else:
            pattern += re.escape(m.group("char"))
    return re.compile(pattern), numbers


def is_integer(text):
    return re.fullmatch(r"\d+", text) is not None


def number_mismatch(shown, printed, rtol, atol):
    """None if the printed number is close enough to the shown one, else why not."""
    if is_integer(shown):
        return None if is_integer(printed) and int(shown) == int(printed) else f"{shown} vs {printed}: integers must be equal"
    a, b = float(shown), float(printed)
    if abs(a - b) <= max(atol, rtol * abs(a)) * (1 + 1e-9):
        return None
    return f"{shown} vs {printed}: outside max({rtol:g} relative, {atol:g} absolute)"


def match_line(shown, printed, rtol, atol):
    """('match' | 'near' | None, why, printed numbers) for one shown line against one printed line."""
    regex, numbers = shown_pattern(shown)
    m = regex.fullmatch(printed.strip())
    if not m:
        return None, "", []
    got = list(m.groups())
    for (kind, text), value in zip(numbers, got):
        if kind == "num":
            why = number_mismatch(text, value, rtol, atol)
            if why:
                return "near", why, got
    return "match", "", got


def compare_output(block, output):
    """-> (problems [str], updated body lines or None if nothing to update, lines compared, not found)"""
    rtol, atol = block.option("tol", DEFAULT_RTOL), block.option("atol", DEFAULT_ATOL)
    printed = output.splitlines()
    cursor, problem, updated, compared, not_found = 0, None, [], 0, []
    for k, shown in enumerate(block.body):
        if not shown.strip() or shown.strip() in SKIP_LINES:
            updated.append(shown)
            continue
        compared += 1
        found = near = None
        for i in range(cursor, len(printed)):
            kind, why, got = match_line(shown, printed[i], rtol, atol)
            if kind == "match":
                found = (i, got)
                break
            if kind == "near" and near is None:
                near = (i, why, got)
        hit = found or (near and (near[0], near[2]))
        if hit:
            updated.append(rewrite_numbers(shown, hit[1]))
        else:
            updated.append(shown)
            not_found.append(block.line + 1 + k)
        if found:
            cursor = found[0] + 1
            continue
        if problem is None:
            where = f"line {block.line + 1 + k}"
            if near:
                problem = (f"{where}: a shown line differs from the printed one ({near[1]})\n"
                           f"      shown:   {shown.strip()}\n      printed: {printed[near[0]].strip()}")
            else:
                nxt = printed[cursor].strip() if cursor < len(printed) else "(end of output)"
                problem = (f"{where}: a shown line was not printed (after the lines matched so far)\n"
                           f"      shown:   {shown.strip()}\n      printed: {nxt}   (the next printed line)")
        if near:
            cursor = near[0] + 1
    return ([problem] if problem else []), updated, compared, not_found


def rewrite_numbers(shown, got):
    """The shown line with each number replaced by the printed one (keeping `~` and `<*>`)."""
    lead = shown[:len(shown) - len(shown.lstrip())]
    values, out = iter(got), ""
    for m in SHOWN_TOKEN.finditer(shown.strip()):
        if m.group("vary"):
            out += "~" + next(values)
        elif m.group("num"):
            out += next(values)
        else:
            out += m.group(0)
    return lead + out


# ---------------------------------------------------------------------------- running

def run_block(script, root, timeout):
    """(exit code or None on timeout, combined output, seconds). The block runs in its own
    process group, so that a timeout also ends the ranks an mpirun in it started."""
    start = time.time()
    proc = subprocess.Popen(["bash", "-c", "set -e\n" + script], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.time() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, time.time() - start


def check_notebook_images(root, tutorials):
    """Problems (missing PNGs) and warnings (notebooks/ has no PNG yet)."""
    have_pngs = bool(glob.glob(os.path.join(root, "notebooks", "*.png")))
    problems, warnings = [], []
    for path in tutorials:
        for n, line in enumerate(open(path, encoding="utf-8"), start=1):
            for ref in NOTEBOOK_IMAGE.findall(line):
                if os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), ref))):
                    continue
                where = f"{os.path.relpath(path, root)}:{n}: {ref} does not exist"
                (problems if have_pngs else warnings).append(where)
    if warnings:
        warnings.append("(only warnings while notebooks/ has no PNG; run the notebooks to draw them)")
    return problems, warnings


def run_tutorial(root, path, args):
    """Runs the runnable blocks of one tutorial and compares its output blocks.
    -> (failures, output-block replacements for --update)"""
    name = os.path.relpath(path, root)
    lines = open(path, encoding="utf-8").read().splitlines()
    failures, replacements = [], []
    last = None  # (runnable block, exit code, output)
    for b in parse_blocks(lines):
        if b.is_runnable():
            print(f"\n== {name}:{b.line}")
            print("\n".join("$ " + command for command in b.body), flush=True)
            if args.list or args.no_run:
                last = (b, None, None)
                continue
            code, out, seconds = run_block("\n".join(b.body), root, args.timeout)
            last = (b, code, out)
            if code == 0:
                print(f"ok    {seconds:.1f} s", flush=True)
                continue
            status = f"timed out after {args.timeout:.0f} s" if code is None else f"exit code {code}"
            print("\n".join(out.rstrip().splitlines()[-TAIL_LINES:]))
            print(f"FAIL  {name}:{b.line}: {status} ({seconds:.1f} s)", flush=True)
            failures.append(f"{name}:{b.line}: {status}")
        elif b.is_output():
            where = f"{name}:{b.line}: output block"
            if last is None:
                failures.append(f"{where}: no ```sh runnable block above it in {name}")
                print(f"FAIL  {failures[-1]}")
                continue
            if last[1] is None and last[2] is None:
                continue  # --list / --no-run
            if last[1] != 0:
                print(f"skip  {where}: its block ({name}:{last[0].line}) failed")
                continue
            problems, updated, compared, not_found = compare_output(b, last[2])
            if args.update:
                if updated != b.body:
                    replacements.append((b, updated))
                    print(f"update {where}: numbers rewritten from the output of {name}:{last[0].line}")
                for n in not_found:
                    failures.append(f"{name}:{n}: --update: nothing printed by {name}:{last[0].line} "
                                    f"resembles this shown line; edit it by hand")
                    print(f"FAIL  {failures[-1]}")
                continue
            if problems:
                msg = f"{where} (of {name}:{last[0].line}): " + problems[0]
                print(f"FAIL  {msg}", flush=True)
                failures.append(msg)
            else:
                print(f"ok    {where}: {compared} shown line(s) printed by {name}:{last[0].line}", flush=True)
    return failures, (replace_bodies(lines, replacements) if replacements else None)


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the repository root (the blocks run there)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per block")
    parser.add_argument("--only", default="", help="only tutorials whose file name contains this")
    parser.add_argument("--list", action="store_true", help="print the blocks, run nothing")
    parser.add_argument("--no-run", action="store_true", help="check the snippets only, run nothing")
    parser.add_argument("--update", action="store_true",
                        help="rewrite snippet blocks from the sources and output blocks from the printed output")
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    tutorials = sorted(glob.glob(os.path.join(root, "tutorials", "*.md")))
    if not tutorials:
        print(f"FAIL  no tutorials in {root}/tutorials")
        return 1
    selected = [p for p in tutorials if args.only in os.path.basename(p)]
    failures = []

    problems, warnings = check_notebook_images(root, tutorials)
    for path in selected:
        p, w, new_lines = check_snippets(root, path, args.update, os.path.basename(path) in UNCONVERTED)
        problems += p
        warnings += w
        if new_lines is not None:
            write_lines(path, new_lines)
    for w in warnings:
        print(f"warn  {w}")
    for p in problems:
        print(f"FAIL  {p}")
    failures += problems
    if not problems:
        unmarked = sum("neither a snippet" in w for w in warnings)
        print(f"ok    snippets: every ```cpp block of {len(selected)} tutorial(s) matches its source region "
              "or is marked as an illustration" + (f", except {unmarked} unmarked in {', '.join(UNCONVERTED)} "
                                                   "(warnings until they are converted)" if unmarked else ""))

    for path in selected:
        f, new_lines = run_tutorial(root, path, args)
        failures += f
        if new_lines is not None:
            write_lines(path, new_lines)

    print()
    for f in failures:
        print(f"FAIL  {f}")
    print(f"{len(failures)} failure(s)" if failures else "all tutorial checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
