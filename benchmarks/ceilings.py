"""The two ceilings of this machine for the roofline in benchmarks/README.md: fp32 GEMM rate and copy bandwidth.

    python benchmarks/ceilings.py

GEMM: a 4096^3 fp32 matrix product, 2 * 4096^3 / time. Copy: a 1 GiB fp32 copy into memory already touched
(so page faults are not counted), bytes read plus bytes written over time. Median of 5 after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    out = torch.empty(4096, 4096)
    gemm = 2 * 4096**3 / median_seconds(lambda: torch.mm(a, b, out=out)) / 1e9
    src, dst = torch.randn(2**28), torch.empty(2**28)
    copy = 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src)) / 1e9
    print(f"threads {torch.get_num_threads()}: fp32 GEMM {gemm:.0f} GFLOP/s, copy {copy:.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()
