"""Centralised (non-federated) model: the upper bound trained on pooled interactions.

The FedNCF backbone's :class:`~gfmfr_secure.models.recommender.Recommender` (user
embedding, item table, head; ``model.scorer`` chooses ``dot`` or ``mlp``) over every
user and item, trained by minibatch steps over all users' samples shuffled together,
with fresh negatives every round (a round = ``train.local_epochs`` passes). Uses the
same split, negatives rule, validation-only model selection and scorer as the federated
methods.

* ``mlp``: Adam at ``train.lr`` with weight decay ``train.weight_decay`` on every parameter.
* ``dot``: SGD as a client takes it: the user vector (``e_u`` and ``w2``) and ``b2`` at
  ``train.user_lr``, the item table at ``train.lr * train.item_lr_scale`` (both decayed by
  ``train.item_lr_decay`` per round, as in the federated loop), the loss's L2 on the
  batch's item rows at ``train.embedding_weight_decay``, and the same weight decay on the
  user vector: ``w2`` decays every step, a user's ``e_u`` in every step whose batch holds
  that user (a client's decays once per local step).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gfmfr_secure import schedules
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.data import Split, sample_training
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.models import get_backbone, init_shared_params
from gfmfr_secure.models.recommender import LossWeights, RecBatch, Recommender, check_scorer
from gfmfr_secure.rng import numpy_rng, torch_generator
from gfmfr_secure.simulation.loop import FederatedRun
from gfmfr_secure.simulation.scoring import score_users
from gfmfr_secure.simulation.selection import ValidationSelector

__all__ = ["run_centralized"]


def run_centralized(
    cfg: Any, split: Split, *, logger: logging.Logger | None = None, progress: bool = True, label: str | None = None
) -> FederatedRun:
    """Train the centralised upper bound; returns the same record as a federated run.

    Raises
    ------
    FloatingPointError
        When the loss or a parameter stops being finite.
    """
    log = logger or logging.getLogger("gfmfr_secure")
    seed, tc, mc, d = int(cfg.seed), cfg.train, cfg.model, cfg.model.latent_dim
    scorer = check_scorer(mc.scorer)
    dot = scorer == "dot"
    backbone = get_backbone("fedncf")
    gen_shared, gen_users = torch_generator(seed, "init", "shared"), torch_generator(seed, "init", "users")
    if dot:  # the federated loop's initialisation
        shared = init_shared_params(split.n_items, d, gen_shared, mc.item_init_std, scorer=scorer, user_std=mc.user_init_std)
        store = ClientStateStore.create(split.n_users, split.n_items, d, user_embedding=True, personal_items=False, private_head=None, generator=gen_users, user_std=mc.user_init_std)
    else:
        shared = init_shared_params(split.n_items, d, gen_shared)
        store = ClientStateStore.create(split.n_users, split.n_items, d, user_embedding=True, personal_items=False, private_head=None, generator=gen_users)
    head = (shared.w1_user, shared.w1_item, shared.b1, shared.w2, shared.b2)
    model = Recommender(backbone, scorer, shared.item_table, store.user_embedding, head, weights=LossWeights(l2=tc.embedding_weight_decay))
    trained = [p for p in model.parameters() if p.requires_grad]
    if dot:
        opt: torch.optim.Optimizer = torch.optim.SGD(_dot_groups(model, tc, 0, split.n_items))
    else:
        # foreach: one kernel per update op for all tensors (torch uses it by default on GPUs only)
        opt = torch.optim.Adam(trained, lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)

    def sync() -> None:
        with torch.no_grad():
            store.user_embedding.copy_(model.user_embedding.weight)
            shared.item_table.copy_(model.item_embedding.weight)
            shared.set_head_flat_(model.head_flat()[0])

    def scores(sh: Any, st: ClientStateStore) -> Any:
        return lambda us: score_users(sh, st, backbone, us, scorer=scorer)

    ks = tuple(cfg.eval.ks)
    selector = ValidationSelector(tc.patience)
    history, times = [], []
    for t in tqdm(range(tc.rounds), desc=label or cfg.method, disable=None if progress else True, unit="round"):
        t0 = time.perf_counter()
        neg_round = 0 if cfg.data.negatives_fixed else t
        s = sample_training(split, tc.num_negatives, numpy_rng(seed, "negatives", neg_round), exclude_heldout=cfg.data.negatives_exclude_heldout)
        users, items, labels = (torch.from_numpy(s.users), torch.from_numpy(s.items), torch.from_numpy(s.labels))
        total, decay = 0.0, 1.0
        if dot:
            for group, lr in zip(opt.param_groups, _dot_groups(model, tc, t, split.n_items)):
                group["lr"] = lr["lr"]
            decay = 1.0 - opt.param_groups[0]["lr"] * tc.embedding_weight_decay
        for epoch in range(tc.local_epochs):
            perm = torch.randperm(users.numel(), generator=torch_generator(seed, "central-shuffle", t, epoch))
            for start in range(0, perm.numel(), tc.batch_size):
                idx = perm[start : start + tc.batch_size]
                u = users[idx]
                loss = model.calculate_loss(RecBatch(u, items[idx], labels[idx]))
                opt.zero_grad()
                loss.backward()
                if dot and decay != 1.0:  # SGD weight decay of the user vector, before the step as torch applies it
                    with torch.no_grad():
                        model.output_layer.weight.mul_(decay)
                        rows = torch.unique(u)
                        model.user_embedding.weight[rows] *= decay
                opt.step()
                total += loss.item() * idx.numel()
        mean_loss = total / (users.numel() * tc.local_epochs)
        if not (math.isfinite(mean_loss) and all(bool(torch.isfinite(p).all()) for p in trained)):
            steps = f"train.user_lr and train.lr * train.item_lr_scale (SGD, {scorer} scorer)" if dot else f"train.lr (Adam step {tc.lr:g})"
            raise FloatingPointError(f"round {t}: centralised training diverged (loss {mean_loss}); lower {steps}")
        sync()
        rec: dict[str, Any] = {"round": t, "loss": mean_loss, "client_s": time.perf_counter() - t0}
        times.append(rec["client_s"])
        if (t + 1) % tc.eval_every == 0 or t == tc.rounds - 1:
            val = evaluate_ranking(scores(shared, store), split, "val", ks=ks, chunk_size=cfg.eval.chunk_users)
            rec["val"] = val
            log.info("round %d: loss %.4f val NDCG@10 %.4f", t, rec["loss"], val["NDCG@10"])
            if selector.observe(t, val, lambda: (shared.clone(), store.snapshot())):
                history.append(rec)
                break
        history.append(rec)
    sel_shared, sel_store = selector.snapshot
    test = evaluate_ranking(scores(sel_shared, sel_store), split, "test", ks=ks, chunk_size=cfg.eval.chunk_users)
    metrics = {"val": selector.best_val, "test": test, "best_round": selector.best_round, "rounds_run": len(history), "timing": {"train_s_per_round": float(np.mean(times))}}
    return FederatedRun(shared=sel_shared, store=sel_store, server=None, metrics=metrics, history=history)


def _dot_groups(model: Recommender, tc: Any, t: int, n_items: int) -> list[dict]:
    """SGD groups of the dot scorer in round ``t``: the user-vector decay is applied by hand (see the module docstring)."""
    lr_user = schedules.item_lr(t, tc.user_lr, 1.0, n_items, tc.item_lr_decay)
    lr_items = schedules.item_lr(t, tc.lr, tc.item_lr_scale, n_items, tc.item_lr_decay)
    return model.param_groups(lr_head=0.0, weight_decay=0.0, lr_user=lr_user, user_weight_decay=0.0, lr_items=lr_items)
