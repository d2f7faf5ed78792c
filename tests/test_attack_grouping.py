"""Group membership: known where the server's view carries it, stated at round 0 of oblivious
grouping, inferred from the broadcast group preferences otherwise."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from attacks.cli import attack_summary_lines
from attacks.grouping import partition_match
from attacks.suite import group_results, run_view_attacks
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.simulation.views import ViewRecorder

G, N, ITEMS = 3, 60, 30


class _Split:
    """The part of a split the teacher attack reads: each user's training items."""

    def __init__(self, items: list[np.ndarray]) -> None:
        self.items = items

    def train_of(self, user: int) -> np.ndarray:
        return self.items[user]


def _planted(seed: int = 0) -> tuple[np.ndarray, torch.Tensor, _Split]:
    """Users of group g pick items of block g; group g's preferences are high on block g."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(G), N // G)
    blocks = np.array_split(np.arange(ITEMS), G)
    items = [np.unique(rng.choice(blocks[g], 4)) for g in truth]
    teacher = torch.rand(G, ITEMS, generator=torch.Generator().manual_seed(seed)) * 0.2 + 0.3
    for g in range(G):
        teacher[g, blocks[g]] += 0.4
    return truth, teacher, _Split(items)


def _views(round_idx: int, grouping: str, truth: np.ndarray, teacher: torch.Tensor, per_client: dict[str, Any] | None,
           counts: list[float] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    received: dict[str, Any] = {"group_counts": torch.tensor(counts if counts is not None else np.bincount(truth, minlength=G), dtype=torch.float32)}
    if per_client is not None:
        received["per_client"] = per_client
    server = {"round": round_idx, "meta": {"n_groups": G, "grouping": grouping}, "truth": {"clients": np.arange(truth.size), "groups": truth}, "received": received}
    return server, {"released": {"teacher": teacher}}


def _by_key(results: list[Any]) -> dict[tuple[str, str], Any]:
    return {(r.name, r.observer): r for r in results}


def test_partition_match_ignores_group_names() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    m = partition_match(np.array([2, 2, 0, 0, 1, 1]), truth)
    assert m["match_rate"] == 0.0 and m["relabelled_match_rate"] == 1.0 and m["n_matched"] == 6
    assert partition_match(np.array([0, 0, 1, 1, 2, 0]), truth)["relabelled_match_rate"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="entries"):
        partition_match(np.zeros(3, int), truth)


def test_plain_oblivious_round0_is_known_and_teacher_attack_is_stated() -> None:
    truth, teacher, split = _planted()
    server, outsider = _views(0, "oblivious", truth, teacher, {"group": truth.copy()})
    res = _by_key(group_results(server, outsider, split))
    known = res[("group-membership-known", "server")]
    assert known.metrics["relabelled_match_rate"] == 1.0 and known.metrics["match_rate"] == 1.0 and "auc" not in known.metrics
    assert known.details["kind"] == "known" and "upload" in known.details["source"]
    stated = res[("group-membership-from-teacher", "outsider")]
    assert stated.metrics == {} and "random partition" in stated.details["statement"] and "chance by construction" in stated.details["statement"]
    assert ("group-membership-from-teacher", "server") not in res  # the server knows: no attack figure for it
    text = "\n".join(attack_summary_lines(list(res.values()), []))
    assert "group-membership-known (server): known, not inferred" in text and "60 of 60 clients" in text
    assert "| group-membership-from-teacher |" not in text  # no chance-level AUC row


def test_round1_teacher_attack_on_planted_preferences() -> None:
    truth, teacher, split = _planted()
    server, outsider = _views(1, "oblivious", truth, teacher, {"group": truth.copy()})
    res = _by_key(group_results(server, outsider, split))
    attack = res[("group-membership-from-teacher", "outsider")]
    assert attack.metrics["auc"] > 0.9 and attack.metrics["accuracy"] > 0.9
    assert attack.metrics["baseline_accuracy"] == pytest.approx(1 / 3)
    assert ("group-membership-known", "server") in res


def test_secure_sums_round1_server_attacks_like_the_outsider() -> None:
    truth, teacher, split = _planted()
    server, outsider = _views(1, "oblivious", truth, teacher, None)
    res = _by_key(group_results(server, outsider, split))
    assert ("group-membership-known", "server") not in res
    assert res[("group-membership-from-teacher", "server")].metrics == res[("group-membership-from-teacher", "outsider")].metrics
    server, outsider = _views(0, "oblivious", truth, teacher, None)
    res = _by_key(group_results(server, outsider, split))
    assert all(r.metrics == {} and "random partition" in r.details["statement"] for r in res.values())
    assert set(res) == {("group-membership-from-teacher", "server"), ("group-membership-from-teacher", "outsider")}


def test_single_non_empty_group_is_known_from_the_counts() -> None:
    truth, teacher, split = _planted()
    one = np.full(N, 2)
    server, outsider = _views(1, "oblivious", one, teacher, None, counts=[0.0, 0.0, float(N)])
    res = _by_key(group_results(server, outsider, split))
    known = res[("group-membership-known", "server")]
    assert known.metrics["relabelled_match_rate"] == 1.0 and "group counts" in known.details["source"]
    attack = res[("group-membership-from-teacher", "outsider")]
    assert attack.metrics["baseline_accuracy"] == 1.0 and "a single group is occupied" in attack.details["source"]


def test_server_grouping_is_recovered_from_the_uploaded_heads() -> None:
    truth, teacher, split = _planted()
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(G, 6)) * 5.0
    heads = torch.tensor(centres[truth] + rng.normal(size=(N, 6)) * 0.1, dtype=torch.float32)
    names = np.array([2, 0, 1])[truth]  # the server's names for the groups are arbitrary
    stale = np.roll(names, 7)  # the upload's group field is the client's previous group
    server, outsider = _views(1, "spectral", names, teacher, {"group": stale, "head_after": heads})
    res = _by_key(group_results(server, outsider, split, grouping_options={"use_pca": False, "pca_variance": 0.95, "seed": 0}))
    known = res[("group-membership-known", "server")]
    assert known.metrics["relabelled_match_rate"] == 1.0 and "re-clustered" in known.details["source"]


def test_no_groups_is_stated() -> None:
    truth, teacher, split = _planted()
    server, outsider = _views(0, "spectral", truth, teacher, None)
    server["meta"]["n_groups"] = 0
    server["truth"]["groups"] = None
    res = group_results(server, outsider, split)
    assert {r.observer for r in res} == {"server", "outsider"} and all("no groups" in r.details["statement"] for r in res)


SMALL = [
    "train.rounds=2", "train.local_epochs=2", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=2", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "grouping.min_group_size=2", "eval.ks=[5,10]", "train.patience=0", "grouping.method=oblivious",
]


def test_recorded_plain_oblivious_run(tmp_path, tiny_synthetic) -> None:
    """A trained run's views: the server knows every round's groups; round 0 is stated, round 1 attacked."""
    split = leave_one_out(tiny_synthetic)
    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), SMALL)
    run_federated(cfg, tiny_synthetic, split, progress=False, callbacks=[ViewRecorder(tmp_path, [0, 1])])
    r0 = _by_key(run_view_attacks(tmp_path, 0, tiny_synthetic, split, imia_clients=0, num_negatives=cfg.train.num_negatives, attribute_folds=2))
    assert r0[("group-membership-known", "server")].metrics["match_rate"] == 1.0
    assert "random partition" in r0[("group-membership-from-teacher", "outsider")].details["statement"]
    assert ("attribute-gender-from-reconstruction", "server") in r0 and ("attribute-gender-from-uploaded-rows", "server") in r0
    assert r0[("attribute-inference", "outsider")].metrics == {}
    r1 = _by_key(run_view_attacks(tmp_path, 1, tiny_synthetic, split, imia_clients=0, num_negatives=cfg.train.num_negatives, attribute_folds=0))
    assert r1[("group-membership-known", "server")].metrics["match_rate"] == 1.0
    assert "auc" in r1[("group-membership-from-teacher", "outsider")].metrics
    assert not any(name.startswith("attribute") for name, _ in r1)
