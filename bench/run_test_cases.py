"""Runs each test case of lightron_tests in a process of its own, 8 at a time, so that a
crash names its test case and hides nothing else (bench/gpu_check.sh uses it on the GPU
machine). Usage: python3 bench/run_test_cases.py BINARY LOGFILE [doctest filters...]"""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

binary, log, filters = sys.argv[1], sys.argv[2], sys.argv[3:]
listing = subprocess.run([binary, "-ltc", *filters], capture_output=True, text=True).stdout
names = [line for line in listing.split("=" * 79)[1].strip().splitlines() if line.strip()]


def run(name):  # in doctest filters ',' separates patterns and '\,' is a comma
    r = subprocess.run([binary, "-tc=" + name.replace(",", "\\,"), *filters], capture_output=True, text=True)
    return name, r.returncode, r.stdout[-3000:] + r.stderr[-2000:]


with ThreadPoolExecutor(8) as pool:
    results = list(pool.map(run, names))
failed = [(n, rc, out) for n, rc, out in results if rc != 0]
print(f"single-rank tests: {len(names) - len(failed)} of {len(names)} test cases passed, each in its own process")
for n, rc, _ in failed:
    print(f"  failed here (exit {rc}): {n}")
with open(log, "w") as f:
    f.write("\n\n".join(f"== {n}\n{out}" for n, rc, out in failed))
sys.exit(1 if failed else 0)
