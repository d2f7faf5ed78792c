"""Differential privacy: accounting, clipping and Gaussian noise.

Unit of privacy: one user (all of a client's interactions); neighbouring
relation: add or remove one user; sampling: Poisson with rate ``q``. Every
epsilon is computed by an Opacus accountant (:mod:`.accounting`); the
mechanisms (:mod:`.mechanisms`) are pure functions taking a
``torch.Generator``. Opacus is imported only when an epsilon is computed, so
importing this package stays cheap.
"""

from __future__ import annotations

from gfmfr_secure.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    PrivacyLedger,
    calibrate_noise,
    epsilon_for,
    make_accountant,
    rounds_within_budget,
)
from gfmfr_secure.privacy.mechanisms import (
    add_central_noise,
    clip_updates,
    clip_updates_per_tensor,
    distributed_noise_std,
    gaussian_noise_like,
)

__all__ = [
    "ACCOUNTANTS",
    "PrivacyEvent",
    "PrivacyLedger",
    "add_central_noise",
    "calibrate_noise",
    "clip_updates",
    "clip_updates_per_tensor",
    "distributed_noise_std",
    "epsilon_for",
    "gaussian_noise_like",
    "make_accountant",
    "rounds_within_budget",
]
