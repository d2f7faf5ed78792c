"""An active malicious server (issue 18, part 5): every attack is played, with its defence off and on.

1. crafted broadcast model amplifying the target (model inconsistency), 2. crafted centroids
isolating the target (and lying group counts), 3. lying about dropouts during unmasking,
4. shrinking the cohort to the target, 5. Sybils filling the target's group. Figures and
threat models: docs/active-attacks.md (``python -m attacks.active``).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attacks.active import unmasking as um
from attacks.active.broadcast import broadcast_attack, consistency_refusals
from attacks.active.grouping import centroid_attack, count_phase_round, isolating_centroids, lying_counts
from attacks.active.sybil import sybil_attack
from gfmfr_secure.client import checks
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out
from gfmfr_secure.secagg.masking import SecAggConfig, SecAggError, neighbourhood_graph, secure_sum
from gfmfr_secure.server.grouping import nearest_centroid
from gfmfr_secure.roles import server as server_role
from gfmfr_secure.simulation import loop
from gfmfr_secure.simulation.dp import plan_privacy

SMALL = [
    "train.rounds=2", "train.local_epochs=1", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=1", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "eval.ks=[5,10]", "train.patience=0", "grouping.method=oblivious", "aggregation.neighbours=8",
    "train.selection=last", "aggregation.backend=masking",
]
#: DP configurations: the presets' clip, 20 rounds, every client each round; reproducible noise for a repeatable test
DP = ["privacy.clip=0.02", "train.rounds=20", "secrets=reproducible"]


def _cfg(method: str, *extra: str):
    return with_overrides(config_from_dict({"method": method}), SMALL + list(extra))


def _broadcast_cfg(*extra: str):
    """FedRAP as configured by default (5 local epochs), d = 16, masking over the complete graph."""
    return with_overrides(config_from_dict({"method": "fedrap"}), ["distill.enabled=false", "model.latent_dim=16", "aggregation.backend=masking", "aggregation.neighbours=0", *extra])


@pytest.fixture(scope="module")
def split(tiny_synthetic):
    return leave_one_out(tiny_synthetic)


@pytest.fixture(scope="module")
def cohort(split) -> np.ndarray:
    return np.flatnonzero(split.train_counts() > 0)[:20]


def _no_majority_check(self, graph) -> None:
    """The threshold check without the strict majority (what an insecure deployment would accept)."""
    if self.threshold > graph.neighbourhood_size:
        raise ValueError("threshold too large")


# --------------------------------------------------------------------------- 1. crafted broadcast


def test_inconsistent_broadcast_exposes_the_target_through_masking(split, cohort) -> None:
    """The target alone gets the amplifying model: its items read off the masked sum; honestly they do not."""
    cfg = _broadcast_cfg()
    target = int(cohort[0])
    honest = broadcast_attack(cfg, split, cohort, target, mode="honest")
    crafted = broadcast_attack(cfg, split, cohort, target, mode="inconsistent")
    assert honest.metrics["exact"] == 0.0 and honest.metrics["auc"] < 0.8 and honest.metrics["f1_at_k"] < 0.5
    assert crafted.metrics["exact"] == 1.0 and crafted.metrics["auc"] == 1.0  # every item of the target, nothing else
    assert crafted.target_norm > 20 * honest.target_norm  # the crafted model amplified the target's update


def test_consistency_check_makes_the_target_refuse(split, cohort) -> None:
    cfg = _broadcast_cfg()
    target = int(cohort[0])
    out = broadcast_attack(cfg, split, cohort, target, mode="inconsistent", check=True)
    assert out.refused == (target,)  # the target saw no neighbour attest its broadcast; everyone else uploaded
    assert out.metrics["exact"] == 0.0 and out.metrics["auc"] < 0.8  # the released sum holds nothing of the target
    honest = broadcast_attack(cfg, split, cohort, target, mode="honest", check=True)
    assert honest.refused == ()  # the check costs an honest round nothing


def test_uniform_crafted_broadcast_passes_every_check_and_dp_bounds_the_inconsistent_one(split, cohort) -> None:
    """Sent to everyone, the crafted model is not detectable and does not isolate the target; under
    distributed DP (epsilon 8 over 20 rounds) even the inconsistent broadcast no longer exposes it."""
    cfg = _broadcast_cfg()
    target = int(cohort[0])
    uniform = broadcast_attack(cfg, split, cohort, target, mode="uniform", check=True)
    assert uniform.refused == () and uniform.metrics["exact"] == 0.0 and uniform.metrics["f1_at_k"] < 0.5
    dp_cfg = with_overrides(cfg, ["privacy.mechanism=distributed", "privacy.epsilon=8", *DP])
    noisy = broadcast_attack(dp_cfg, split, cohort, target, mode="inconsistent", dp=plan_privacy(dp_cfg, cohort.size))
    assert noisy.metrics["exact"] == 0.0 and noisy.metrics["f1_at_k"] < 0.5
    clip_only = with_overrides(dp_cfg, ["privacy.noise_multiplier=0"])
    clipped = broadcast_attack(clip_only, split, cohort, target, mode="inconsistent", dp=plan_privacy(clip_only, cohort.size))
    assert clipped.metrics["auc"] > 0.9  # clipping alone does not: the noise is what bounds it


def test_consistency_check_rejects_forged_foreign_stale_and_missing_attestations() -> None:
    keys = {u: Ed25519PrivateKey.generate() for u in range(4)}
    pki = {u: k.public_key().public_bytes_raw() for u, k in keys.items()}
    own = checks.broadcast_digest(3, {"item_table": np.ones((2, 2), np.float32), "head": np.zeros(3, np.float32)})
    other = checks.broadcast_digest(3, {"item_table": np.ones((2, 2), np.float32) * 2, "head": np.zeros(3, np.float32)})
    good = [checks.attest_broadcast(keys[v], v, 3, own) for v in (1, 2, 3)]
    checks.check_consistent_broadcast(0, 3, own, good, pki, (1, 2, 3), 3)
    forged = bytearray(good[0])
    forged[20] ^= 1  # the server rewrites a byte of a neighbour's digest
    cases = {
        "different broadcast": [checks.attest_broadcast(keys[1], 1, 3, other), *good[1:]],
        "forged or tampered": [bytes(forged), *good[1:]],
        "for round 2": [checks.attest_broadcast(keys[1], 1, 2, own), *good[1:]],
        "not its neighbour": [*good, checks.attest_broadcast(keys[0], 0, 3, own)],
        "only 2 neighbours attested": good[:2],
        "two broadcast attestations": [good[0], *good],
    }
    for message, attestations in cases.items():
        with pytest.raises(checks.ClientRefusal, match=message):
            checks.check_consistent_broadcast(0, 3, own, attestations, pki, (0, 1, 2, 3), 3)
    assert consistency_refusals(0, {0: own, 1: other, 2: other, 3: other}, min_matching=2) == [0]


# --------------------------------------------------------------------------- 2. crafted centroids


def test_isolating_centroids_leave_the_target_alone() -> None:
    feats = np.random.default_rng(0).normal(size=(40, 9))
    centroids = isolating_centroids(feats, 7, 3, trap=1)
    groups = nearest_centroid(feats, centroids)
    assert groups[7] == 1 and (np.delete(groups, 7) != 1).all()
    inside = np.vstack([feats, feats.mean(0)])  # the centroid of the others is inside their hull
    with pytest.raises(ValueError, match="inside the convex hull"):
        isolating_centroids(inside, 40, 3)


def test_crafted_centroids_expose_the_target_only_without_the_floor_or_with_unchecked_lying_counts(tiny_synthetic, split) -> None:
    """Through the masking backend: no floor, the trap group's sum is the target's upload; with the floor
    it is merged (no released group below 10 clients); a server that reports the trap's count as 10
    keeps it unmerged when the clients' count check is bypassed, and the clients refuse the round with it on."""
    cfg = _cfg("gfmfr")
    bare = centroid_attack(cfg, tiny_synthetic, split, floor_on=False)
    assert bare["isolated"] and bare["gap"] < 1e-4 and bare["inference"]["exact"] == 1.0
    floored = centroid_attack(cfg, tiny_synthetic, split, bare["target"])
    assert not floored["isolated"] and all(c < 0.5 or c >= 10 for c in floored["counts"])
    assert floored["inference"]["exact"] == 0.0 and floored["inference"]["f1_at_k"] < 0.5 and floored["gap"] > 1e-2
    lied = centroid_attack(cfg, tiny_synthetic, split, bare["target"], lie=True, counts_checked=False)
    assert lied["refused"] is None and lied["isolated"] and lied["gap"] < 1e-4 and lied["inference"]["exact"] == 1.0
    checked = centroid_attack(cfg, tiny_synthetic, split, bare["target"], lie=True)
    assert checked["refused"] is not None and "reported 10 clients in group 0" in checked["refused"] and not checked["isolated"]


