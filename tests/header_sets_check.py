#!/usr/bin/env python3
"""header_sets_check.py — copying headers works as the README says.

    /usr/bin/python3 tests/header_sets_check.py --root SOURCE_DIR [--jobs 2] [--static-only]
    /usr/bin/python3 tests/header_sets_check.py --root SOURCE_DIR --print          # the table
    /usr/bin/python3 tests/header_sets_check.py --root SOURCE_DIR --update-readme  # rewrite it

The README's section "Using lightron from another project" holds a table, between the
markers <!-- header-sets:begin --> and <!-- header-sets:end -->, with one row per header of
include/lightron/: the lightron headers it pulls in (the transitive closure of its
`#include "..."` lines) and the external packages those files include (LibTorch, fmt,
nlohmann_json, CLI11, Gloo's headers). The table is computed from the sources (--print,
--update-readme), never written by hand. The check:
  1. statically, each row equals what the sources say now, and every header has a row;
  2. for each row, copies exactly the header and its listed set into an empty temporary
     folder as <tmp>/lightron/<file> and compiles `#include <lightron/HEADER>` with plain
     `g++ -std=c++17 -fsyntax-only` and only LibTorch's system include paths (no CMake, no
     -D flags). Parsing <torch/torch.h> is most of each compile (~15 s), so rows are checked
     in chains: H1, H2, ..., Hk where each header includes (transitively) all earlier ones,
     compiled as one program that includes them in that order, in a folder holding Hk's row.
     When Hi is reached, all that was read before it is part of its own row, so it is checked
     exactly as if alone; and a header can only reach another file of the folder through an
     `#include "..."` of its row (lightron headers never include <lightron/...>, checked).
     That makes ~10 compiles of the 26 rows; --per-header compiles each row on its own;
  3. for data_parallel.hpp, builds, links (-ltorch -ltorch_cpu -lc10 -lfmt) and runs a
     program that asserts at compile time that the plain build got the Gloo path
     (lightron::kHaveGloo) and all-reduces over a one-rank Gloo group at run time.
Prints what it checked and how long it took; exits 1 on the first kind of failure.
"""

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BEGIN, END = "<!-- header-sets:begin -->", "<!-- header-sets:end -->"
QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
ANGLE_INCLUDE = re.compile(r"^\s*#\s*include\s*<([^>]+)>", re.M)
ROW = re.compile(r"^\|\s*`([^`]+\.hpp)`\s*\|(.*)\|(.*)\|\s*$")

# External packages by the path of the header included, first match wins, in table order.
# A header without a folder (unistd.h, malloc.h, <vector>) or under sys/ is the system's.
GLOO = "Gloo headers (several CPU ranks)"
NCCL = "NCCL for CUDA ranks (optional)"  # no commas: the column is comma-separated
EXTERNAL = [
    ("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp", [GLOO, "LibTorch"]),
    ("torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp", [NCCL, "LibTorch"]),
    ("gloo/", [GLOO]),
    ("torch/", ["LibTorch"]),
    ("ATen/", ["LibTorch"]),
    ("c10/", ["LibTorch"]),
    ("fmt/", ["fmt"]),
    ("nlohmann/", ["nlohmann_json"]),
    ("CLI/", ["CLI11"]),
]
PACKAGE_ORDER = ["LibTorch", "fmt", "nlohmann_json", "CLI11", GLOO, NCCL]

# Debian's libtorch-dev: torch/torch.h lives under csrc/api/include; everything else
# (torch/csrc/..., ATen, c10, gloo, fmt, nlohmann, CLI) is under /usr/include, always searched.
DEBIAN_TORCH_INCLUDES = ["/usr/include/torch/csrc/api/include"]
LINK_LIBS = ["-ltorch", "-ltorch_cpu", "-lc10", "-lfmt"]
LINKED_HEADER = "data_parallel.hpp"  # built, linked and run, not only parsed

GLOO_PROGRAM = r"""#include <lightron/data_parallel.hpp>

static_assert(lightron::kHaveGloo, "a plain g++ build of lightron did not get c10d's Gloo path");

int main() {
  // A world of one rank is enough to prove that the Gloo backend is compiled in and links.
  auto store = c10::make_intrusive<c10d::HashStore>();
  auto pg = lightron::make_backend(store, "header_sets", /*rank=*/0, /*size=*/1, lightron::GroupOptions{});
  std::vector<torch::Tensor> tensors{torch::arange(4, torch::kFloat)};
  pg->allreduce(tensors)->wait();
  if (!torch::equal(tensors[0], torch::arange(4, torch::kFloat))) return 1;
  fmt::print("one-rank Gloo all-reduce ok: {}\n", tensors[0].sum().item<float>());
  return 0;
}
"""


def headers(include_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(include_dir, "*.hpp")))


def read(include_dir, name):
    with open(os.path.join(include_dir, name), encoding="utf-8") as f:
        return f.read()


