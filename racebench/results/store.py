"""A run on disk: run.json (spec + environment), points.jsonl (the record: one line per finished point, fsynced,
append-only) and results.csv (the tidy table derived from it, written atomically, rebuilt when it disagrees)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from racebench import locks
from racebench.errors import UsageError
from racebench.results.schema import (
    LIST_COLUMNS,
    NUMERIC_COLUMNS,
    REQUIRED_COLUMNS,
    ROUND_COLUMN,
    SAMPLE_COLUMN,
    SCHEMA_VERSION,
    columns,
)
from racebench.results.timing import merge_rounds

log = logging.getLogger("racebench")
LOCK = ".lock"


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
        """A new run in `path` (hold `writing(path)` first: then no other process can create it at once)."""
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
        """One line per finished point, flushed and synced at once: a crash or Ctrl-C loses nothing finished."""
        with self.log.open("a") as f:
            f.write(json.dumps(row | {"run_id": self.run_id}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def repair(self) -> None:
        """Cut a last line left without its newline by a crash mid-write (that point runs again), so that the
        next row starts on a line of its own."""
        if not self.log.exists():
            return
        data = self.log.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning(f"{self.log}: dropped {len(data) - keep} bytes of a point cut short by a crash "
                    f"({data[keep:keep + 40]!r}...); it runs again")
        with self.log.open("r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        """The finished points; a line that is not a point (cut short, corrupted) is skipped with a warning."""
        if not self.log.exists():
            return []
        rows, bad = [], []
        for number, line in enumerate(self.log.read_bytes().splitlines(), 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not {"method", "T", "status"} <= row.keys():
                    raise ValueError
                rows.append(row)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                bad.append(number)
        if bad:
            log.warning(f"{self.log}: skipped {len(bad)} line(s) that are not points (line {bad[0]}"
                        f"{', ...' if len(bad) > 1 else ''}): those points run again on --resume")
        return rows

    def write_table(self) -> None:
        _write_atomic(self.path / "results.csv", _table_text(self.rows()))


def _table_text(rows: list[dict]) -> str:
    """results.csv's text for these points."""
    return tidy(rows).to_csv(index=False)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Hold the run folder's lock (created with the folder) while a sweep writes it: a second sweep or --resume on
    it is a UsageError naming this process. The OS releases the lock when the holder dies, however it dies."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot make a run folder there ({exc.strerror})") from None
    if not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a folder")
    try:
        with locks.exclusive(path / LOCK):
            yield
    except locks.LockHeld as exc:
        raise UsageError(f"{path} is being written by another sweep (pid {exc.holder}): wait for it to finish, "
                         "or choose another --out") from None
    except PermissionError as exc:
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror})") from None


def tidy(rows: list[dict], *, samples: bool = False) -> pd.DataFrame:
    """One row per point (its rounds merged), the schema's columns first; the lists (the timed passes times_ms, the
    rounds' medians round_ms, a quality run's curves) only with `samples`."""
    df = pd.DataFrame(merge_rounds(rows))
    cols = columns()
    for col in cols:
        if col not in df:
            df[col] = None
    dropped = {"traceback"} | (set() if samples else set(LIST_COLUMNS))
    return df[cols + [c for c in df.columns if c not in cols and c not in dropped]]


def load_meta(path: Path) -> dict:
    f = Path(path) / "run.json"
    if not f.is_file():
        raise UsageError(f"{path} is not a racebench run (no run.json)")
    try:
        meta = json.loads(f.read_bytes())
    except (ValueError, OSError) as exc:
        raise UsageError(f"{f} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("environment"), dict):
        raise UsageError(f"{f} is not a racebench run record (an object with an environment)")
    version = meta["environment"].get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(f"{path}: results schema version {version!r}, this racebench reads {SCHEMA_VERSION!r}")
    return meta


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a results table: {str(exc).splitlines()[0]}") from None


def _points_frame(path: Path) -> pd.DataFrame:
    """The table from points.jsonl (read back through CSV, so its types are those of results.csv); results.csv
    is rebuilt, with a warning, where it disagrees (a crash between the two, a file cut short)."""
    store = RunStore(path)
    rows = store.rows()
    if not rows:
        if store.log.stat().st_size:
            raise UsageError(f"{store.log} holds no readable point")
        raise UsageError(f"{path}: no finished point yet")
    text = _table_text(rows)
    df = pd.read_csv(io.StringIO(text))
    csv = path / "results.csv"
    keys = ["method", "T", "status"]
    try:
        on_disk = pd.read_csv(csv)
        agrees = len(on_disk) == len(df) and sorted(map(tuple, on_disk[keys].astype(str).values)) == sorted(
            map(tuple, df[keys].astype(str).values))
    except Exception:  # missing, unreadable, garbage, columns missing: all mean rebuild
        on_disk, agrees = None, False
    if not agrees:
        told = "is missing" if on_disk is None and not csv.exists() else (
            "is unreadable" if on_disk is None else f"has {len(on_disk)} points where points.jsonl has {len(df)}"
            if len(on_disk) != len(df) else "disagrees with points.jsonl")
        try:
            _write_atomic(csv, text)
            log.warning(f"{csv} {told}: rebuilt from points.jsonl")
        except OSError:
            log.warning(f"{csv} {told}: read points.jsonl instead (the folder is not writable)")
    return df


def load_run(path: Path | str, *, samples: bool = False) -> tuple[dict, pd.DataFrame]:
    """run.json and the results table of a run folder, from points.jsonl (the record; results.csv only for runs
    without one); refuses other schemas, missing columns and non-numeric numbers. With `samples`, every point's
    timed passes and rounds' medians too (times_ms, round_ms; None where a run kept none)."""
    path = Path(path)
    meta = load_meta(path)
    if samples:
        df = tidy(RunStore(path).rows(), samples=True)
        for col in (SAMPLE_COLUMN, ROUND_COLUMN):
            if col not in df:
                df[col] = None
    elif (path / "points.jsonl").exists():
        df = _points_frame(path)
    elif (path / "results.csv").exists():
        df = _read_csv(path / "results.csv")
    else:
        raise UsageError(f"{path}: neither points.jsonl nor results.csv")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UsageError(f"{path}: results lack required columns {', '.join(missing)}")
    for col in columns():  # optional columns of older runs
        if col not in df.columns:
            df[col] = None
    for col in NUMERIC_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna()
        if bad.any():
            raise UsageError(f"{path}: column {col} holds {df[col][bad].iloc[0]!r}, not a number")
        df[col] = values
    df["nproc"] = df["nproc"].fillna(1).astype(int)  # runs before --nproc ran in one process
    df["cuda_graphs"] = df["cuda_graphs"].map(lambda x: x is True or str(x) == "True")  # eager before --cuda-graphs
    return meta, df
