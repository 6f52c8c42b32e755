"""Test-only methods, loaded as a plugin (spec plugins / --plugin): a point whose process dies by a signal, and one
whose output is NaN. They exercise the engine's fault handling through the same path as users' methods."""

import os
import signal

from racebench import Method, register_method


def _crash(cfg):
    os.kill(os.getpid(), signal.SIGKILL)


register_method(Method(name="test-crash", description="kills its own process while building", build=_crash))
register_method(Method(name="test-nan", description="returns NaN everywhere",
                       build=lambda cfg: lambda q, k, v: q * float("nan")))