def test_count_transcript_check_refuses_lying_counts() -> None:
    """Each client replays the count phase from its signed transcript: a reported count of 10 for a
    group of one is refused; the true counts pass; a transcript without the client's upload is refused."""
    groups = np.array([0] + [1] * 6 + [2] * 5)  # client 0 alone in the trap group
    rnd = count_phase_round(groups, 3, threshold=8)
    truth = np.bincount(groups, minlength=3).astype(float)
    lie = lying_counts(truth, 0, 10)
    transcript = rnd.transcript()
    for u in range(groups.size):
        verified = checks.verify_count_transcript(transcript, rnd.config, rnd.graph, rnd.pki, rnd.uploads[u])
        checks.check_reported_counts(truth, verified)
        with pytest.raises(checks.ClientRefusal, match="reported 10 clients in group 0, the count phase's transcript sums to 1"):
            checks.check_reported_counts(lie, verified)
    partial = type(transcript)(transcript.adverts, transcript.shares, transcript.uploads[1:], transcript.reveals)
    with pytest.raises(checks.ClientRefusal, match="does not verify|own upload is not in the transcript"):
        checks.verify_count_transcript(partial, rnd.config, rnd.graph, rnd.pki, rnd.uploads[0])
    tampered = list(transcript.uploads)
    tampered[3] = tampered[3][:-1] + bytes([tampered[3][-1] ^ 1])
    with pytest.raises(checks.ClientRefusal, match="does not verify"):
        checks.verify_count_transcript(type(transcript)(transcript.adverts, transcript.shares, tuple(tampered), transcript.reveals), rnd.config, rnd.graph, rnd.pki, rnd.uploads[0])


