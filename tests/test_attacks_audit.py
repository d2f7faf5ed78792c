"""The one-run DP audit (Steinke, Nasr and Jagielski 2023): the bound, and `audit` catching too little noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import attacks.cli as attack_cli
import gfmfr_secure.privacy.release as release_mod
from attacks.audit import one_run_attainable_epsilon, one_run_audit, one_run_epsilon_lower_bound, one_run_p_value
from attacks.canary_audit import AuditPowerWarning, gradient_canary_audit
from gfmfr_secure.cli import main
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out

TINY = [
    "train.rounds=2", "train.local_epochs=1", "train.batch_size=16", "fusion.server_epochs=1", "fusion.embedding_dim=16",
    "model.latent_dim=8", "grouping.num_groups=3", "eval.ks=[5,10]", "train.patience=0", "grouping.method=oblivious",
    "train.selection=last", "privacy.mechanism=central", "privacy.epsilon=1", "privacy.delta=1e-4",
]


def test_p_value_golden() -> None:
    # delta = 0: the binomial tail; 10 of 10 correct at eps = 0 (fair coins) has probability 2^-10
    assert one_run_p_value(10, 10, 10, 0.0, 0.0) == pytest.approx(0.5**10)
    # m = r = v = 2, eps = 0, delta = 0.1: f(2) = 1/4; (f(1) - f(2)) / 1 = pmf(1) = 1/2,
    # (f(0) - f(2)) / 2 = (1/2 + 1/4) / 2 = 3/8; p = 1/4 + 2 * 2 * 0.1 * 1/2 = 0.45
    assert one_run_p_value(2, 2, 2, 0.0, 0.1) == pytest.approx(0.45)
    # q = e / (1 + e) at eps = 1; 2 of 3 correct: P[Bin(3, q) >= 2] = 3 q^2 (1 - q) + q^3
    q = math.e / (1 + math.e)
    assert one_run_p_value(5, 3, 2, 1.0, 0.0) == pytest.approx(3 * q * q * (1 - q) + q**3)
    assert one_run_p_value(5, 3, 0, 1.0, 0.5) == 1.0
    with pytest.raises(ValueError):
        one_run_p_value(3, 4, 2, 1.0, 0.0)


def test_bound_golden() -> None:
    # all r correct, delta = 0: q^r = beta, eps = log(q / (1 - q)), q = beta^(1/r)
    for r in (10, 1000):
        q = 0.05 ** (1 / r)
        assert one_run_epsilon_lower_bound(r, r, r, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert one_run_attainable_epsilon(1000, 1000, 0.0) == pytest.approx(5.80907, abs=1e-4)
    # delta lowers the bound; half the guesses right is no evidence
    assert one_run_attainable_epsilon(1000, 1000, 1e-4) < one_run_attainable_epsilon(1000, 1000, 0.0)
    assert one_run_epsilon_lower_bound(100, 100, 50, 1e-5) == 0.0
    # at the bound the p-value is beta
    eps = one_run_epsilon_lower_bound(1000, 200, 180, 1e-5, 0.05)
    assert one_run_p_value(1000, 200, 180, eps, 1e-5) == pytest.approx(0.05, abs=1e-4)


def test_one_run_audit_perfect_and_random_guesses() -> None:
    rng = np.random.default_rng(0)
    inc = rng.random(400) < 0.5
    perfect = one_run_audit(inc.astype(float), inc, 0.0)
    # with 400 guesses some "in" guesses must fall on excluded canaries (about 200 are in); 200 are all right
    assert (perfect.r, perfect.v) == (200, 200)
    assert perfect.eps_lb == pytest.approx(one_run_epsilon_lower_bound(400, 200, 200, 0.0, 0.05 / 4))
    assert perfect.attainable == pytest.approx(one_run_attainable_epsilon(400, 400, 0.0, 0.05 / 4), abs=1e-5)
    noise = one_run_audit(rng.normal(size=400), inc, 0.0)
    assert noise.eps_lb < 0.5


def _cfg(*extra: str):
    return with_overrides(config_from_dict({"method": "gfmfr"}), TINY + list(extra))


@pytest.fixture()
def synthetic_load(tiny_synthetic, monkeypatch):
    """`audit` on the tiny synthetic data set instead of a data folder."""
    split = leave_one_out(tiny_synthetic)
    monkeypatch.setattr(attack_cli, "_load", lambda path, overrides, data_dir: (_cfg(*overrides), tiny_synthetic, split))


def test_audit_catches_ten_times_too_little_noise(synthetic_load, tmp_path, monkeypatch) -> None:
    args = ["audit", "synthetic", "--seeds", "0", "--canaries", "300"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    ok = json.loads((tmp_path / "ok" / "audit.json").read_text())[0]
    assert ok["passed"] and ok["can_fail"] and ok["eps_lower"] <= ok["eps_claimed"] <= 1.0

    real = release_mod.central_noise  # every releasing party's draw (Release.central)
    monkeypatch.setattr(release_mod, "central_noise", lambda layout, std, key: real(layout, std / 10.0, key))
    assert main([*args, "--out", str(tmp_path / "weak")]) == 1
    text = (tmp_path / "weak" / "audit.json").read_text()
    assert "NaN" not in text
    weak = json.loads(text)[0]
    assert not weak["passed"] and weak["eps_lower"] > weak["eps_claimed"] and weak["v"] <= weak["r"]
    assert weak["mean_in"] > weak["mean_out"]


def test_audit_warns_when_it_cannot_fail(tiny_synthetic) -> None:
    split = leave_one_out(tiny_synthetic)
    with pytest.warns(AuditPowerWarning, match="cannot fail"):
        res = gradient_canary_audit(_cfg("privacy.epsilon=8", "train.rounds=1"), tiny_synthetic, split, n_canaries=20, seed=0)
    assert not res["can_fail"] and res["attainable"] < 8 and res["rounds"] == 1
