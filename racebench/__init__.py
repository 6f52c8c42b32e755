"""racebench: long-context attention benchmarks, RACE attention against FlashAttention and linear attention."""

__version__ = "0.1.0"

from racebench.errors import RacebenchError  # noqa: E402
from racebench.methods import BuildConfig, Method, build_method, get_method, list_methods  # noqa: E402
from racebench.methods.race import make_planes, race_attention  # noqa: E402

__all__ = ["__version__", "RacebenchError", "BuildConfig", "Method", "build_method", "get_method",
           "list_methods", "make_planes", "race_attention"]
