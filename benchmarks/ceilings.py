"""The two ceilings of a device for the RACE roofline (docs/cpu-kernels.md, docs/gpu-results.md): GEMM rate and
copy bandwidth.

    python benchmarks/ceilings.py                    # this CPU, fp32
    python benchmarks/ceilings.py --device cuda --json ceilings.json   # the GPU, bf16 GEMM

GEMM: a 4096^3 matrix product (fp32 on CPU, bf16 on CUDA), 2 * 4096^3 / time. Copy: a 1 GiB copy into memory
already touched (so page faults are not counted), bytes read plus bytes written over time. Median of 5 after a
warm-up, synchronized on CUDA before every clock read. On the CPU also the fresh-write rate: filling a newly
allocated 1 GiB tensor, whose pages the kernel maps and zeroes on first touch. Every output and gradient of a
pass is such memory on the CPU (large blocks go back to the system when freed; CUDA's caching allocator keeps
them), so it bounds a CPU fwd+bwd from below as much as the copy rate does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def median_seconds(fn, sync, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device: str) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(4096, 4096, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(4096, 4096, device=device, dtype=dtype)
    gemm = 2 * 4096**3 / median_seconds(lambda: torch.mm(a, b, out=out), sync)
    src, dst = torch.randn(2**28, device=device), torch.empty(2**28, device=device)
    copy = 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), sync)
    src = dst = None  # freed before the fresh-write pass
    fresh = None
    if device == "cpu":
        fresh = 2**28 * 4 / median_seconds(lambda: torch.empty(2**28).fill_(1.0), sync)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return dict(device=name, gemm_dtype=str(dtype).removeprefix("torch."), gemm_flops_per_s=gemm,
                copy_bytes_per_s=copy, fresh_write_bytes_per_s=fresh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    c = ceilings(args.device)
    print(f"{c['device']}: {c['gemm_dtype']} GEMM {c['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s, "
          f"copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)"
          + (f", fresh write {c['fresh_write_bytes_per_s'] / 1e9:.1f} GB/s" if c["fresh_write_bytes_per_s"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(c, f, indent=1)


if __name__ == "__main__":
    main()
