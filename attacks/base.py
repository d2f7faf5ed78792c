"""The attack interface: observers, results and a registry of named attacks.

An attack is a function from what one observer saw to an :class:`AttackResult`. Two
observers are modelled:

``"server"``
    the honest-but-curious aggregator: it sees every client's upload (item-table
    rows, head deltas) and everything it broadcasts (global model, teacher).
``"outsider"``
    a party that sees only released artefacts (the final global model, published
    recommendations), never individual uploads.

The algorithms themselves live in :mod:`attacks.interaction`, :mod:`attacks.membership`,
:mod:`attacks.attribute`, :mod:`attacks.grouping` and :mod:`attacks.audit` as pure
functions over arrays; an :class:`Attack` binds one of them to the observer whose
view it reads, so that drivers can list, look up and run attacks by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ATTACKS",
    "OBSERVERS",
    "Attack",
    "AttackRegistry",
    "AttackResult",
    "as_array",
    "finite_float",
    "get_attack",
    "make_rng",
    "register_attack",
]

OBSERVERS: tuple[str, ...] = ("server", "outsider")


def _check_observer(observer: str) -> None:
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; known: {', '.join(OBSERVERS)}")


@dataclass(frozen=True)
class AttackResult:
    """Outcome of running one attack against one view.

    Attributes
    ----------
    name : the attack's registry name.
    observer : ``"server"`` or ``"outsider"``.
    metrics : scalar metrics (AUC, TPR at low FPR, accuracy, baselines ...).
    n_targets : how many targets (interactions, users, canaries) were attacked.
    details : anything else worth keeping (per-target scores, thresholds, settings).
    """

    name: str
    observer: str
    metrics: Mapping[str, float]
    n_targets: int
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("attack result needs a non-empty name")
        _check_observer(self.observer)
        if int(self.n_targets) != self.n_targets or self.n_targets < 0:
            raise ValueError(f"n_targets must be a non-negative integer, got {self.n_targets!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (metrics as floats; ``details`` copied shallowly)."""
        return {
            "name": self.name,
            "observer": self.observer,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "n_targets": int(self.n_targets),
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class Attack:
    """A named attack and the observer whose view it needs.

    Attributes
    ----------
    name : registry name (unique within a registry).
    observer : ``"server"`` or ``"outsider"``.
    run : callable taking the observer's view (and options) and returning an
        :class:`AttackResult`.
    description : one line for listings.
    """

    name: str
    observer: str
    run: Callable[..., AttackResult]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"attack name must be a non-empty string, got {self.name!r}")
        _check_observer(self.observer)
        if not callable(self.run):
            raise TypeError(f"attack {self.name!r}: run must be callable")


class AttackRegistry:
    """Name -> :class:`Attack`. Duplicate registrations and unknown names raise."""

    def __init__(self) -> None:
        self._attacks: dict[str, Attack] = {}

    def register(self, attack: Attack) -> Attack:
        """Add ``attack``; a name already present raises ``ValueError``."""
        if attack.name in self._attacks:
            raise ValueError(f"attack {attack.name!r} is already registered")
        self._attacks[attack.name] = attack
        return attack

    def get(self, name: str) -> Attack:
        """Look up ``name``; unknown names raise ``ValueError`` listing the known ones."""
        if name not in self._attacks:
            known = ", ".join(sorted(self._attacks)) or "(none)"
            raise ValueError(f"unknown attack {name!r}; known: {known}")
        return self._attacks[name]

    def names(self, observer: str | None = None) -> list[str]:
        """Sorted names, optionally only those for one observer."""
        if observer is not None:
            _check_observer(observer)
        return sorted(n for n, a in self._attacks.items() if observer is None or a.observer == observer)

    def __contains__(self, name: object) -> bool:
        return name in self._attacks

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._attacks)


ATTACKS = AttackRegistry()


def register_attack(attack: Attack) -> Attack:
    """Register ``attack`` in the default registry :data:`ATTACKS`."""
    return ATTACKS.register(attack)


def get_attack(name: str) -> Attack:
    """Look ``name`` up in the default registry :data:`ATTACKS`."""
    return ATTACKS.get(name)


def as_array(
    name: str,
    x: Any,
    *,
    ndim: int | None = None,
    dtype: type | np.dtype = np.float64,
    shape: tuple[int | None, ...] | None = None,
    finite: bool = True,
) -> np.ndarray:
    """Convert ``x`` to an ndarray and check it, raising ``ValueError`` naming ``name``.

    Parameters
    ----------
    name : what the array is called in error messages.
    x : array-like (a torch tensor is accepted through ``numpy()``).
    ndim : required number of dimensions, or None.
    dtype : target dtype (float arrays are checked for NaN/inf when ``finite``).
    shape : required shape; ``None`` entries match any length.
    finite : reject NaN/inf in floating arrays.

    Returns
    -------
    np.ndarray
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} must be numeric, got an object array")
    want_int = np.issubdtype(np.dtype(dtype), np.integer)
    have_int = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)
    if want_int and arr.size and not have_int and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise ValueError(f"{name} must hold integers")
    arr = arr.astype(dtype, copy=False)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {list(arr.shape)}")
    if shape is not None:
        ok = arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(arr.shape)}")
    if finite and np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN/inf entries")
    return arr


def finite_float(name: str, value: float) -> float:
    """``float(value)``, raising ``ValueError`` when it is NaN/inf."""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def make_rng(seed: int | np.random.Generator) -> np.random.Generator:
    """A :class:`numpy.random.Generator` from an int seed (or the generator itself)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))
