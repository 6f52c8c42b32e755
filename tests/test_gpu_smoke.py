"""benchmarks/gpu_smoke.py's check of the longest points: a block of tokens repeated T / block times must give
the block's own output and gradient rows (RACE's normalization cancels the repeat count). Here on Triton's
interpreter at short lengths (the GPU check runs it at 2^24, where the row strides become 64-bit), with fresh
random inputs; and inputs that are not periodic must fail it."""

import torch
from conftest import load_benchmark

from racebench import make_planes


def _smoke():
    return load_benchmark("gpu_smoke")


def test_a_repeated_block_gives_the_blocks_rows():
    errs = _smoke().periodic_error(4 * 64, torch.device("cpu"), make_planes(3, 3, 128), block=64)
    assert len(errs) == 4 and max(errs) < 1e-3, errs


def test_rows_of_another_sequence_fail_the_check():
    # Each token repeated in place (not the block): same tokens, other rows at each position.
    errs = _smoke().periodic_error(4 * 64, torch.device("cpu"), make_planes(3, 3, 128), block=64,
                                   tile=lambda x, times: x.repeat_interleave(times, 2))
    assert min(errs) > 0.1, errs
