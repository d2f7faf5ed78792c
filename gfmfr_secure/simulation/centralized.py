"""Centralised (non-federated) NCF: the upper bound trained on pooled interactions.

Same scoring function as the FedNCF backbone (user embedding, item table, MLP head),
trained by ordinary minibatch Adam over all users' samples shuffled together, with
fresh negatives every round (a round = ``train.local_epochs`` passes). Uses the same
split, negatives rule, validation-only model selection and scorer as the federated
methods.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.data import Split, sample_training
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.models import get_backbone, init_shared_params
from gfmfr_secure.rng import numpy_rng, torch_generator
from gfmfr_secure.simulation.loop import FederatedRun
from gfmfr_secure.simulation.scoring import score_users
from gfmfr_secure.simulation.selection import ValidationSelector

__all__ = ["run_centralized"]


def run_centralized(cfg: Any, split: Split, *, logger: logging.Logger | None = None, progress: bool = True) -> FederatedRun:
    """Train the centralised NCF upper bound; returns the same record as a federated run."""
    log = logger or logging.getLogger("gfmfr_secure")
    seed, tc, d = int(cfg.seed), cfg.train, cfg.model.latent_dim
    backbone = get_backbone("fedncf")
    shared = init_shared_params(split.n_items, d, torch_generator(seed, "init", "shared"))
    store = ClientStateStore.create(split.n_users, split.n_items, d, user_embedding=True, personal_items=False, private_head=None, generator=torch_generator(seed, "init", "users"))
    params = {
        "emb": torch.nn.Parameter(store.user_embedding.clone()),
        "table": torch.nn.Parameter(shared.item_table.clone()),
        "w1u": torch.nn.Parameter(shared.w1_user.clone()),
        "w1i": torch.nn.Parameter(shared.w1_item.clone()),
        "b1": torch.nn.Parameter(shared.b1.clone()),
        "w2": torch.nn.Parameter(shared.w2.clone()),
        "b2": torch.nn.Parameter(shared.b2.clone()),
    }
    # foreach: one kernel per update op for all tensors (torch uses it by default on GPUs only)
    opt = torch.optim.Adam(params.values(), lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)

    def sync() -> None:
        with torch.no_grad():
            store.user_embedding.copy_(params["emb"])
            for name, key in (("item_table", "table"), ("w1_user", "w1u"), ("w1_item", "w1i"), ("b1", "b1"), ("w2", "w2"), ("b2", "b2")):
                getattr(shared, name).copy_(params[key])

    ks = tuple(cfg.eval.ks)
    selector = ValidationSelector(tc.patience)
    history, times = [], []
    for t in tqdm(range(tc.rounds), desc=cfg.method, disable=not progress, unit="round"):
        t0 = time.perf_counter()
        neg_round = 0 if cfg.data.negatives_fixed else t
        s = sample_training(split, tc.num_negatives, numpy_rng(seed, "negatives", neg_round), exclude_heldout=cfg.data.negatives_exclude_heldout)
        users, items, labels = (torch.from_numpy(s.users), torch.from_numpy(s.items), torch.from_numpy(s.labels))
        total = 0.0
        for epoch in range(tc.local_epochs):
            perm = torch.randperm(users.numel(), generator=torch_generator(seed, "central-shuffle", t, epoch))
            for start in range(0, perm.numel(), tc.batch_size):
                idx = perm[start : start + tc.batch_size]
                u, i, y = users[idx], items[idx], labels[idx]
                z = params["table"][i] @ params["w1i"].T + params["emb"][u] @ params["w1u"].T + params["b1"]
                logit = torch.relu(z) @ params["w2"] + params["b2"]
                loss = F.binary_cross_entropy_with_logits(logit, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
        mean_loss = total / (users.numel() * tc.local_epochs)
        if not (math.isfinite(mean_loss) and all(bool(torch.isfinite(p).all()) for p in params.values())):
            raise FloatingPointError(f"round {t}: centralised training diverged (loss {mean_loss}); lower train.lr (Adam step {tc.lr:g})")
        sync()
        rec: dict[str, Any] = {"round": t, "loss": mean_loss, "client_s": time.perf_counter() - t0}
        times.append(rec["client_s"])
        if (t + 1) % tc.eval_every == 0 or t == tc.rounds - 1:
            val = evaluate_ranking(lambda us: score_users(shared, store, backbone, us), split, "val", ks=ks, chunk_size=cfg.eval.chunk_users)
            rec["val"] = val
            log.info("round %d: loss %.4f val NDCG@10 %.4f", t, rec["loss"], val["NDCG@10"])
            if selector.observe(t, val, lambda: (shared.clone(), store.snapshot())):
                history.append(rec)
                break
        history.append(rec)
    sel_shared, sel_store = selector.snapshot
    test = evaluate_ranking(lambda us: score_users(sel_shared, sel_store, backbone, us), split, "test", ks=ks, chunk_size=cfg.eval.chunk_users)
    metrics = {"val": selector.best_val, "test": test, "best_round": selector.best_round, "rounds_run": len(history), "timing": {"train_s_per_round": float(np.mean(times))}}
    return FederatedRun(shared=sel_shared, store=sel_store, server=None, metrics=metrics, history=history)
