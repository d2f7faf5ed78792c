"""Exception types. Every error names the file, row or column and the problem."""

from __future__ import annotations


class GfmfrError(Exception):
    """Base class for errors raised by gfmfr-secure."""


class DataError(GfmfrError, ValueError):
    """Malformed or inconsistent input data (files, arrays, ids)."""


class ConfigError(GfmfrError, ValueError):
    """Invalid configuration: unknown keys, wrong types, impossible values."""
