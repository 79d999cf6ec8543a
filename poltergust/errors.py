"""The errors this package raises on purpose: one base, and the one way a run fails.

`PoltergustError` is the base of every error Poltergust raises itself, so a
caller can tell "Poltergust said no, with a reason" from a bug. `RunFailed`
is how anything inside a run says the run cannot succeed: bad input, a failed
build, an unreadable environment. `run.execute` turns it into the run's error
result in one place; everything else a run meets is a bug, reported as such.
"""
from __future__ import annotations


class PoltergustError(Exception):
    """An error Poltergust raises on purpose; its message is meant for a person."""


class RunFailed(PoltergustError):
    """A run cannot succeed; the message is the reason its error result gives."""