# --------------------------------------------------------------------------- 3. lying about dropouts


@pytest.mark.parametrize(("colluders", "succeeds"), [(0, False), (1, False), (2, True)])
def test_victim_split_with_colluders_needs_2t_at_most_m_plus_c(colluders: int, succeeds: bool) -> None:
    """README: with c colluders among the m = 6 holders and t = 4, the split fails while 2t > m + c."""
    n, t = 6, 4
    rnd = um.ProtocolRound.start(n, 16, threshold=t)
    x = np.random.default_rng(1).uniform(-1, 1, size=(n, 16)).astype(np.float32)
    rnd.upload(x)
    col = list(range(n - colluders, n))
    got = um.collect_shares(rnd, um.victim_split_plan(rnd, 0, col), col)
    assert not got.refused  # every honest holder saw a consistent request
    if not succeeds:
        with pytest.raises(ValueError, match=f"shares available, {t} required"):
            um.reconstruct(got.mask_key.get(0, []), t)
        return
    seed_b, mask_key = um.reconstruct(got.self_mask[0], t), um.reconstruct(got.mask_key[0], t)
    assert um.mask_key_matches(mask_key, rnd.mask_public(0))
    pair_seeds = {v: rnd.clients[v].pair_seed(0) for v in range(1, n)}  # what the server derives from the mask key
    assert np.abs(um.strip_masks(rnd, 0, seed_b, pair_seeds) - x[0]).max() <= 2.0 ** -rnd.config.frac_bits


@pytest.mark.parametrize(("n", "t", "majority"), [(6, 3, False), (10, 5, False), (6, 4, True), (7, 4, True), (10, 6, True)])
def test_different_dropout_stories_isolate_the_target_only_without_a_majority(n: int, t: int, majority: bool) -> None:
    """Each holder hears that only t clients survived (the target always), the rest dropped: the server
    collects the target's self-mask seed and every other client's mask key exactly when t <= n / 2."""
    with mock.patch.object(SecAggConfig, "check_graph", _no_majority_check):
        rnd = um.ProtocolRound.start(n, 16, threshold=t)
    x = np.random.default_rng(2).uniform(-1, 1, size=(n, 16)).astype(np.float32)
    rnd.upload(x)
    got = um.collect_shares(rnd, um.fake_dropout_plan(rnd, 0))
    assert not got.refused and len(got.self_mask[0]) == n  # no single request looked wrong to its holder
    short = [w for w in range(1, n) if len(got.mask_key.get(w, [])) < t]
    if majority:
        assert short  # some mask key stays below t shares: the masks between the target and it stay on
        return
    assert not short
    assert all(um.mask_key_matches(um.reconstruct(got.mask_key[w], t), rnd.mask_public(w)) for w in range(1, n))
    pair_seeds = {v: rnd.clients[v].pair_seed(0) for v in range(1, n)}
    assert np.abs(um.strip_masks(rnd, 0, um.reconstruct(got.self_mask[0], t), pair_seeds) - x[0]).max() <= 2.0 ** -rnd.config.frac_bits


