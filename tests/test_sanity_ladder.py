"""Federated sanity ladder: federated MF equals centralised MF when it should, and stays close when it need not.

Rung 1. fedncf with the dot scorer, ``logit = (e_u + w2) . C[i] + b2``, full
participation, one local step per client per round (one epoch, a batch larger than any
client's samples), fixed negatives and summed item deltas: a round is one step of
full-batch gradient descent on ``L = sum_u L_u``, ``L_u`` the client's mean loss, for
``C`` and every ``e_u``; ``w2`` and ``b2``, which FedAvg averages, take the step of
``(1/n) sum_u L_u``. A plain autograd reference in float64 takes those steps from the
engine's initial parameters with the engine's negatives; every parameter must match
after every round.

Rung 2. With 5 local epochs the rounds are no longer gradient steps, but on planted
synthetic data the federated model's best validation HR@10 stays close to that of
centralised gradient descent given as many steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gfmfr_secure import schedules
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out, make_synthetic, sample_training
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.models import get_backbone, init_shared_params
from gfmfr_secure.rng import numpy_rng, torch_generator
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.simulation.scoring import score_users

LADDER = [
    "model.backbone=fedncf", "distill.enabled=false", "model.scorer=dot", "model.latent_dim=8",
    "train.client_fraction=1.0", "train.local_epochs=1", "train.batch_size=100000", "data.negatives_fixed=true",
    "train.alpha=0", "train.beta=0", "train.item_aggregation=sum", "train.weighting=uniform",
    "train.user_lr=0.5", "train.lr=0.01", "train.item_lr_scale=50", "train.num_negatives=4",
    "train.selection=last", "train.patience=0", "eval.ks=[10]",
]

#: float32 engine against the float64 reference; the largest gap measured over 4 rounds is about 4e-7
ATOL = 2e-6


@dataclass
class Params:
    """The dot-scorer model: item table [I, d], user embeddings [U, d], w2 [d], b2 [1]."""

    item_table: torch.Tensor
    user_embedding: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


class CentralisedGD:
    """Full-batch gradient descent on the clients' summed mean losses, in float64 autograd.

    Starts from the engine's initial parameters (same generators) and uses the
    negatives the engine draws once under ``data.negatives_fixed``.
    """

    def __init__(self, cfg, split) -> None:
        seed, tc, mc = int(cfg.seed), cfg.train, cfg.model
        self.cfg, self.split = cfg, split
        shared = init_shared_params(split.n_items, mc.latent_dim, torch_generator(seed, "init", "shared"), mc.item_init_std, scorer="dot", user_std=mc.user_init_std)
        store = ClientStateStore.create(
            split.n_users, split.n_items, mc.latent_dim, user_embedding=True, personal_items=False, private_head=None,
            generator=torch_generator(seed, "init", "users"), user_std=mc.user_init_std,
        )
        self._shared, self._store = shared, store
        self.p = Params(*(t.double().clone() for t in (shared.item_table, store.user_embedding, shared.w2, shared.b2)))
        s = sample_training(split, tc.num_negatives, numpy_rng(seed, "negatives", 0), exclude_heldout=cfg.data.negatives_exclude_heldout)
        self.users, self.items = torch.from_numpy(s.users), torch.from_numpy(s.items)
        self.labels = torch.from_numpy(s.labels).double()
        counts = torch.bincount(self.users, minlength=split.n_users).double()
        self.active = (counts > 0).unsqueeze(1)  # users without samples take no step (they are not in the cohort)
        self.n = int(self.active.sum())
        self.weight = 1.0 / counts[self.users]  # each user's loss is a mean over its samples

    def step(self, t: int) -> None:
        """Round ``t``'s step at the engine's learning-rate schedules."""
        tc, p = self.cfg.train, self.p
        wd = tc.embedding_weight_decay
        lr_items = schedules.item_lr(t, tc.lr, tc.item_lr_scale, self.split.n_items, tc.item_lr_decay)
        lr_user = schedules.item_lr(t, tc.user_lr, 1.0, self.split.n_items, tc.item_lr_decay)
        C, E, w2, b2 = (x.clone().requires_grad_(True) for x in (p.item_table, p.user_embedding, p.w2, p.b2))
        rows = C[self.items]
        logit = ((E[self.users] + w2) * rows).sum(1) + b2
        bce = F.binary_cross_entropy_with_logits(logit, self.labels, reduction="none")
        # L2 on each batch's rows, a mean over the batch like the loss
        loss = (self.weight * (bce + 0.5 * wd * (rows**2).sum(1))).sum()
        g_c, g_e, g_w2, g_b2 = torch.autograd.grad(loss, (C, E, w2, b2))
        with torch.no_grad():
            p.item_table = p.item_table - lr_items * g_c
            p.user_embedding = torch.where(self.active, p.user_embedding - lr_user * (g_e + wd * p.user_embedding), p.user_embedding)
            p.w2 = p.w2 - lr_user * (g_w2 / self.n + wd * p.w2)  # FedAvg: the mean of the clients' steps
            p.b2 = p.b2 - lr_user * g_b2 / self.n

    def val_hr(self) -> float:
        shared, store = self._shared.clone(), self._store.snapshot()
        shared.item_table, shared.w2, shared.b2 = self.p.item_table.float(), self.p.w2.float(), self.p.b2.float()
        store.user_embedding = self.p.user_embedding.float()
        backbone = get_backbone("fedncf")
        return evaluate_ranking(lambda u: score_users(shared, store, backbone, u, scorer="dot"), self.split, "val", ks=(10,))["HR@10"]


@pytest.fixture(scope="module")
def small():
    data = make_synthetic(40, 30, n_groups=3, mean_interactions=8, text_dim=4, image_dim=4, seed=5)
    return data, leave_one_out(data)


@pytest.mark.parametrize(("weight_decay", "decay"), [(0.0, 1.0), (0.01, 0.9)])
def test_one_local_step_is_centralised_gradient_descent(small, weight_decay: float, decay: float) -> None:
    data, split = small
    cfg = with_overrides(config_from_dict({"method": "fedncf"}), LADDER + [f"train.embedding_weight_decay={weight_decay}", f"train.item_lr_decay={decay}"])
    assert int(np.diff(split.train_indptr).max()) * (1 + cfg.train.num_negatives) < cfg.train.batch_size  # one batch per client
    ref = CentralisedGD(cfg, split)
    start = Params(*(t.clone() for t in vars(ref.p).values()))
    rounds = 4
    for r in range(1, rounds + 1):
        # selection=last: the returned state is the one after round r - 1
        run = run_federated(with_overrides(cfg, [f"train.rounds={r}"]), data, split, progress=False)
        ref.step(r - 1)
        fed = Params(run.shared.item_table, run.store.user_embedding, run.shared.w2, run.shared.b2)
        for name in ("item_table", "user_embedding", "w2", "b2"):
            torch.testing.assert_close(getattr(fed, name).double(), getattr(ref.p, name), rtol=0.0, atol=ATOL, msg=lambda m, n=name, r=r: f"{n} after round {r - 1}: {m}")
    for name in ("item_table", "user_embedding", "w2", "b2"):  # the comparison is not vacuous: every part moved
        assert float((getattr(ref.p, name) - getattr(start, name)).abs().max()) > 1000 * ATOL, name


def test_five_local_epochs_stay_close_to_centralised() -> None:
    """Best validation HR@10 over the run: federated (5 local steps a round) >= 0.9 x centralised GD.

    Measured with these settings on data seeds 0-5: ratios 1.00, 0.95, 0.96, 0.97, 0.98,
    1.00 (seed 0, used here: 0.330 both; a random ranking gives 10 / 60 = 0.167).
    """
    data = make_synthetic(300, 60, n_groups=3, mean_interactions=15, text_dim=4, image_dim=4, seed=0)
    split = leave_one_out(data)
    rounds, epochs = 12, 5
    cfg = with_overrides(
        config_from_dict({"method": "fedncf"}),
        LADDER + ["model.latent_dim=16", "train.embedding_weight_decay=0.01", "train.item_lr_decay=0.95", f"train.rounds={rounds}", f"train.local_epochs={epochs}"],
    )
    fed = run_federated(cfg, data, split, progress=False)
    fed_best = max(h["val"]["HR@10"] for h in fed.history)
    ref = CentralisedGD(cfg, split)
    cen = []
    for k in range(rounds * epochs):  # as many steps as each client takes, at its rates, validated as often
        ref.step(k // epochs)
        if k % epochs == epochs - 1:
            cen.append(ref.val_hr())
    assert fed_best >= 0.9 * max(cen), (fed_best, max(cen))
    assert max(cen) > 1.5 * 10 / split.n_items  # well above a random ranking
