"""The error type of the de-identification layer."""

from __future__ import annotations


class DeidError(Exception):
    """Base class for every error raised by :mod:`deid` (policies, methods, the engine).

    Messages never carry PHI: they name rules, paths, counts and shapes.
    """
