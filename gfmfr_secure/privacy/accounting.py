"""Privacy accounting for Poisson-subsampled Gaussian rounds, through Opacus.

No epsilon here is computed by a hand-written formula: every number comes from
an Opacus accountant (``opacus.accountants.RDPAccountant`` or
``PRVAccountant``) fed with ``(noise_multiplier, sample_rate, steps)``
compositions, and calibration uses ``opacus.accountants.utils.get_noise_multiplier``.

Unit of privacy: one user. Neighbouring relation: add or remove one user.
Sampling: Poisson with rate ``sample_rate`` per round. One round releases the
clipped sum of the sampled users' updates plus Gaussian noise of std
``noise_multiplier * clip``.

Opacus is imported lazily (it takes seconds to import), when an accountant is
first built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gfmfr_secure.errors import ConfigError

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

__all__ = [
    "ACCOUNTANTS",
    "PRIVACY_RELATION",
    "PRIVACY_UNIT",
    "PrivacyEvent",
    "PrivacyLedger",
    "calibrate_noise",
    "epsilon_for",
    "make_accountant",
    "register_accountant",
    "rounds_within_budget",
]

PRIVACY_UNIT = "user"
PRIVACY_RELATION = "add/remove one user"
SAMPLING = "poisson"

#: A calibrated sigma whose epsilon overshoots is multiplied by this, at most
#: ``_MAX_BUMPS`` times (about 5% in all).
_BUMP_FACTOR = 1.001
_MAX_BUMPS = 50


def _rdp() -> IAccountant:
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


def _prv() -> IAccountant:
    from opacus.accountants import PRVAccountant

    return PRVAccountant()


#: Accountant name -> factory of a fresh, empty Opacus accountant.
ACCOUNTANTS: dict[str, Callable[[], IAccountant]] = {"rdp": _rdp, "prv": _prv}


def register_accountant(name: str, factory: Callable[[], IAccountant]) -> None:
    """Add ``factory`` (returning a fresh Opacus ``IAccountant``) under ``name``.

    Raises
    ------
    ConfigError
        If ``name`` is already registered (the known names are listed).
    """
    if name in ACCOUNTANTS:
        raise ConfigError(
            f"accountant {name!r} is already registered; known: {', '.join(sorted(ACCOUNTANTS))}"
        )
    ACCOUNTANTS[name] = factory


def make_accountant(name: str) -> IAccountant:
    """A fresh, empty Opacus accountant registered under ``name``.

    Raises
    ------
    ConfigError
        If ``name`` is unknown (the known names are listed).
    """
    try:
        factory = ACCOUNTANTS[name]
    except KeyError:
        raise ConfigError(
            f"accountant: unknown name {name!r}; known: {', '.join(sorted(ACCOUNTANTS))}"
        ) from None
    return factory()


# --------------------------------------------------------------------------- validation


def _check_noise_multiplier(noise_multiplier: float) -> float:
    value = float(noise_multiplier)
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    return value


def _check_sample_rate(sample_rate: float) -> float:
    value = float(sample_rate)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return value


def _check_delta(delta: float) -> float:
    value = float(delta)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return value


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_target(target_epsilon: float) -> float:
    value = float(target_epsilon)
    if math.isnan(value) or value <= 0.0:
        raise ConfigError(f"target_epsilon must be > 0 (inf allowed), got {target_epsilon!r}")
    return value


def _epsilon_of_history(
    history: list[tuple[float, float, int]], delta: float, accountant: str
) -> float:
    """Epsilon of ``[(sigma, q, steps), ...]`` from a fresh Opacus accountant."""
    acc = make_accountant(accountant)
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    state = acc.state_dict()
    state["history"] = list(history)
    acc.load_state_dict(state)
    return float(acc.get_epsilon(delta=delta))


# --------------------------------------------------------------------------- epsilon and calibration


def epsilon_for(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian rounds.

    Parameters
    ----------
    noise_multiplier : sigma; the noise std is ``sigma * clip``. ``0`` gives ``inf``.
    sample_rate : Poisson sampling rate ``q`` in (0, 1].
    steps : number of composed rounds, >= 1.
    delta : target delta in (0, 1).
    accountant : a name in :data:`ACCOUNTANTS` (``"rdp"`` or ``"prv"``).

    Returns
    -------
    float
        The accountant's epsilon (an upper bound for ``"prv"``).
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    _check_count("steps", steps, 1)
    d = _check_delta(delta)
    return _epsilon_of_history([(sigma, q, steps)], d, accountant)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    *,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest sigma found whose epsilon after ``steps`` rounds is ``<= target_epsilon``.

    Opacus's ``get_noise_multiplier`` runs the search; the result is then
    checked with :func:`epsilon_for` and, should it overshoot, sigma is raised
    by 0.1% at a time until it does not. The returned sigma
    therefore never overshoots; it may undershoot by up to ``epsilon_tolerance``.

    Parameters
    ----------
    target_epsilon : budget, > 0; ``inf`` returns ``0.0`` (no noise).
    delta : target delta in (0, 1).
    sample_rate : Poisson sampling rate ``q`` in (0, 1].
    steps : number of rounds, >= 1.
    accountant : a name in :data:`ACCOUNTANTS`.
    epsilon_tolerance : precision of the binary search in epsilon, > 0.

    Raises
    ------
    ConfigError
        On an invalid argument, or when ``target_epsilon`` cannot be reached
        with any sigma Opacus searches (budget too small).
    """
    target = _check_target(target_epsilon)
    d = _check_delta(delta)
    q = _check_sample_rate(sample_rate)
    _check_count("steps", steps, 1)
    make_accountant(accountant)  # names an unknown accountant before any work
    if not (math.isfinite(epsilon_tolerance) and epsilon_tolerance > 0):
        raise ConfigError(f"epsilon_tolerance must be finite and > 0, got {epsilon_tolerance!r}")
    if math.isinf(target):
        return 0.0

    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target,
                target_delta=d,
                sample_rate=q,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            f"target_epsilon={target!r} cannot be reached with delta={d!r}, "
            f"sample_rate={q!r}, steps={steps} ({accountant}): {err}"
        ) from err
    for _ in range(_MAX_BUMPS):
        if epsilon_for(sigma, q, steps, d, accountant) <= target:
            return sigma
        sigma *= _BUMP_FACTOR
    raise ConfigError(
        f"target_epsilon={target!r}: no sigma within {_MAX_BUMPS} bumps of Opacus's search "
        f"stays under the budget (delta={d!r}, sample_rate={q!r}, steps={steps}, {accountant})"
    )