# --------------------------------------------------------------------------- 4. shrinking the cohort


def test_claiming_every_other_client_dropped_is_refused() -> None:
    rnd = um.ProtocolRound.start(6, 16, threshold=4)
    rnd.upload(np.zeros((6, 16), np.float32))
    with pytest.raises(SecAggError, match="only 1 survivors listed"):
        rnd.ask(0, (0,), (1, 2, 3, 4, 5))
    x = np.random.default_rng(3).uniform(-1, 1, size=(6, 16)).astype(np.float32)
    with pytest.raises(SecAggError, match="only 1 of 6 clients uploaded"):
        secure_sum(x, value_bound=8.0, threshold=4, neighbours=None, seed=0, dropped=[1, 2, 3, 4, 5])


def test_a_cohort_of_the_target_alone_releases_nothing(tiny_synthetic, split) -> None:
    """The server samples only the target in round 1: the round is below the floor and releases nothing,
    under oblivious grouping and without groups."""
    real = server_role.sample_cohort
    only_target = lambda eligible, fraction, seed, t: np.array([5]) if t == 1 else real(eligible, fraction, seed, t)  # noqa: E731
    views = []
    with mock.patch.object(server_role, "sample_cohort", only_target):
        run = loop.run_federated(_cfg("gfmfr"), tiny_synthetic, split, progress=False, callbacks=[views.append])
        assert run.history[1]["skipped"] == "cohort below grouping.min_group_size"
        assert [v.round for v in views if v.observer == "server"] == [0]
        views.clear()
        run = loop.run_federated(_cfg("mm-fedrap", "grouping.method=none"), tiny_synthetic, split, progress=False, callbacks=[views.append])
        assert run.history[1]["skipped"] == "cohort below grouping.min_group_size"
        assert [v.round for v in views if v.observer == "server"] == [0]


def test_round_parameter_check_refuses_small_rounds_and_weak_thresholds() -> None:
    """checks.check_round_parameters, as every secure backend calls it before a sum (loop-level: test_active_server_loop.py)."""
    config = SecAggConfig.create(2, 16, threshold=2, value_bound=8.0)
    with pytest.raises(checks.ClientRefusal, match="round of 2 clients.*min_group_size=10"):
        checks.check_round_parameters(config, neighbourhood_graph(2, None, 0), min_group_size=10, threshold_fraction=0.6)
    graph = neighbourhood_graph(30, 8, 0)
    with pytest.raises(checks.ClientRefusal, match="threshold t=5.*need t >= 6"):
        checks.check_round_parameters(SecAggConfig.create(30, 16, threshold=5, value_bound=8.0), graph, min_group_size=10, threshold_fraction=0.6)
    checks.check_round_parameters(SecAggConfig.create(30, 16, threshold=6, value_bound=8.0), graph, min_group_size=10, threshold_fraction=0.6)


# --------------------------------------------------------------------------- 5. Sybils


def test_sybils_recover_the_target_exactly_without_dp(split) -> None:
    cohort = np.flatnonzero(split.train_counts() > 0)[:30]
    out = sybil_attack(_cfg("gfmfr", "aggregation.neighbours=0"), split, cohort, int(cohort[0]), n_sybils=9)
    assert out["count"] == pytest.approx(10.0, abs=1e-3)  # the group meets the floor of 10
    assert out["relative_error"] < 1e-2 and out["exact"] == 1.0


@pytest.mark.parametrize(("backend", "mechanism"), [("masking", "distributed"), ("ckks", "central"), ("masking", "local")])
def test_dp_noise_bounds_the_sybil_reconstruction(split, backend: str, mechanism: str) -> None:
    """At epsilon 8 (20 rounds, C = 0.02) the noise left after subtracting the Sybils dwarfs the target's upload."""
    cohort = np.flatnonzero(split.train_counts() > 0)[:30]
    cfg = _cfg("gfmfr", "aggregation.neighbours=0", f"aggregation.backend={backend}", f"privacy.mechanism={mechanism}", "privacy.epsilon=8", *DP)
    out = sybil_attack(cfg, split, cohort, int(cohort[0]), n_sybils=9, dp=plan_privacy(cfg, cohort.size))
    assert out["relative_error"] > 10.0 and out["exact"] == 0.0 and out["f1_at_k"] < 0.5
