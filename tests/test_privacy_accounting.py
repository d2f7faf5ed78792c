"""Accounting through Opacus: golden epsilons, calibration, ledger, budget command."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from gfmfr_secure import cli
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy import accounting
from gfmfr_secure.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    PrivacyLedger,
    calibrate_noise,
    epsilon_for,
    make_accountant,
    register_accountant,
    rounds_within_budget,
)

OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float, name: str) -> float:
    """Epsilon straight from an Opacus accountant stepped ``steps`` times."""
    acc = OPACUS[name]()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


# --------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name_lists_known():
    assert set(ACCOUNTANTS) >= {"rdp", "prv"}
    assert isinstance(make_accountant("rdp"), RDPAccountant)
    assert isinstance(make_accountant("prv"), PRVAccountant)
    with pytest.raises(ConfigError, match=r"accountant.*'gdpx'.*known: prv, rdp"):
        make_accountant("gdpx")
    with pytest.raises(ConfigError, match="already registered"):
        register_accountant("rdp", RDPAccountant)


# --------------------------------------------------------------------------- golden epsilons


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta", "name"),
    [
        (1.0, 0.01, 1000, 1e-5, "rdp"),
        (0.8, 0.05, 200, 1e-4, "rdp"),
        (5.0, 1.0, 100, 1e-4, "rdp"),
        (1.0, 0.01, 1000, 1e-5, "prv"),
        (2.0, 0.1, 50, 1e-4, "prv"),
    ],
)
def test_epsilon_equals_opacus(sigma, q, steps, delta, name):
    expected = opacus_epsilon(sigma, q, steps, delta, name)
    assert epsilon_for(sigma, q, steps, delta, name) == pytest.approx(expected, rel=1e-9)


def test_epsilon_golden_literals():
    # Computed once with Opacus 1.6.0.
    assert epsilon_for(1.0, 0.01, 1000, 1e-5, "rdp") == pytest.approx(2.1013652716430564, rel=1e-6)
    assert epsilon_for(1.0, 1.0, 100, 1e-5, "rdp") == pytest.approx(96.11630842505602, rel=1e-6)


def test_epsilon_zero_noise_is_infinite_and_grows_with_steps():
    assert epsilon_for(0.0, 0.5, 10, 1e-5) == math.inf
    assert epsilon_for(1.0, 0.1, 10, 1e-5) < epsilon_for(1.0, 0.1, 20, 1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"accountant": "nope"}, "accountant"),
    ],
)
def test_epsilon_for_rejects_bad_arguments(kwargs, match):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-5}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        epsilon_for(**args)


# --------------------------------------------------------------------------- calibration


def test_calibration_matches_opacus_search_and_infinite_target():
    sigma = calibrate_noise(2.0, 1e-5, 0.01, 1000)
    ref = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, steps=1000, accountant="rdp"
    )
    assert sigma == pytest.approx(ref, rel=1e-5)
    assert epsilon_for(sigma, 0.01, 1000, 1e-5) <= 2.0
    assert calibrate_noise(math.inf, 1e-5, 0.01, 1000) == 0.0


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(min_value=0.5, max_value=16.0),
    q=st.one_of(st.floats(min_value=0.005, max_value=0.2), st.just(1.0)),
    steps=st.integers(min_value=1, max_value=500),
)
def test_calibrated_sigma_never_overshoots(target, q, steps):
    sigma = calibrate_noise(target, 1e-4, q, steps)
    assert sigma > 0
    assert epsilon_for(sigma, q, steps, 1e-4) <= target


def test_calibrated_sigma_never_overshoots_prv():
    sigma = calibrate_noise(3.0, 1e-5, 0.05, 200, "prv")
    assert epsilon_for(sigma, 0.05, 200, 1e-5, "prv") <= 3.0


def test_calibration_bumps_a_sigma_that_overshoots(monkeypatch):
    from opacus.accountants import utils

    good = calibrate_noise(2.0, 1e-5, 0.1, 100)
    monkeypatch.setattr(utils, "get_noise_multiplier", lambda **kw: good * (1 - 1e-5))
    bumped = calibrate_noise(2.0, 1e-5, 0.1, 100)
    assert epsilon_for(bumped, 0.1, 100, 1e-5) <= 2.0
    monkeypatch.setattr(accounting, "_MAX_BUMPS", 3)
    monkeypatch.setattr(utils, "get_noise_multiplier", lambda **kw: good / 2)
    with pytest.raises(ConfigError, match="target_epsilon"):
        calibrate_noise(2.0, 1e-5, 0.1, 100)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 1e-5, 0.1, 10), "target_epsilon"),
        ((-1.0, 1e-5, 0.1, 10), "target_epsilon"),
        ((1.0, 0.0, 0.1, 10), "delta"),
        ((1.0, 1e-5, 0.0, 10), "sample_rate"),
        ((1.0, 1e-5, 0.1, 0), "steps"),
        ((1e-9, 1e-5, 1.0, 10_000), "target_epsilon=1e-09 cannot be reached"),
    ],
)
def test_calibration_rejects_bad_or_impossible_budgets(args, match):
    with pytest.raises(ConfigError, match=match):
        calibrate_noise(*args)


# --------------------------------------------------------------------------- ledger and rounds


def test_ledger_epsilon_equals_epsilon_for_and_serialises():
    ledger = PrivacyLedger()
    assert ledger.epsilon(1e-5) == 0.0
    for r in range(50):
        ledger.append(PrivacyEvent(round=r, noise_multiplier=1.1, sample_rate=0.2))
    assert len(ledger) == 50
    for name in ("rdp", "prv"):
        assert ledger.epsilon(1e-5, name) == pytest.approx(
            epsilon_for(1.1, 0.2, 50, 1e-5, name), rel=1e-12
        )
    data = json.loads(ledger.to_json())
    assert data["unit"] == "user" and data["relation"] == "add/remove one user"
    assert data["events"][3] == {"round": 3, "noise_multiplier": 1.1, "sample_rate": 0.2}


def test_ledger_heterogeneous_events_match_opacus():
    events = [PrivacyEvent(0, 1.0, 0.1), PrivacyEvent(1, 1.0, 0.1), PrivacyEvent(2, 2.0, 0.2)]
    acc = RDPAccountant()
    for e in events:
        acc.step(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
    assert PrivacyLedger(events).epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert PrivacyLedger([*events, PrivacyEvent(3, 0.0, 0.1)]).epsilon(1e-5) == math.inf


def test_ledger_and_event_validation():
    with pytest.raises(ConfigError, match="sample_rate"):
        PrivacyEvent(0, 1.0, 0.0)
    with pytest.raises(ConfigError, match="round"):
        PrivacyEvent(-1, 1.0, 0.5)
    ledger = PrivacyLedger([PrivacyEvent(2, 1.0, 0.5)])
    with pytest.raises(ConfigError, match="event.round must increase"):
        ledger.append(PrivacyEvent(2, 1.0, 0.5))
    with pytest.raises(Exception, match="frozen|cannot assign"):
        ledger.events[0].round = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("sigma", "q", "target", "max_rounds", "name"),
    [(2.0, 0.1, 2.0, 10_000, "rdp"), (3.0, 1.0, 4.0, 10_000, "rdp"), (1.5, 0.2, 3.0, 40, "prv")],
)
def test_rounds_within_budget_is_tight(sigma, q, target, max_rounds, name):
    t = rounds_within_budget(sigma, q, 1e-5, target, max_rounds, name)
    assert 1 <= t < max_rounds
    assert epsilon_for(sigma, q, t, 1e-5, name) <= target
    assert epsilon_for(sigma, q, t + 1, 1e-5, name) > target


def test_rounds_within_budget_edges():
    assert rounds_within_budget(1.0, 0.1, 1e-5, math.inf, 7) == 7
    assert rounds_within_budget(0.0, 0.1, 1e-5, 8.0, 7) == 0
    assert rounds_within_budget(100.0, 0.01, 1e-5, 8.0, 7) == 7
    assert rounds_within_budget(0.3, 1.0, 1e-5, 0.5, 7) == 0


# --------------------------------------------------------------------------- budget command


def _table(text: str) -> list[dict[str, str]]:
    lines = text.strip().splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split())) for line in lines[1:]]


def test_budget_command_calibrates_like_opacus(capsys):
    status = cli.main(
        [
            "budget",
            "--sample-rate",
            "0.01",
            "--rounds",
            "1000",
            "--delta",
            "1e-5",
            "--epsilon",
            "inf",
            "2",
            "8",
        ]
    )
    assert status == 0
    rows = _table(capsys.readouterr().out)
    assert [r["epsilon"] for r in rows] == ["inf", "2", "8"]
    assert float(rows[0]["sigma"]) == 0.0
    for row in rows[1:]:
        assert (row["q"], row["rounds"], row["delta"], row["accountant"]) == (
            "0.01",
            "1000",
            "1e-05",
            "rdp",
        )
        ref = get_noise_multiplier(
            target_epsilon=float(row["epsilon"]),
            target_delta=1e-5,
            sample_rate=0.01,
            steps=1000,
            accountant="rdp",
        )
        assert float(row["sigma"]) == pytest.approx(ref, rel=1e-5)


def test_budget_command_epsilon_of_sigma_like_opacus(capsys):
    status = cli.main(
        [
            "budget",
            "--sample-rate",
            "0.01",
            "--rounds",
            "1000",
            "--delta",
            "1e-5",
            "--accountant",
            "prv",
            "--sigma",
            "1.0",
            "0",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert float(rows[0]["epsilon"]) == pytest.approx(
        opacus_epsilon(1.0, 0.01, 1000, 1e-5, "prv"), rel=1e-5
    )
    assert rows[1]["epsilon"] == "inf" and rows[0]["accountant"] == "prv"
    # aligned: every line as long as the header
    lines = out.strip().splitlines()
    assert len({len(line) for line in lines}) == 1


def test_budget_command_errors_and_help(capsys):
    assert (
        cli.main(
            ["budget", "--sample-rate", "2", "--rounds", "10", "--delta", "1e-5", "--sigma", "1"]
        )
        == 2
    )
    assert "error: --sample-rate must be in (0, 1], got 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["budget", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for word in ("--sample-rate", "--rounds", "--delta", "--epsilon", "--sigma", "example:"):
        assert word in help_text
    with pytest.raises(SystemExit):
        cli.main(["budget", "--sample-rate", "1", "--rounds", "10", "--delta", "1e-5"])