def rounds_within_budget(
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    target_epsilon: float,
    max_rounds: int,
    accountant: str = "rdp",
) -> int:
    """Largest number of rounds ``T <= max_rounds`` with ``epsilon_for(T) <= target_epsilon``.

    Training that stops after ``T`` rounds never exceeds the budget; round
    ``T + 1`` (when ``T < max_rounds``) would. Found by binary search, keeping
    the invariant ``eps(lo) <= target < eps(hi)``, so the answer is tight even
    if the accountant's bound is not exactly monotone.

    Returns
    -------
    int
        In ``[0, max_rounds]``; ``0`` when even one round exceeds the budget.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    d = _check_delta(delta)
    target = _check_target(target_epsilon)
    _check_count("max_rounds", max_rounds, 0)
    make_accountant(accountant)
    if math.isinf(target):
        return max_rounds
    if max_rounds == 0 or sigma == 0.0:
        return 0

    def fits(rounds: int) -> bool:
        return epsilon_for(sigma, q, rounds, d, accountant) <= target

    if fits(max_rounds):
        return max_rounds
    lo, hi = 0, max_rounds  # eps(0) = 0 <= target < eps(max_rounds)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------- ledger


@dataclass(frozen=True)
class PrivacyEvent:
    """One released round: a Poisson-subsampled Gaussian mechanism.

    Attributes
    ----------
    round : round index (>= 0).
    noise_multiplier : sigma of that round (noise std ``sigma * clip``), >= 0.
    sample_rate : Poisson sampling rate ``q`` in (0, 1].
    """

    round: int
    noise_multiplier: float
    sample_rate: float

    def __post_init__(self) -> None:
        _check_count("round", self.round, 0)
        _check_noise_multiplier(self.noise_multiplier)
        _check_sample_rate(self.sample_rate)


class PrivacyLedger:
    """Ordered record of :class:`PrivacyEvent` s; epsilon is recomputed from them.

    The ledger holds no accountant: :meth:`epsilon` feeds every event, in
    order, to a fresh Opacus accountant, so the number always matches the
    recorded events.
    """

    def __init__(self, events: Iterable[PrivacyEvent] = ()) -> None:
        self._events: list[PrivacyEvent] = []
        for event in events:
            self.append(event)

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """The recorded events, oldest first."""
        return tuple(self._events)

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event: PrivacyEvent) -> None:
        """Record ``event``; rounds must strictly increase.

        Raises
        ------
        ConfigError
            If ``event`` is not a :class:`PrivacyEvent` or its round does not
            follow the last recorded round.
        """
        if not isinstance(event, PrivacyEvent):
            raise ConfigError(f"event must be a PrivacyEvent, got {type(event).__name__}")
        if self._events and event.round <= self._events[-1].round:
            raise ConfigError(
                f"event.round must increase: got {event.round} after {self._events[-1].round}"
            )
        self._events.append(event)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon of all recorded events composed (``0.0`` when empty).

        Consecutive events with the same ``(noise_multiplier, sample_rate)``
        are merged into one ``(sigma, q, steps)`` entry, as Opacus's own
        ``step`` does.
        """
        d = _check_delta(delta)
        history: list[tuple[float, float, int]] = []
        for event in self._events:
            sigma, q = float(event.noise_multiplier), float(event.sample_rate)
            if history and history[-1][:2] == (sigma, q):
                history[-1] = (sigma, q, history[-1][2] + 1)
            else:
                history.append((sigma, q, 1))
        return _epsilon_of_history(history, d, accountant)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form: unit, relation, sampling and the events."""
        return {
            "unit": PRIVACY_UNIT,
            "relation": PRIVACY_RELATION,
            "sampling": SAMPLING,
            "events": [asdict(event) for event in self._events],
        }

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict` (one line, keys sorted)."""
        return json.dumps(self.to_dict(), sort_keys=True)