def closure(include_dir, name):
    """{header: the header that first pulled it in} for everything `name` includes, transitively."""
    parent, todo = {}, [name]
    while todo:
        current = todo.pop()
        for inc in QUOTED_INCLUDE.findall(read(include_dir, current)):
            if not os.path.isfile(os.path.join(include_dir, inc)):
                raise SystemExit(f"{current} includes \"{inc}\", which is not in {include_dir}")
            if inc != name and inc not in parent:
                parent[inc] = current
                todo.append(inc)
    return parent


def externals(include_dir, files):
    packages, unknown = set(), []
    for f in files:
        for inc in ANGLE_INCLUDE.findall(read(include_dir, f)):
            match = next((pkgs for prefix, pkgs in EXTERNAL if inc.startswith(prefix)), None)
            if match is not None:
                packages.update(match)
            elif "/" in inc and not inc.startswith("sys/"):
                unknown.append(f"{f}: <{inc}>")
    if unknown:
        raise SystemExit("unknown external include(s), add them to EXTERNAL in header_sets_check.py: " + ", ".join(unknown))
    return [p for p in PACKAGE_ORDER if p in packages]


def computed_table(include_dir):
    """{header: (sorted lightron headers it needs, external packages, {needed: who pulled it in})}"""
    table = {}
    for h in headers(include_dir):
        parent = closure(include_dir, h)
        table[h] = (sorted(parent), externals(include_dir, [h] + sorted(parent)), parent)
    return table


def markdown(table):
    lines = [BEGIN,
             "| Header | Also copy (the lightron headers it pulls in) | External packages |",
             "|---|---|---|"]
    for h, (needs, packages, _) in table.items():
        cell = " ".join(f"`{n}`" for n in needs) if needs else "—"
        lines.append(f"| `{h}` | {cell} | {', '.join(packages)} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def readme_block(readme_text):
    b, e = readme_text.find(BEGIN), readme_text.find(END)
    if b < 0 or e < b:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block: paste the output of --print into "
                         "the section 'Using lightron from another project'")
    return b, e + len(END)


def readme_rows(readme_text):
    b, e = readme_block(readme_text)
    rows = {}
    for line in readme_text[b:e].splitlines():
        m = ROW.match(line.strip())
        if m:
            needs = re.findall(r"`([^`]+)`", m.group(2))
            packages = [p.strip() for p in m.group(3).split(",") if p.strip()]
            rows[m.group(1)] = (needs, packages)
    return rows


def chain(parent, name, root):
    path = [name]
    while path[-1] in parent:
        path.append(parent[path[-1]])
    return " <- ".join(path + ([root] if path[-1] != root else []))


def static_check(include_dir, table, rows):
    errors, read_cache = [], {h: read(include_dir, h) for h in table}
    for h, (needs, packages, parent) in table.items():
        if h not in rows:
            errors.append(f"{h}: no row in the README table")
            continue
        listed, listed_packages = rows[h]
        for n in sorted(set(needs) - set(listed)):
            errors.append(f"{h}: the README leaves out {n} (pulled in by {chain(parent, parent[n], h)})")
        for n in sorted(set(listed) - set(needs)):
            errors.append(f"{h}: the README lists {n}, which {h} does not include (directly or not)")
        if listed_packages != packages:
            errors.append(f"{h}: the README's external packages are {listed_packages}, the sources' {packages}")
    for h in table:
        for inc in ANGLE_INCLUDE.findall(read_cache[h]):
            if inc.startswith("lightron/"):
                errors.append(f"{h}: includes <{inc}>; lightron headers include each other as \"name.hpp\"")
    for h in sorted(set(rows) - set(table)):
        errors.append(f"{h}: the README has a row but include/lightron/ has no such header")
    return errors


def chains(rows):
    """Covers the rows with chains [H1, ..., Hk], each Hi in the row of every later one."""
    rank = sorted(rows, key=lambda h: (-len(rows[h][0]), h))
    covered, result = set(), []
    for top in rank:
        if top in covered:
            continue
        chain = [top]
        while True:
            below = [h for h in rank if h in rows[chain[-1]][0] and h not in covered and h not in chain]
            if not below:
                break
            chain.append(below[0])  # the one with the largest row: longest chains
        covered.update(chain)
        result.append(chain[::-1])
    return result


