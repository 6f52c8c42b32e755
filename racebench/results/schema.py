"""The results schema: statuses and the columns of results.csv, knob columns taken from the method records."""

from __future__ import annotations

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "timeout", "skipped", "unsupported", "error", "nonfinite")
REQUIRED_COLUMNS = ("method", "device", "dtype", "B", "H", "T", "D", "causal", "mode", "status")
# Every knob column (race_P, performer_features, ...) stands between these two groups.
IDENTITY_COLUMNS = ("run_id", "method", "impl")
MEASURE_COLUMNS = ("device", "dtype", "B", "H", "T", "D", "causal", "mode", "status", "time_ms", "time_ms_min",
                   "time_ms_max", "time_ms_iqr", "repeats", "rounds", "tokens_per_s", "peak_mem_bytes",
                   "peak_mem_over_inputs_bytes", "input_bytes", "floor_bytes", "page_faults_per_pass", "nproc",
                   "comm_bytes_per_step", "rank_peak_mem_bytes", "refine", "threads", "decode_tokens", "prefill_ms",
                   "state_bytes", "cuda_graphs", "error")
# Columns that must hold numbers (or nothing): anything else in a results file is an error naming it.
NUMERIC_COLUMNS = ("B", "H", "T", "D", "time_ms", "time_ms_min", "time_ms_max", "time_ms_iqr", "repeats", "rounds",
                   "tokens_per_s", "peak_mem_bytes", "peak_mem_over_inputs_bytes", "input_bytes", "floor_bytes")
# In points.jsonl only: every timed pass of a point, and each round's median (compare's statistics read them).
SAMPLE_COLUMN = "times_ms"
ROUND_COLUMN = "round_ms"
# Lists kept in points.jsonl and left out of results.csv (load_run(samples=True) reads them): the timed passes,
# the rounds' medians, and a quality run's loss per step and accuracy every few steps.
LIST_COLUMNS = (SAMPLE_COLUMN, ROUND_COLUMN, "losses", "accuracy_by_step")
# What else must be equal for two points to be comparable (compare.py), besides the knobs.
MATCH_COLUMNS = ("method", "device", "dtype", "B", "H", "D", "causal", "mode", "nproc", "cuda_graphs", "T")


def columns(knobs: list[str] | None = None) -> list[str]:
    """results.csv's leading columns, in order; `knobs` defaults to every registered method's knobs."""
    if knobs is None:
        from racebench.methods.registry import knob_columns

        knobs = knob_columns()
    return [*IDENTITY_COLUMNS, *knobs, *MEASURE_COLUMNS]
