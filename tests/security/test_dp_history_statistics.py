"""A DP run's history.json must hold no statistic computed from raw individual updates unless declared.

The mean training loss, the median update norm and the exact cohort size are
statistics of the clients' raw data with no noise; under user-level DP they stay
out of the per-round history, and every field that remains is declared (with the
reason it may be there) in the privacy report's ``history_fields``. A run without
DP still records them, so the test is not vacuous.
"""

from __future__ import annotations

import json

import pytest

from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out
from gfmfr_secure.simulation.dp import DP_HISTORY_FIELDS
from gfmfr_secure.simulation.loop import run_federated

RAW = {"loss", "median_norm", "cohort"}
SMALL = [
    "train.rounds=2", "train.local_epochs=1", "train.batch_size=16", "fusion.server_epochs=1", "fusion.embedding_dim=16",
    "model.latent_dim=8", "grouping.num_groups=3", "eval.ks=[5,10]", "train.patience=0", "grouping.method=oblivious",
    "train.selection=last", "train.client_fraction=0.6",
]


def _keys(history: list[dict]) -> set[str]:
    out: set[str] = set()
    for rec in history:
        out |= set(rec)
        out |= {f"dp.{k}" for k in rec.get("dp", {})}
    return out


@pytest.fixture(scope="module")
def split(tiny_synthetic):
    return leave_one_out(tiny_synthetic)


@pytest.mark.parametrize(
    "extra",
    [
        ["privacy.mechanism=central", "privacy.noise_multiplier=1", "privacy.adaptive_clip=true"],
        ["privacy.mechanism=local", "privacy.noise_multiplier=1"],
    ],
    ids=["central-adaptive", "local"],
)
def test_dp_history_holds_only_declared_released_fields(tiny_synthetic, split, extra) -> None:
    run = run_federated(with_overrides(config_from_dict({"method": "gfmfr"}), SMALL + extra), tiny_synthetic, split, progress=False)
    keys = _keys(run.history)
    assert not keys & RAW and not {f"dp.{k}" for k in RAW} & keys
    top = {k for k in keys if not k.startswith("dp.")}
    assert top <= set(DP_HISTORY_FIELDS), top - set(DP_HISTORY_FIELDS)
    assert {k for k in keys if k.startswith("dp.")} <= {"dp.clip", "dp.epsilon"}
    for rec in run.history:
        assert "bytes_up_per_client" not in rec.get("cost", {})  # plain: the mean count of touched rows
    report = run.metrics["privacy"]
    assert report["history_fields"] == DP_HISTORY_FIELDS and report["epsilon"] is not None
    json.dumps(run.history)


def test_without_dp_the_raw_statistics_are_recorded(tiny_synthetic, split) -> None:
    run = run_federated(with_overrides(config_from_dict({"method": "gfmfr"}), SMALL), tiny_synthetic, split, progress=False)
    assert {"loss", "cohort"} <= _keys(run.history)
