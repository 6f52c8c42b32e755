"""Exclusive OS file locks (flock): released by the kernel when their holder dies, so none is ever stale.

Used for a run folder while a sweep writes it, and for a native-kernel build folder while one process compiles."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class LockHeld(Exception):
    """The lock is held by another process: `holder` is its pid as it wrote it (None if unreadable)."""

    def __init__(self, path: Path, holder: int | None):
        super().__init__(f"{path} is locked by pid {holder}")
        self.path, self.holder = path, holder


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    return None


@contextlib.contextmanager
def exclusive(path: Path, *, wait_s: float = 0.0,
              on_wait: Callable[[int | None], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent, with this pid written in it) for the block.
    If another process holds it: wait up to wait_s seconds (calling on_wait(holder) once), then raise LockHeld."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeld(path, _holder(fd)) from None
                if on_wait and not told:
                    on_wait(_holder(fd))
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
