"""How a simulated secure-aggregation round uses this machine: the number of workers.

The drivers (:func:`gfmfr_secure.secagg.masking.secure_sum`, threads;
:func:`gfmfr_secure.secagg.ckks.encrypted_sum`, forked processes) play every client of a
round on one machine; the count changes wall time only, never the result.
"""

from __future__ import annotations

import os

from gfmfr_secure.errors import ConfigError

__all__ = ["simulation_workers"]


def simulation_workers() -> int:
    """Workers for the simulated clients: ``GFMFR_WORKERS`` if set, else the CPUs this process may use.

    Raises
    ------
    ConfigError
        When ``GFMFR_WORKERS`` is not a whole number >= 1.
    """
    raw = os.environ.get("GFMFR_WORKERS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"GFMFR_WORKERS must be a whole number >= 1 (workers for the simulated clients), got {raw!r}")
        return int(raw)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
