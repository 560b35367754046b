#!/usr/bin/python3
"""gemm_peak.py — the fp32 matrix-multiply rate this machine reaches on N threads: the "peak"
that bench/throughput.sh divides by to get MFU (model FLOPs utilisation).

    /usr/bin/python3 bench/gemm_peak.py --threads 2 --size 2048 --repeats 10

Times C = A B for square n×n fp32 matrices (2n³ FLOPs each) through LibTorch, i.e. the BLAS
that libblas.so.3 points at, and prints one JSON line with the best and the median rate and
the kernel OpenBLAS chose ("blas_core"; "" when the BLAS is not OpenBLAS).
"""
import argparse
import ctypes
import json
import statistics
import time

import torch


def blas_core():
    """The kernel the loaded OpenBLAS chose (libblas.so.3 is the one LibTorch uses)."""
    try:
        name = ctypes.CDLL("libblas.so.3").openblas_get_corename
    except (OSError, AttributeError):
        return ""
    name.restype = ctypes.c_char_p
    return name().decode()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=2048, help="n of the n×n×n product")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    n = args.size
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up: BLAS thread pool, page faults
    if not torch.allclose(c[:4], a[:4].double().mm(b.double()).float(), rtol=1e-4, atol=1e-3):
        raise SystemExit("gemm_peak: the BLAS result is wrong; check OPENBLAS_CORETYPE and libblas.so.3")
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        rates.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    print(json.dumps({"impl": "gemm", "threads": args.threads, "n": n, "repeats": args.repeats,
                      "gflops": round(max(rates), 1), "gflops_median": round(statistics.median(rates), 1),
                      "blas_core": blas_core()}))


if __name__ == "__main__":
    main()
