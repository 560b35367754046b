#!/usr/bin/python3
"""Executes the course notebooks headlessly and checks the figures they promise.

    /usr/bin/python3 tests/run_notebooks.py --root SOURCE_DIR [01_layout_parity ...]

Each notebook (all of notebooks/*.ipynb by default) runs top to bottom in a python3 kernel with
notebooks/ as its working directory; a cell that raises (a failed assertion included) fails it.
Afterwards every PNG listed in the notebook's metadata (lightron.figures) must exist, be a PNG
and have been written by this run. The .ipynb files are only read: outputs are never written
back (--executed-dir keeps executed copies elsewhere, for reading). Registered in
tests/tests.cmake as the `notebooks` test (RUN_SERIAL: the notebooks start up to 8 ranks).
"""
import argparse
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # before the kernel starts: it inherits this

import nbformat  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError  # noqa: E402

kCellTimeout = 600  # seconds per cell
kPngSignature = b"\x89PNG\r\n\x1a\n"


def kernel_name():
    """python3 (Debian's python3-ipykernel spec, /usr/bin/python3), or whatever this Python provides."""
    try:
        KernelSpecManager().get_kernel_spec("python3")
        return "python3"
    except NoSuchKernel:
        sys.exit("error: no python3 Jupyter kernel; install python3-ipykernel (`apt-get install python3-ipykernel`)")


def run_notebook(path, kernel):
    """Executes one notebook; returns a list of problems (empty when it passed)."""
    nb = nbformat.read(path, as_version=4)
    figures = nb.metadata.get("lightron", {}).get("figures", [])
    started = time.time()
    client = NotebookClient(nb, kernel_name=kernel, timeout=kCellTimeout, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    problems = []
    try:
        client.execute()
    except CellExecutionError as e:  # the traceback of the failed cell, assertion message included
        problems.append("a cell failed:\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(e)))  # no terminal colours
    except (CellTimeoutError, DeadKernelError) as e:
        problems.append(f"{type(e).__name__}: {e}")
    for figure in figures:
        png = path.parent / figure
        if not png.exists():
            problems.append(f"{figure} was not written")
        elif png.stat().st_mtime < started - 1:
            problems.append(f"{figure} is left over from an earlier run (not rewritten by this one)")
        elif png.read_bytes()[:8] != kPngSignature:
            problems.append(f"{figure} is not a PNG file")
    return nb, time.time() - started, problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=pathlib.Path, help="lightron's source directory")
    parser.add_argument("names", nargs="*", help="notebooks to run (e.g. 01_layout_parity); default: all")
    parser.add_argument("--executed-dir", type=pathlib.Path, help="also save the executed notebooks here")
    args = parser.parse_args()

    notebooks_dir = args.root.resolve() / "notebooks"
    if args.names:
        paths = [notebooks_dir / (n if n.endswith(".ipynb") else n + ".ipynb") for n in args.names]
    else:
        paths = sorted(notebooks_dir.glob("[0-9]*.ipynb"))
    missing = [str(p) for p in paths if not p.exists()]
    if missing or not paths:
        sys.exit(f"error: no such notebook(s): {', '.join(missing) or notebooks_dir / '*.ipynb'}")

    kernel = kernel_name()
    failed = []
    for path in paths:
        print(f"=== {path.name}", flush=True)
        nb, seconds, problems = run_notebook(path, kernel)
        if args.executed_dir:
            args.executed_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.executed_dir / path.name)
        for p in problems:
            print(p, flush=True)
        print(f"{'FAILED' if problems else 'passed'}: {path.name} in {seconds:.1f} s", flush=True)
        if problems:
            failed.append(path.name)
    print(f"\n{len(paths) - len(failed)} of {len(paths)} notebooks passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