def compile_row(cxx, include_dir, chain, needs, include_flags, link_and_run):
    """Copies the chain's last header + its row alone into a fresh folder and compiles a program
    including the chain in order (parse only, or built, linked and run). -> (ok, seconds, log)"""
    header = chain[-1]
    start = time.time()
    work = tempfile.mkdtemp(prefix="lightron_header_sets_")
    try:
        os.mkdir(os.path.join(work, "lightron"))
        for f in [header] + needs:
            shutil.copy(os.path.join(include_dir, f), os.path.join(work, "lightron", f))
        source = os.path.join(work, "main.cpp")
        with open(source, "w", encoding="utf-8") as f:
            f.write(GLOO_PROGRAM if link_and_run else "".join(f"#include <lightron/{h}>\n" for h in chain) + "int main() {}\n")
        cmd = [cxx, "-std=c++17", f"-I{work}"] + include_flags + [source]
        if link_and_run:
            cmd += ["-o", os.path.join(work, "main")] + LINK_LIBS
        else:
            cmd += ["-fsyntax-only"]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = f"$ {' '.join(cmd)}\n{r.stdout}"
        if r.returncode == 0 and link_and_run:
            env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
            run = subprocess.run([os.path.join(work, "main")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, timeout=120, env=env)
            log += f"$ ./main\n{run.stdout}"
            return run.returncode == 0, time.time() - start, log
        return r.returncode == 0, time.time() - start, log
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="lightron's source directory")
    ap.add_argument("--print", action="store_true", help="print the README table computed from the sources")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's table from the sources")
    ap.add_argument("--static-only", action="store_true", help="compare the table with the sources, compile nothing")
    ap.add_argument("--jobs", type=int, default=2, help="compilers at a time (default 2)")
    ap.add_argument("--per-header", action="store_true", help="one compile per row instead of chains (slower)")
    ap.add_argument("--cxx", default=os.environ.get("CXX_PLAIN", "g++"), help="the plain compiler (default g++)")
    ap.add_argument("--torch-include", action="append", default=None,
                    help="LibTorch include folder beyond /usr/include (repeatable; default: Debian's "
                         + " ".join(DEBIAN_TORCH_INCLUDES) + ")")
    args = ap.parse_args()

    include_dir = os.path.join(args.root, "include", "lightron")
    readme = os.path.join(args.root, "README.md")
    table = computed_table(include_dir)
    if args.print:
        sys.stdout.write(markdown(table))
        return 0
    if args.update_readme:
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        b, e = readme_block(text)
        text = text[:b] + markdown(table).rstrip("\n") + text[e:]
        with open(readme, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"rewrote the table in {readme} ({len(table)} headers)")
        return 0

    start = time.time()
    with open(readme, encoding="utf-8") as f:
        rows = readme_rows(f.read())
    errors = static_check(include_dir, table, rows)
    if errors:
        print("header_sets: README.md's table does not match include/lightron/:")
        for e in errors:
            print("  " + e)
        print(f"regenerate it: /usr/bin/python3 tests/header_sets_check.py --root {args.root} --update-readme")
        return 1
    print(f"static: the README's {len(rows)} rows match the #include lines of include/lightron/")
    if args.static_only:
        return 0

    torch_includes = args.torch_include or DEBIAN_TORCH_INCLUDES
    missing = [d for d in torch_includes if not os.path.isfile(os.path.join(d, "torch", "torch.h"))]
    if missing:
        print(f"header_sets: no torch/torch.h under {missing}: install libtorch-dev, or pass --torch-include")
        return 1
    include_flags = [f"-I{d}" for d in torch_includes]
    # The linked program first (the longest), then the chains, longest first.
    # (the linked program already checks its header alone)
    rest = {h: r for h, r in rows.items() if h != LINKED_HEADER}
    groups = [[h] for h in sorted(rest, key=lambda h: (-len(rest[h][0]), h))] if args.per_header else chains(rest)
    jobs = ([([LINKED_HEADER], True)] if LINKED_HEADER in rows else []) + [(c, False) for c in groups]
    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(compile_row, args.cxx, include_dir, c, rows[c[-1]][0], include_flags, link): (c, link)
                   for c, link in jobs}
        for fut in concurrent.futures.as_completed(futures):
            c, link = futures[fut]
            ok, seconds, log = fut.result()
            what = (f"{c[-1]} + its {len(rows[c[-1]][0])} headers: built, linked and ran (Gloo, 1 rank)" if link else
                    f"{', '.join(c)} (folder: {c[-1]} + its {len(rows[c[-1]][0])} headers): compiled")
            print(f"{'ok  ' if ok else 'FAIL'} {what} in {seconds:.1f} s", flush=True)
            if link or not ok:
                tail = log.strip().splitlines()
                print("    " + "\n    ".join(tail[:1] + tail[1:][-40:]), flush=True)
            if not ok:
                # The first error names the header that lacks something (or the program).
                first = next((line for line in log.splitlines() if "error" in line), "")
                failed.append(next((h for h in c if f"lightron/{h}:" in first), c[-1]) if not link else c[-1])
    print(f"header_sets: {len(jobs)} compiles for {len(rows)} rows, {len(failed)} failed; "
          f"{time.time() - start:.0f} s in all")
    if failed:
        print("failed: " + ", ".join(sorted(set(failed))) + ": copied with its row alone, it does not compile "
              "(it uses something that its #include lines do not bring)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
