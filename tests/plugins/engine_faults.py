"""Test-only methods, loaded as a plugin (spec plugins / --plugin): a point whose process dies by a signal, one whose
output is NaN, one that hangs, one that peaks over a small memory budget. They exercise the engine's fault handling
through the same path as users' methods."""

import os
import signal

from racebench import Method, register_method


def _crash(cfg):
    os.kill(os.getpid(), signal.SIGKILL)


register_method(Method(name="test-crash", description="kills its own process while building", build=_crash))
register_method(Method(name="test-nan", description="returns NaN everywhere",
                       build=lambda cfg: lambda q, k, v: q * float("nan")))


def _hang(cfg):
    import time

    time.sleep(3600)


def _hog(cfg):
    import torch

    def attention(q, k, v):
        spare = torch.ones(160 * 2**20 // 4)  # 160 MiB for a moment: over a small budget, within the cap's headroom
        return q * spare[0]

    return attention


register_method(Method(name="test-hang", description="sleeps an hour while building", build=_hang))
register_method(Method(name="test-hog", description="takes 160 MiB more than its output in each pass", build=_hog))
