"""Errors a user can cause. The CLI turns each into one readable line and an exit code."""


class RacebenchError(Exception):
    """Base class: a mistake in how racebench was asked to run (exit code 2)."""

    exit_code = 2


class UsageError(RacebenchError, ValueError):
    """Bad options or arguments."""


class UnsupportedError(RacebenchError, ValueError):
    """A method was asked for a device, dtype or causality it does not support."""


class UnavailableError(RacebenchError):
    """A method cannot run on this machine (no CUDA, package not installed)."""


class RunFailedError(RacebenchError):
    """A run started but could not finish (exit code 1)."""

    exit_code = 1


class PluginError(UsageError):
    """A method plugin that cannot be loaded: an import error, a duplicate name, a malformed record."""
