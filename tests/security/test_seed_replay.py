"""Seed replay: an adversary who reads the run seed (config.yaml, run.json) re-derives the secrets.

In ``secrets: reproducible`` it strips a client's masks and subtracts the DP noise; in the
default ``secrets: os`` the same attack gets nothing. Training does not depend on the mode
when no noise is drawn: the masks cancel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out
from gfmfr_secure.privacy.release import ReleaseLayout, central_noise
from gfmfr_secure.rng import SecretSource
from gfmfr_secure.secagg.fixedpoint import centre, decode_sum
from gfmfr_secure.secagg.masking import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    client_secret_seed,
    neighbourhood_graph,
    secure_sum,
)
from gfmfr_secure.simulation.loop import run_federated

HEADER = 16 + 32  # upload header + commitment, before the payload
SMALL = [
    "train.rounds=2", "train.local_epochs=1", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=2", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "eval.ks=[5,10]", "train.patience=0", "grouping.method=oblivious", "aggregation.neighbours=8",
]


def _cfg(*extra: str):
    return with_overrides(config_from_dict({"method": "gfmfr"}), SMALL + list(extra))


def _replay_masks(seed: int, n: int, dim: int, threshold: int, bound: float, victim: int) -> np.ndarray:
    """uint32 [dim]: the victim's total mask (pairwise + self), recomputed from the seed alone.

    The attacker rebuilds every client from ``client_secret_seed(seed, u)`` (what the
    reproducible mode uses), replays the key rounds and masks a zero vector for the victim.
    """
    config = SecAggConfig.create(n, dim, threshold=threshold, value_bound=bound)
    graph = neighbourhood_graph(n, None, seed)
    clients = [SecAggClient(u, config, graph, client_secret_seed(seed, u)) for u in range(n)]
    pki = {u: c.identity_public_key for u, c in enumerate(clients)}
    server = SecAggServer(config, graph, pki)
    routed = server.collect_adverts([c.advertise_keys() for c in clients])
    shares = server.route_shares([m for u, c in enumerate(clients) for m in c.share_keys(routed[u], pki)])
    for u, c in enumerate(clients):
        c.receive_shares(shares.get(u, []))
    zero_upload = clients[victim].masked_upload(np.zeros(dim, dtype=np.float32))
    return np.frombuffer(zero_upload, dtype="<u4", count=dim, offset=HEADER)


@pytest.mark.parametrize("mode", ["reproducible", "os"])
def test_seed_replay_unmasks_an_upload_only_in_reproducible_mode(mode: str) -> None:
    n, dim, seed, bound, victim = 5, 512, 1234, 1.0, 2
    x = np.random.default_rng(0).uniform(-bound, bound, size=(n, dim)).astype(np.float32)
    uploads: dict[int, bytes] = {}
    result = secure_sum(x, value_bound=bound, threshold=3, neighbours=None, seed=seed, on_upload=uploads.__setitem__, secrets=mode)
    observed = np.frombuffer(uploads[victim], dtype="<u4", count=dim, offset=HEADER)
    guess = decode_sum(observed - _replay_masks(seed, n, dim, 3, bound, victim), frac_bits=result.frac_bits)
    err = np.abs(guess - x[victim]).max()
    if mode == "reproducible":
        assert err <= 2.0 ** -(result.frac_bits + 1)  # the attack recovers the input exactly
    else:
        # what is left is the victim's input under a mask the attacker cannot compute: uniform words
        residual = centre(observed - _replay_masks(seed, n, dim, 3, bound, victim))
        assert err > 100 * bound
        assert np.mean(np.abs(residual) > 2**30) > 0.4  # about half the ring's words are that large
    np.testing.assert_allclose(result.total, x.astype(np.float64).sum(0), atol=n * 2.0**-result.frac_bits)


@pytest.mark.parametrize("mode", ["reproducible", "os"])
def test_seed_replay_subtracts_dp_noise_only_in_reproducible_mode(mode: str) -> None:
    layout = ReleaseLayout(n_groups=2, n_items=50, latent_dim=4, head_size=6, count_value=0.5)
    exact = torch.randn(layout.shape, generator=torch.Generator().manual_seed(5))
    seed, round_idx, std = 77, 3, 2.0
    released = exact + central_noise(layout, std, SecretSource(mode, seed).key("dp-central", round_idx))
    replayed = central_noise(layout, std, SecretSource("reproducible", seed).key("dp-central", round_idx))
    residual = released - replayed - exact
    if mode == "reproducible":
        assert float(residual.abs().max()) < 1e-6  # the noise subtracts out (float32 rounding): the exact sum is exposed
    else:
        # the secret noise is still there, plus the attacker's wrong guess: std sqrt(2) sigma
        assert abs(float(residual.std()) - np.sqrt(2.0) * std) < 0.25 * std


def test_os_mode_secrets_are_fresh_every_run() -> None:
    a, b = SecretSource("os", 0), SecretSource("os", 0)
    assert a.key("dp-central", 0) != b.key("dp-central", 0)
    assert SecretSource("reproducible", 0).key("x") == SecretSource("reproducible", 0).key("x")
    x = np.zeros((3, 64), dtype=np.float32)
    ups: list[dict[int, bytes]] = [{}, {}]
    for captured in ups:
        secure_sum(x, value_bound=1.0, threshold=2, neighbours=None, seed=5, on_upload=captured.__setitem__)
    assert all(ups[0][u] != ups[1][u] for u in range(3))


def test_loop_replay_of_the_dp_noise(tiny_synthetic) -> None:
    """In the loop: the released (noised) sum minus the seed-derived central draw is the exact sum."""
    split = leave_one_out(tiny_synthetic)
    dp = ["privacy.mechanism=central", "privacy.noise_multiplier=1.0", "privacy.clip=0.5", "train.selection=last", "train.rounds=1"]
    for mode in ("reproducible", "os"):
        views = []
        run = run_federated(_cfg(*dp, f"secrets={mode}"), tiny_synthetic, split, progress=False, callbacks=[views.append])
        server = next(v for v in views if v.observer == "server")
        per_client = server.received["per_client"]  # plain: the server's own view of the uploads
        exact = torch.zeros_like(server.received["item_sum"])
        exact.index_add_(0, torch.from_numpy(per_client.row_items), per_client.item_delta)
        d = exact.shape[1]
        head = per_client.head_delta.shape[1]
        p = run.metrics["privacy"]
        layout = ReleaseLayout(3, exact.shape[0], d, head, p["count_scale"] * p["clip"])
        std = p["update_noise_multiplier"] * p["clip"] * p["sensitivity_factor"]  # sigma * Delta
        noise = central_noise(layout, std, SecretSource("reproducible", 0).key("dp-central", 0))  # seed 0: config.yaml
        replayed = noise[:, : exact.numel()].reshape(3, *exact.shape).sum(0)
        err = float((server.received["item_sum"] - replayed - exact).abs().max())
        assert run.metrics["privacy"]["secrets"]["mode"] == mode
        if mode == "reproducible":
            assert err < 1e-4
            assert run.metrics["privacy"]["epsilon"] is None  # no privacy claim rests on this mode
            assert "secrets=reproducible" in run.metrics["privacy"]["epsilon_withheld_because"]
        else:
            assert err > 1.0


def test_training_does_not_depend_on_the_secrets_mode(tiny_synthetic) -> None:
    """Without DP noise the masks cancel: os and reproducible runs give the same model and metrics."""
    split = leave_one_out(tiny_synthetic)
    runs = {
        mode: run_federated(_cfg("aggregation.backend=masking", f"secrets={mode}"), tiny_synthetic, split, progress=False)
        for mode in ("os", "reproducible")
    }
    plain = run_federated(_cfg(), tiny_synthetic, split, progress=False)
    a, b = runs["os"], runs["reproducible"]
    assert torch.equal(a.shared.item_table, b.shared.item_table) and torch.equal(a.shared.head_flat(), b.shared.head_flat())
    assert a.metrics["val"] == b.metrics["val"] and a.metrics["test"] == b.metrics["test"]
    torch.testing.assert_close(a.shared.item_table, plain.shared.item_table, atol=2e-3, rtol=0)
    for key, value in plain.metrics["test"].items():
        assert abs(a.metrics["test"][key] - value) <= 0.02, key
