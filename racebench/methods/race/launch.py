"""How fused.py launches each Triton kernel: tokens per tile and Triton's num_warps / num_stages.

The defaults below are what every run uses unless RACEBENCH_KERNEL_CONFIG names a JSON file of overrides
({"dq_kernel": {"num_warps": 8}, ...}), which is what benchmarks/tune_kernels.py writes after timing the
alternatives on a GPU; runs record the configuration in effect (run.json, "race_kernel_launch").
`overridden(...)` swaps it for a block of code (the tuner, the tests).
"""

from __future__ import annotations

import contextlib
import json
import os

from racebench.errors import UsageError

ENV = "RACEBENCH_KERNEL_CONFIG"
TILES = (16, 32, 64)  # BT must divide the 64-token unit of the non-causal ranges (fused.TILE)
# One stage and four warps: with these, every kernel compiles for sm_90 within its shared memory
# (tests/test_kernels_compile.py); the causal kernels' chunk is fused.CHUNK, shared by all three. BT and WALK are
# the kernels' compile-time arguments of those names; WALK: out_kernel and dkv_kernel take one tile per program
# (False) or walk ranges of tiles like the others (True).
DEFAULTS = {
    "state_kernel": dict(BT=64, num_warps=4, num_stages=1),
    "out_kernel": dict(BT=64, num_warps=4, num_stages=1, WALK=False),
    "dq_kernel": dict(BT=64, num_warps=4, num_stages=1),
    "dkv_kernel": dict(BT=64, num_warps=4, num_stages=1, WALK=False),
    "causal_fwd_kernel": dict(num_warps=4, num_stages=1),
    "causal_dq_kernel": dict(num_warps=4, num_stages=1),
    "causal_dkv_kernel": dict(num_warps=4, num_stages=1),
    "decode_step_kernel": dict(num_warps=4, num_stages=1),
}
# Programs per streaming multiprocessor that the range-walking kernels aim for (fused._programs).
PROGRAMS_PER_SM = 4
ALLOWED = dict(BT=TILES, num_warps=(1, 2, 4, 8, 16), num_stages=(1, 2, 3, 4), WALK=(False, True))

_active: dict | None = None


def validate(config: dict) -> dict:
    """config (kernel -> options, and optionally "programs_per_sm") merged over the defaults; UsageError if bad."""
    merged = {name: dict(opts) for name, opts in DEFAULTS.items()}
    merged["programs_per_sm"] = PROGRAMS_PER_SM
    for name, opts in config.items():
        if name == "programs_per_sm":
            if not (isinstance(opts, int) and 1 <= opts <= 64):
                raise UsageError(f"programs_per_sm must be an integer from 1 to 64, not {opts!r}")
            merged[name] = opts
            continue
        if name not in DEFAULTS or not isinstance(opts, dict):
            raise UsageError(f"unknown kernel {name!r} in the launch configuration (known: {', '.join(DEFAULTS)})")
        for key, value in opts.items():
            if key not in DEFAULTS[name] or value not in ALLOWED[key]:
                raise UsageError(f"{name}: {key}={value!r} is not a launch option it takes "
                                 f"({', '.join(f'{k} in {ALLOWED[k]}' for k in DEFAULTS[name])})")
        merged[name].update(opts)
    return merged


def current() -> dict:
    """The configuration in effect: the defaults, the file RACEBENCH_KERNEL_CONFIG names, or an override."""
    global _active
    if _active is None:
        path = os.environ.get(ENV)
        if path:
            try:
                with open(path) as f:
                    _active = validate(json.load(f))
            except (OSError, ValueError) as exc:
                raise UsageError(f"{ENV}={path}: cannot read a launch configuration ({exc})") from exc
        else:
            _active = validate({})
    return _active


def options(kernel: str) -> dict:
    """Launch options of `kernel`: its tile (BT, where it has one), num_warps, num_stages (and WALK)."""
    return dict(current()[kernel])


@contextlib.contextmanager
def overridden(config: dict):
    """Run a block with `config` (as in validate) in effect instead of the current configuration."""
    global _active
    saved, _active = current(), validate(config)
    try:
        yield _active
    finally:
        _active = saved
