#!/usr/bin/env python3
"""tutorial_commands.py — every command the tutorials tell a reader to run, run.

    /usr/bin/python3 tests/tutorial_commands.py --root SOURCE_DIR [--timeout 300] [--only 05] [--list]

A tutorial marks a block as one to run with the info string `sh runnable`:

    ```sh runnable
    build/examples/00_single_device --data-path data/fortunes_text_document ...
    ```

Each such block of tutorials/*.md (files in name order, blocks in file order) runs as one
`bash` script with `set -e`, from the repository root, under a time limit; later blocks may
use what earlier ones wrote (runs/...). Like the reader, the blocks expect `build/` (where
`make test` builds) and `data/` (the corpus `make data` prepares). Also checked: every image
`![...](../notebooks/NAME.png)` a tutorial shows exists (only a warning while notebooks/ has
no PNG at all). Prints each block, its status and time; exits 1 if any check failed.
"""

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import time

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(.*)$")
NOTEBOOK_IMAGE = re.compile(r"!\[[^\]]*\]\((\.\./notebooks/[^)\s]+\.png)\)")
TAIL_LINES = 60  # of a failed block's output


def runnable_blocks(path):
    """[(line number, script)] of the ```sh runnable blocks in a Markdown file."""
    blocks, lines = [], open(path, encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        words = info.split()
        if words[:1] == ["sh"] and "runnable" in words[1:]:
            blocks.append((i + 1, "\n".join(body)))
        i = j + 1
    return blocks


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the repository root (the blocks run there)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per block")
    parser.add_argument("--only", default="", help="only tutorials whose file name contains this")
    parser.add_argument("--list", action="store_true", help="print the blocks, run nothing")
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    tutorials = sorted(glob.glob(os.path.join(root, "tutorials", "*.md")))
    if not tutorials:
        print(f"FAIL  no tutorials in {root}/tutorials")
        return 1
    failures = []

    problems, warnings = check_notebook_images(root, tutorials)
    for w in warnings:
        print(f"warn  {w}")
    for p in problems:
        print(f"FAIL  {p}")
    failures += problems

    for path in tutorials:
        name = os.path.relpath(path, root)
        if args.only not in os.path.basename(path):
            continue
        for line, script in runnable_blocks(path):
            print(f"\n== {name}:{line}")
            print("\n".join("$ " + command for command in script.splitlines()), flush=True)
            if args.list:
                continue
            code, out, seconds = run_block(script, root, args.timeout)
            if code == 0:
                print(f"ok    {seconds:.1f} s", flush=True)
                continue
            status = f"timed out after {args.timeout:.0f} s" if code is None else f"exit code {code}"
            print("\n".join(out.rstrip().splitlines()[-TAIL_LINES:]))
            print(f"FAIL  {name}:{line}: {status} ({seconds:.1f} s)", flush=True)
            failures.append(f"{name}:{line}: {status}")

    print()
    for f in failures:
        print(f"FAIL  {f}")
    print(f"{len(failures)} failure(s)" if failures else "all tutorial commands passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
