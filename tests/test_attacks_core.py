"""Tests for the attack metrics, the DP audit bound and the attack registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata

from attacks.audit import AuditResult, AuditViolation, check_audit, empirical_epsilon
from attacks.base import Attack, AttackRegistry, AttackResult, as_array, make_rng
from attacks.metrics import (
    aggregate_runs,
    attack_metrics,
    bootstrap_metric,
    clopper_pearson,
    plot_roc,
    roc_points,
    tpr_at_fpr,
    tpr_key,
)

# --------------------------------------------------------------------------- metrics


def test_attack_metrics_golden_small_example():
    # the classic four-point example: AUC 3/4
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    m = attack_metrics(y, s)
    assert m["auc"] == pytest.approx(0.75)
    # thresholds 0.8 / 0.4 / 0.35 / 0.1 give accuracies 3/4, 2/4, 3/4, 2/4
    assert m["best_accuracy"] == pytest.approx(0.75)
    # F1 at >= 0.35: TP 2, FP 1, FN 0 -> 4/5
    assert m["best_f1"] == pytest.approx(0.8)
    # only the threshold 0.8 has FPR 0: TPR 1/2
    assert m[tpr_key(0.01)] == pytest.approx(0.5)
    assert m[tpr_key(0.001)] == pytest.approx(0.5)
    assert m["baseline_auc"] == 0.5
    assert m["baseline_accuracy"] == pytest.approx(0.5)
    assert m["baseline_f1"] == pytest.approx(2 / 3)
    assert m["baseline_" + tpr_key(0.01)] == pytest.approx(0.01)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (4.0, 2.0, 2.0)
    assert tpr_key(0.01) == "tpr_at_fpr_0.01"


def test_tpr_at_fpr_is_not_interpolated():
    # 10 negatives: FPR steps of 0.1; one negative scores above every positive
    y = np.r_[np.ones(5), np.zeros(10)]
    s = np.r_[[0.9, 0.8, 0.7, 0.6, 0.5], [0.95], np.linspace(0.0, 0.4, 9)]
    # FPR <= 0.05 only at the threshold +inf: TPR 0 (an interpolated curve would give > 0)
    assert tpr_at_fpr(y, s, 0.05) == 0.0
    # FPR 0.1 reached after the top negative: all positives follow before any other negative
    assert tpr_at_fpr(y, s, 0.1) == 1.0
    fpr, tpr, thr = roc_points(y, s)
    assert thr[0] == np.inf and thr.size == fpr.size
    assert fpr[0] == 0.0 and tpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_attack_metrics_perfect_and_inverted():
    y = np.r_[np.zeros(50), np.ones(50)]
    s = np.arange(100.0)
    m = attack_metrics(y, s)
    assert m["auc"] == 1.0 and m[tpr_key(0.001)] == 1.0
    assert m["best_accuracy"] == 1.0 and m["best_f1"] == 1.0
    inv = attack_metrics(y, -s)
    assert inv["auc"] == 0.0 and inv[tpr_key(0.01)] == 0.0
    # "everybody is a member" is always available
    assert inv["best_accuracy"] == pytest.approx(0.5)
    assert inv["best_f1"] == pytest.approx(2 / 3)


def test_attack_metrics_on_noise_is_near_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    m = attack_metrics(y, rng.normal(size=4000))
    assert 0.47 < m["auc"] < 0.53
    assert m[tpr_key(0.01)] < 0.05
    assert m["best_accuracy"] < m["baseline_accuracy"] + 0.04


@pytest.mark.parametrize(
    "y, s",
    [
        ([0, 1, 1], [0.1, 0.2]),  # length mismatch
        ([0, 1, 1], [0.1, np.nan, 0.3]),  # NaN
        ([1, 1, 1], [0.1, 0.2, 0.3]),  # one class
        ([0, 1, 2], [0.1, 0.2, 0.3]),  # not binary
        ([[0, 1]], [[0.1, 0.2]]),  # not 1-D
    ],
)
def test_attack_metrics_rejects_bad_input(y, s):
    with pytest.raises(ValueError):
        attack_metrics(y, s)


def test_clopper_pearson_known_values():
    # k = 0 and k = n have closed forms: (alpha/2)^(1/n)
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-10)
    assert hi == pytest.approx(0.30850, abs=1e-5)
    lo, hi = clopper_pearson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10), abs=1e-10)
    # tabulated: 5 of 10 -> (0.1871, 0.8129)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-5) and hi == pytest.approx(0.81291, abs=1e-5)
    # one-sided 95% upper bound for 0 of 10: 1 - 0.05^(1/10) (rule-of-three territory)
    assert clopper_pearson(0, 10, two_sided=False)[1] == pytest.approx(1 - 0.05 ** 0.1, abs=1e-10)
    assert clopper_pearson(0, 1000, two_sided=False)[1] == pytest.approx(3 / 1000, rel=0.01)
    for bad in [(-1, 5), (6, 5), (1, 0), (1.5, 4)]:
        with pytest.raises(ValueError):
            clopper_pearson(*bad)
    with pytest.raises(ValueError):
        clopper_pearson(1, 5, alpha=0.0)


def test_aggregate_runs_mean_and_std():
    runs = [{"auc": 0.6, "acc": 0.5, "note": "x"}, {"auc": 0.7, "acc": 0.6, "note": "y"}, {"auc": 0.8, "acc": 0.7}]
    agg = aggregate_runs(runs)
    assert set(agg) == {"auc", "acc"}
    assert agg["auc"]["mean"] == pytest.approx(0.7)
    assert agg["auc"]["std"] == pytest.approx(0.1)  # ddof = 1
    assert agg["auc"]["sem"] == pytest.approx(0.1 / math.sqrt(3))
    assert (agg["auc"]["min"], agg["auc"]["max"], agg["auc"]["n"]) == (0.6, 0.8, 3.0)
    assert aggregate_runs([{"auc": 0.5}])["auc"]["std"] == 0.0
    with pytest.raises(ValueError):
        aggregate_runs([])


def test_bootstrap_metric_is_seeded_and_brackets_the_value():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = y + rng.normal(size=300)
    a = bootstrap_metric(y, s, n_boot=60, seed=3)
    b = bootstrap_metric(y, s, n_boot=60, seed=3)
    assert a == b
    assert a["lo"] < a["value"] < a["hi"]
    assert 0.0 < a["std"] < 0.1
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_metric(y, s, metric="nope", n_boot=5, seed=0)


def test_plot_roc_writes_png(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    path = plot_roc({"signal": (y, y + rng.normal(size=200)), "noise": (y, rng.normal(size=200))}, tmp_path / "sub" / "roc.png", "test")
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_roc({}, tmp_path / "empty.png", "")


# --------------------------------------------------------------------------- audit


def test_audit_golden_perfect_separation():
    # 100 IN runs all score 1, 100 OUT runs all score 0: FP = FN = 0 at threshold 1;
    # the two-sided 95% Clopper-Pearson upper bound of 0/100 is 1 - 0.025^(1/100)
    hi = 1 - 0.025 ** (1 / 100)
    res = empirical_epsilon(np.ones(100), np.zeros(100), delta=0.0)
    assert res.eps_lb == pytest.approx(math.log((1 - hi) / hi), abs=1e-9)
    assert res.eps_lb == pytest.approx(3.2813, abs=1e-3)
    assert (res.fp, res.fn, res.threshold, res.n_in, res.n_out) == (0, 0, 1.0, 100, 100)
    assert res.fpr_hi == pytest.approx(hi) and res.fnr_hi == pytest.approx(hi)
    # with delta the numerator shrinks by delta
    res_d = empirical_epsilon(np.ones(100), np.zeros(100), delta=0.01)
    assert res_d.eps_lb == pytest.approx(math.log((1 - 0.01 - hi) / hi), abs=1e-9)
    # one-sided bounds are tighter, so the bound is larger
    hi1 = 1 - 0.05 ** (1 / 100)
    res1 = empirical_epsilon(np.ones(100), np.zeros(100), delta=0.0, two_sided=False)
    assert res1.eps_lb == pytest.approx(math.log((1 - hi1) / hi1), abs=1e-9)
    assert isinstance(res.to_dict(), dict) and res.to_dict()["eps_lb"] == res.eps_lb


def test_audit_golden_counts_at_fixed_threshold():
    # IN: 3 of 20 below 0.5 (FN = 3); OUT: 2 of 30 at or above 0.5 (FP = 2)
    s_in = np.r_[np.full(3, 0.2), np.full(17, 0.9)]
    s_out = np.r_[np.full(2, 0.7), np.full(28, 0.1)]
    res = empirical_epsilon(s_in, s_out, delta=1e-5, threshold=0.5)
    fpr_hi = clopper_pearson(2, 30)[1]
    fnr_hi = clopper_pearson(3, 20)[1]
    want = max(math.log((1 - 1e-5 - fnr_hi) / fpr_hi), math.log((1 - 1e-5 - fpr_hi) / fnr_hi))
    assert (res.fp, res.fn) == (2, 3)
    assert res.eps_lb == pytest.approx(max(want, 0.0), abs=1e-9)
    assert res.direction == "fpr"


def test_audit_identical_distributions_give_zero():
    rng = np.random.default_rng(4)
    same = rng.normal(size=200)
    res = empirical_epsilon(same, same.copy(), delta=1e-5)
    assert res.eps_lb == 0.0 and math.isnan(res.threshold) and res.direction == ""
    # independent draws from one distribution: still no evidence of leakage
    res2 = empirical_epsilon(rng.normal(size=300), rng.normal(size=300), delta=1e-5)
    assert res2.eps_lb == 0.0


def test_audit_separated_distributions_give_positive_bound():
    rng = np.random.default_rng(5)
    res = empirical_epsilon(rng.normal(4.0, 1.0, 300), rng.normal(0.0, 1.0, 300), delta=1e-5)
    assert res.eps_lb > 2.0
    # bound can never exceed the perfect-separation bound at these sample sizes
    assert res.eps_lb <= empirical_epsilon(np.ones(300), np.zeros(300), delta=1e-5).eps_lb + 1e-12
    # scores are oriented "higher = in": a reversed test shows nothing
    rev = empirical_epsilon(-rng.normal(4.0, 1.0, 300), -rng.normal(0.0, 1.0, 300), delta=1e-5)
    assert rev.eps_lb == 0.0


def test_audit_second_inequality():
    # no IN run below 1 (FN = 0) but 10 of 100 OUT runs at 1 (FP = 10): the bound
    # (1 - delta - FPR_hi) / FNR_hi is the larger one
    res = empirical_epsilon(np.ones(100), np.r_[np.ones(10), np.zeros(90)], delta=0.0)
    fpr_hi = clopper_pearson(10, 100)[1]
    fnr_hi = clopper_pearson(0, 100)[1]
    assert (res.fp, res.fn, res.direction) == (10, 0, "fnr")
    assert res.eps_lb == pytest.approx(math.log((1 - fpr_hi) / fnr_hi), abs=1e-9)


def test_check_audit_raises_on_violation():
    res = empirical_epsilon(np.ones(100), np.zeros(100), delta=0.0)
    with pytest.raises(AuditViolation, match="exceeds the claimed epsilon"):
        check_audit(res, 1.0)
    with pytest.raises(AssertionError):
        check_audit(2.5, 2.0)
    check_audit(res, 8.0)
    check_audit(2.5, 2.0, tol=0.6)
    check_audit(0.0, 0.0)
    check_audit(res, math.inf)
    with pytest.raises(ValueError):
        check_audit(float("nan"), 1.0)
    assert issubclass(AuditViolation, AssertionError)
    assert isinstance(res, AuditResult)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scores_in": [], "scores_out": [0.1], "delta": 0.0},
        {"scores_in": [0.1], "scores_out": [0.2], "delta": 1.0},
        {"scores_in": [0.1], "scores_out": [0.2], "delta": -0.1},
        {"scores_in": [np.nan], "scores_out": [0.2], "delta": 0.0},
        {"scores_in": [0.1], "scores_out": [0.2], "delta": 0.0, "alpha": 1.5},
    ],
)
def test_audit_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        empirical_epsilon(**kwargs)


# --------------------------------------------------------------------------- base


def _dummy_run(**_: object) -> AttackResult:
    return AttackResult("dummy", "server", {"auc": 0.5}, 3)


def test_registry_duplicates_and_unknown_names():
    reg = AttackRegistry()
    reg.register(Attack("imia", "server", _dummy_run, "interaction-level"))
    reg.register(Attack("lira", "outsider", _dummy_run))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Attack("imia", "server", _dummy_run))
    with pytest.raises(ValueError, match="known: imia, lira"):
        reg.get("nope")
    assert reg.get("imia").observer == "server"
    assert reg.names() == ["imia", "lira"] and reg.names("outsider") == ["lira"]
    assert "lira" in reg and len(reg) == 2 and list(reg) == ["imia", "lira"]
    with pytest.raises(ValueError, match="unknown observer"):
        reg.names("client")


def test_attack_and_result_validation():
    with pytest.raises(ValueError, match="unknown observer"):
        Attack("x", "client", _dummy_run)
    with pytest.raises(ValueError):
        Attack("", "server", _dummy_run)
    with pytest.raises(TypeError):
        Attack("x", "server", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AttackResult("x", "nobody", {}, 1)
    with pytest.raises(ValueError):
        AttackResult("x", "server", {}, -1)
    r = AttackResult("x", "server", {"auc": np.float64(0.7)}, 5, {"k": 1})
    assert r.to_dict() == {"name": "x", "observer": "server", "metrics": {"auc": 0.7}, "n_targets": 5, "details": {"k": 1}}
    with pytest.raises(AttributeError):
        r.name = "y"  # type: ignore[misc]


def test_as_array_checks():
    assert as_array("a", [1, 2], ndim=1, dtype=np.int64).dtype == np.int64
    with pytest.raises(ValueError, match="must hold integers"):
        as_array("a", [1.5], dtype=np.int64)
    with pytest.raises(ValueError, match=r"shape \[\*, 3\]"):
        as_array("a", np.zeros((2, 2)), shape=(None, 3))
    with pytest.raises(ValueError, match="NaN"):
        as_array("a", [np.inf])
    g = np.random.default_rng(0)
    assert make_rng(g) is g
    assert make_rng(3).integers(0, 1000) == np.random.default_rng(3).integers(0, 1000)
    with pytest.raises(ValueError):
        make_rng(-1)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=6, max_size=40), st.integers(0, 2**32 - 1))
def test_attack_metrics_invariant_to_monotone_transforms(scores, seed):
    s = np.asarray(scores)
    y = np.random.default_rng(seed).integers(0, 2, s.size)
    y[0], y[1] = 0, 1
    a = attack_metrics(y, s)
    b = attack_metrics(y, rankdata(s, method="dense") * 3.0 - 100.0)  # strictly increasing, ties kept
    for k in ("auc", "tpr_at_fpr_0.01", "best_accuracy", "best_f1"):
        assert a[k] == pytest.approx(b[k])
        assert 0.0 <= a[k] <= 1.0
    assert a["best_accuracy"] >= a["baseline_accuracy"] - 1e-12
    assert a["best_f1"] >= a["baseline_f1"] - 1e-12
