"""A run on disk: run.json (spec + environment), points.jsonl (append-only log), results.csv (tidy table)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from racebench.errors import UsageError
from racebench.results.schema import REQUIRED_COLUMNS, SAMPLE_COLUMN, SCHEMA_VERSION, columns


@dataclass
class RunStore:
    path: Path

    @property
    def log(self) -> Path:
        return self.path / "points.jsonl"

    @property
    def run_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, path: Path, meta: dict) -> RunStore:
        path.mkdir(parents=True, exist_ok=True)
        if (path / "run.json").exists():
            raise UsageError(f"{path} already holds a run: continue it with --resume, or choose another --out")
        store = cls(path)
        store.write_meta(meta)
        store.log.touch()
        return store

    def write_meta(self, meta: dict) -> None:
        tmp = self.path / "run.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        os.replace(tmp, self.path / "run.json")  # never a half-written run.json

    def meta(self) -> dict:
        return load_meta(self.path)

    def append(self, row: dict) -> None:
        """One line per finished point, flushed at once: a crash or Ctrl-C loses nothing finished."""
        with self.log.open("a") as f:
            f.write(json.dumps(row | {"run_id": self.run_id}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        if not self.log.exists():
            return []
        rows = []
        for line in self.log.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that point is simply run again
        return rows

    def write_table(self) -> pd.DataFrame:
        df = tidy(self.rows())
        df.to_csv(self.path / "results.csv", index=False)
        return df


def tidy(rows: list[dict], *, samples: bool = False) -> pd.DataFrame:
    """One row per point, the schema's columns first; the list of timed passes (times_ms) only with `samples`."""
    df = pd.DataFrame(rows)
    cols = columns()
    for col in cols:
        if col not in df:
            df[col] = None
    dropped = {"traceback"} | (set() if samples else {SAMPLE_COLUMN})
    return df[cols + [c for c in df.columns if c not in cols and c not in dropped]]


def load_meta(path: Path) -> dict:
    f = Path(path) / "run.json"
    if not f.exists():
        raise UsageError(f"{path} is not a racebench run (no run.json)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{f} is not valid JSON: {exc}") from None
    version = meta.get("environment", {}).get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(f"{path}: results schema version {version}, this racebench reads {SCHEMA_VERSION}")
    return meta


def load_run(path: Path | str, *, samples: bool = False) -> tuple[dict, pd.DataFrame]:
    """run.json and the results table of a run folder; refuses other schemas and missing columns. With `samples`,
    the table comes from points.jsonl with every point's timed passes (times_ms; None where a run kept none)."""
    path = Path(path)
    meta = load_meta(path)
    csv = path / "results.csv"
    if samples:
        df = tidy(RunStore(path).rows(), samples=True)
        if SAMPLE_COLUMN not in df:
            df[SAMPLE_COLUMN] = None
    else:
        df = pd.read_csv(csv) if csv.exists() else tidy(RunStore(path).rows())
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UsageError(f"{path}: results lack required columns {', '.join(missing)}")
    for col in columns():  # optional columns of older runs
        if col not in df.columns:
            df[col] = None
    df["nproc"] = df["nproc"].fillna(1).astype(int)  # runs before --nproc ran in one process
    return meta, df
