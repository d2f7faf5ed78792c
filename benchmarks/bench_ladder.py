"""Federated sanity ladder at full scale: federated MF against centralised MF on ML-100K-mm.

Three runs of the fedncf backbone with the dot scorer, ``logit = (e_u + w2) . C[i] + b2``:

1. centralised full-batch gradient descent on ``L = sum_u mean_u(BCE) + L2`` (the
   per-user mean loss the clients minimise), written with plain autograd: one step
   per round, the engine's learning rates and schedules, the engine's initial
   parameters and its fixed negatives;
2. the federated engine with full participation, one local step per client per round
   (``local_epochs=1``, a batch larger than any client's samples), fixed negatives and
   summed item deltas: round for round the same gradient step as (1);
3. the engine at ``configs/fedncf.yaml`` with the dot scorer's defaults (5 local
   epochs, batch 256, fresh negatives every round), for comparison.

Prints validation NDCG@10 per round for each, the final-round test NDCG@10 of each
and the ratio (2) / (1), and how far (2)'s parameters end from (1)'s.

    python benchmarks/bench_ladder.py --data ../shared/datasets/ml-100k-mm --rounds 40
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gfmfr_secure  # noqa: F401  (first: sets the OpenMP wait policy before torch loads OpenMP)

# isort: split
import numpy as np
import torch
import torch.nn.functional as F

from gfmfr_secure import schedules
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.config import load_config, with_overrides
from gfmfr_secure.data import sample_training
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.models import get_backbone, init_shared_params
from gfmfr_secure.rng import numpy_rng, torch_generator
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.simulation.runner import prepare_data
from gfmfr_secure.simulation.scoring import score_users

#: one local step per client: a batch larger than any client's samples
ONE_STEP = ["train.local_epochs=1", "train.batch_size=1000000", "data.negatives_fixed=true"]
COMMON = ["method=fedncf", "model.backbone=fedncf", "distill.enabled=false", "model.scorer=dot", "train.selection=last", "train.patience=0", "train.client_fraction=1.0", "train.weighting=uniform", "train.item_aggregation=sum"]


def centralised_gd(cfg, split):
    """Full-batch gradient descent on the federated objective; returns (val curve, test at the last round, params).

    ``C`` and ``e_u`` follow the gradient of ``sum_u L_u``; ``w2`` and ``b2``, which
    FedAvg averages, follow the gradient of ``(1/n) sum_u L_u`` (n = users with samples).
    L2 as the engine applies it: ``wd/2 mean_j |C[i_j]|^2`` inside each ``L_u``, decay of
    ``e_u`` and ``w2`` at the user lr.
    """
    seed, tc, mc = int(cfg.seed), cfg.train, cfg.model
    n_users, n_items, d = split.n_users, split.n_items, mc.latent_dim
    shared = init_shared_params(n_items, d, torch_generator(seed, "init", "shared"), mc.item_init_std, scorer="dot", user_std=mc.user_init_std)
    store = ClientStateStore.create(n_users, n_items, d, user_embedding=True, personal_items=False, private_head=None, generator=torch_generator(seed, "init", "users"), user_std=mc.user_init_std)
    s = sample_training(split, tc.num_negatives, numpy_rng(seed, "negatives", 0), exclude_heldout=cfg.data.negatives_exclude_heldout)
    users, items = torch.from_numpy(s.users), torch.from_numpy(s.items)
    y = torch.from_numpy(s.labels).double()
    counts = torch.bincount(users, minlength=n_users).double()
    active = (counts > 0).unsqueeze(1)
    n = int(active.sum())
    w = 1.0 / counts[users]  # each user's mean
    wd = tc.embedding_weight_decay
    C, E, w2, b2 = (t.double().clone() for t in (shared.item_table, store.user_embedding, shared.w2, shared.b2))
    backbone = get_backbone("fedncf")
    curve = []

    def scorer():
        sh, st = shared.clone(), store.snapshot()
        sh.item_table, sh.w2, sh.b2, st.user_embedding = C.float(), w2.float(), b2.float(), E.float()
        return lambda u: score_users(sh, st, backbone, u, scorer="dot")

    for t in range(tc.rounds):
        lr_i = schedules.item_lr(t, tc.lr, tc.item_lr_scale, n_items, tc.item_lr_decay)
        lr_u = schedules.item_lr(t, tc.user_lr, 1.0, n_items, tc.item_lr_decay)
        Cp, Ep, w2p, b2p = (p.clone().requires_grad_(True) for p in (C, E, w2, b2))
        rows = Cp[items]
        logit = ((Ep[users] + w2p) * rows).sum(1) + b2p
        loss = (w * F.binary_cross_entropy_with_logits(logit, y, reduction="none")).sum() + 0.5 * wd * (w * (rows**2).sum(1)).sum()
        gC, gE, gw2, gb2 = torch.autograd.grad(loss, (Cp, Ep, w2p, b2p))
        with torch.no_grad():
            C = C - lr_i * gC
            E = torch.where(active, E - lr_u * (gE + wd * E), E)
            w2 = w2 - lr_u * (gw2 / n + wd * w2)
            b2 = b2 - lr_u * gb2 / n
        curve.append(evaluate_ranking(scorer(), split, "val", ks=(10,))["NDCG@10"])
    test = evaluate_ranking(scorer(), split, "test", ks=(10,))["NDCG@10"]
    return curve, test, (C, E, w2, b2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("GFMFR_DATA", "../shared/datasets/ml-100k-mm"))
    ap.add_argument("--config", default="configs/fedncf.yaml")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    base = with_overrides(load_config(args.config), COMMON + [f"data.path={args.data}", f"train.rounds={args.rounds}", f"seed={args.seed}"])
    ladder = with_overrides(base, ONE_STEP)
    data, split = prepare_data(ladder)
    tc = ladder.train
    print(f"{data.name}: {split.n_users} users x {split.n_items} items; d={ladder.model.latent_dim}, user_lr={tc.user_lr}, item lr={tc.lr * tc.item_lr_scale:g}, decay {tc.item_lr_decay}/round, embedding_weight_decay={tc.embedding_weight_decay}, {tc.num_negatives} negatives")

    t0 = time.perf_counter()
    cen_curve, cen_test, (C, E, w2, b2) = centralised_gd(ladder, split)
    t_cen = time.perf_counter() - t0
    t0 = time.perf_counter()
    fed = run_federated(ladder, data, split, progress=False)
    t_fed = time.perf_counter() - t0
    t0 = time.perf_counter()
    default = run_federated(base, data, split, progress=False)
    t_def = time.perf_counter() - t0

    fed_curve = [h["val"]["NDCG@10"] for h in fed.history]
    def_curve = [h["val"]["NDCG@10"] for h in default.history]
    print(f"\nvalidation NDCG@10 per round (full ranking); {t_cen:.0f} s, {t_fed:.0f} s, {t_def:.0f} s")
    print(f"{'round':>5} | {'centralised GD':>14} | {'fed, 1 step':>11} | {'fed, default (' + str(base.train.local_epochs) + ' epochs)':>24}")
    for t in range(args.rounds):
        print(f"{t:>5} | {cen_curve[t]:>14.4f} | {fed_curve[t]:>11.4f} | {def_curve[t]:>24.4f}")

    fed_test = fed.metrics["test"]["NDCG@10"]
    def_test = default.metrics["test"]["NDCG@10"]
    print(f"\ntest NDCG@10 at the last round: centralised {cen_test:.4f}, federated one step {fed_test:.4f} (ratio {fed_test / cen_test:.4f}), federated default {def_test:.4f} (ratio {def_test / cen_test:.4f})")
    print(f"best validation round: centralised {int(np.argmax(cen_curve))} ({max(cen_curve):.4f}), federated one step {int(np.argmax(fed_curve))} ({max(fed_curve):.4f}), federated default {int(np.argmax(def_curve))} ({max(def_curve):.4f})")
    diffs = {
        "item table": (fed.shared.item_table.double() - C).abs().max(),
        "user embeddings": (fed.store.user_embedding.double() - E).abs().max(),
        "w2": (fed.shared.w2.double() - w2).abs().max(),
        "b2": (fed.shared.b2.double() - b2).abs().max(),
    }
    print("largest |federated - centralised| after the last round: " + ", ".join(f"{k} {float(v):.2e}" for k, v in diffs.items()) + f" (largest |C| entry {float(C.abs().max()):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
