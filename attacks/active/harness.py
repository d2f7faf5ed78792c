"""What every active attack needs: clients that train as the loop trains them, and the target's score.

The attacks of this package play a server that deviates from the protocol, so they
drive the library's client side themselves instead of going through
:func:`gfmfr_secure.simulation.loop.run_federated`, whose server is honest by
construction: :func:`initial_state` builds the broadcast model and the client store
as a run does, :func:`local_round` trains any set of clients on any broadcast with the
round's configured hyperparameters (no distillation), and :func:`target_inference`
scores what a released block says about one target's training items.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from attacks.interaction import dot_imia_row_scores
from gfmfr_secure import schedules
from gfmfr_secure.aggregation import get_aggregator
from gfmfr_secure.client.cohort import train_cohort
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.data import Split, sample_training
from gfmfr_secure.models import get_backbone, init_shared_params
from gfmfr_secure.models.params import SharedParams
from gfmfr_secure.privacy.release import NoiseShares, ReleaseLayout, ReleaseNoise, central_noise
from gfmfr_secure.rng import SecretSource, derive_seed, numpy_rng, torch_generator
from gfmfr_secure.types import AggregateResult, CohortUpdate, LocalHyper

__all__ = ["concat_updates", "initial_state", "local_round", "secure_release", "target_inference"]


def initial_state(cfg: Any, split: Split) -> tuple[Any, SharedParams, ClientStateStore]:
    """(backbone, round-0 broadcast, client store) exactly as ``run_federated`` builds them from ``cfg.seed``."""
    seed, mc = int(cfg.seed), cfg.model
    backbone = get_backbone(mc.backbone)
    shared = init_shared_params(split.n_items, mc.latent_dim, torch_generator(seed, "init", "shared"), mc.item_init_std, scorer=mc.scorer, user_std=mc.user_init_std)
    store = ClientStateStore.create(
        split.n_users, split.n_items, mc.latent_dim, user_embedding=backbone.user_embedding, personal_items=backbone.personal_items,
        private_head=shared.head_flat() if backbone.private_head else None, generator=torch_generator(seed, "init", "users"), user_std=mc.user_init_std,
    )
    return backbone, shared, store


def local_round(cfg: Any, backbone: Any, broadcast: SharedParams, store: ClientStateStore, clients: np.ndarray, split: Split, round_idx: int) -> CohortUpdate:
    """Train ``clients`` (int64 [n]) for round ``round_idx`` on ``broadcast``; their uploads (unclipped).

    Samples and hyperparameters are the loop's for that round (negatives from the run seed,
    learning rates from the schedules); distillation is off.
    """
    seed, tc, mc, n_items = int(cfg.seed), cfg.train, cfg.model, split.n_items
    clients = np.asarray(clients, dtype=np.int64)
    samples = sample_training(split, tc.num_negatives, numpy_rng(seed, "negatives", round_idx), users=clients)
    hyper = LocalHyper(
        lr_network=schedules.network_lr(round_idx, tc.lr, tc.lr_decay),
        lr_items=schedules.item_lr(round_idx, tc.lr, tc.item_lr_scale, n_items, tc.item_lr_decay),
        weight_decay=tc.weight_decay, alpha=schedules.fedrap_weight(round_idx, tc.alpha), beta=schedules.fedrap_weight(round_idx, tc.beta),
        distill=0.0, ema_decay=cfg.distill.ema_decay, max_ratio=cfg.distill.max_ratio, batch_size=tc.batch_size, epochs=tc.local_epochs,
        shuffle_seed=derive_seed(seed, "shuffle", round_idx), scorer=mc.scorer,
        lr_user=schedules.item_lr(round_idx, tc.user_lr, 1.0, n_items, tc.item_lr_decay), embedding_weight_decay=tc.embedding_weight_decay,
    )
    return train_cohort(broadcast, store, backbone, clients, samples.indptr, samples.items, samples.labels, hyper)


def target_inference(
    block: torch.Tensor | np.ndarray, positives: np.ndarray, *, direction: np.ndarray | None = None, threshold: float | None = None, pos_fraction: float = 0.2,
) -> dict[str, float]:
    """What a released item-table block reveals about one target's training items.

    Parameters
    ----------
    block : float [I, d] the item-table part of the released sum the target is in (after
        the adversary subtracted whatever it knows), or the target's own upload.
    positives : int64 [k] the target's training items (ground truth, never read by the score).
    direction : float [d] the direction along which the adversary expects the target's
        positive rows to move (a crafted broadcast fixes it); default: the dominant
        direction of the block's rows (:func:`attacks.interaction.dot_imia_row_scores`).
    threshold : the score above which the adversary calls a row a positive when it knows how
        far a positive row moves (a crafted broadcast fixes the step); default half the top score.
    pos_fraction : the protocol's share of positives among a client's rows, ``1 / (1 + num_negatives)``.

    Returns
    -------
    dict: ``auc`` (the target's items against every other item, rows scored by their
    projection); ``f1_at_k`` (F1 of the top k rows, k the target's true item count: an
    oracle size, what the best threshold gets); ``f1_sign`` (rows of positive score among
    the block's non-zero rows: the decision of exact reconstruction from one upload);
    ``f1_threshold`` (rows scoring above ``threshold``: the decision when the adversary
    made the target's positive rows move by a known step); ``exact`` (1.0 when either
    decision is exactly the target's items).
    """
    rows = torch.as_tensor(np.asarray(block), dtype=torch.float64)
    n_items = rows.shape[0]
    pos = np.unique(np.asarray(positives, dtype=np.int64))
    nonzero = np.flatnonzero(rows.abs().sum(1).numpy() > 0)
    scores = np.zeros(n_items)
    if direction is not None:
        u = torch.as_tensor(np.asarray(direction), dtype=torch.float64)
        scores[nonzero] = (rows[nonzero] @ (u / u.norm())).numpy()
    elif nonzero.size:
        scores[nonzero] = dot_imia_row_scores(np.array([0, nonzero.size]), rows[nonzero].numpy(), pos_fraction=pos_fraction)
    truth = np.zeros(n_items, dtype=bool)
    truth[pos] = True
    top = np.zeros(n_items, dtype=bool)
    top[np.argsort(-scores, kind="stable")[: pos.size]] = True
    sign = np.zeros(n_items, dtype=bool)
    sign[nonzero] = scores[nonzero] > 0
    cut = 0.5 * scores.max() if threshold is None else threshold
    above = scores > cut if scores.max() > 0 else np.zeros(n_items, dtype=bool)

    def f1(pred: np.ndarray) -> float:
        tp = int((pred & truth).sum())
        return 2.0 * tp / (int(pred.sum()) + pos.size) if tp else 0.0

    exact = np.array_equal(sign, truth) or np.array_equal(above, truth)
    return {"auc": float(roc_auc_score(truth, scores)), "f1_at_k": f1(top), "f1_sign": f1(sign), "f1_threshold": f1(above), "exact": float(exact)}


def concat_updates(*parts: CohortUpdate) -> CohortUpdate:
    """One cohort's uploads from the uploads of disjoint sets of clients (trained on different broadcasts)."""
    offsets = np.cumsum([0] + [int(p.row_ptr[-1]) for p in parts])
    heads = [p.head_delta for p in parts]
    after = [p.head_after for p in parts]
    return CohortUpdate(
        clients=np.concatenate([p.clients for p in parts]),
        n_samples=np.concatenate([p.n_samples for p in parts]),
        row_ptr=np.concatenate([parts[0].row_ptr[:1]] + [p.row_ptr[1:] + off for p, off in zip(parts, offsets)]),
        row_items=np.concatenate([p.row_items for p in parts]),
        item_delta=torch.cat([p.item_delta for p in parts]),
        head_delta=None if any(h is None for h in heads) else torch.cat(heads),
        head_after=None if any(h is None for h in after) else torch.cat(after),
        group=np.concatenate([p.group for p in parts]),
        loss=np.concatenate([p.loss for p in parts]),
    )


def secure_release(
    cfg: Any, update: CohortUpdate, n_items: int, *, groups: np.ndarray | None = None, n_groups: int = 1, dp: Any = None, round_idx: int = 0,
) -> tuple[AggregateResult, NoiseShares | None]:
    """The round's release through the configured backend, with the run's DP noise; (release, the clients' noise shares).

    ``update`` must already be clipped when ``dp`` (a :class:`~gfmfr_secure.privacy.plan.UserLevelDP`) is given.
    Keys, masks and noise come from ``cfg.secrets`` (``reproducible`` makes a measurement repeatable).
    Under ``distributed`` each client adds a share sized for the backend's fewest reporting
    clients; under ``central`` the releasing party adds the draw (``plain``'s server, ``ckks``'s
    key holder; ``masking`` refuses it).
    """
    aggregator = get_aggregator(cfg.aggregation.backend, settings=cfg.aggregation, seed=int(cfg.seed), secrets=cfg.secrets)
    source = SecretSource(cfg.secrets, int(cfg.seed))
    noise = shares = None
    if dp is not None:
        head = 0 if update.head_delta is None else int(update.head_delta.shape[1])
        layout = ReleaseLayout(max(n_groups, 1), n_items, int(update.item_delta.shape[1]), head, dp.count_value)
        share_std = dp.share_std(len(update), aggregator.min_reporting(len(update)))
        shares = NoiseShares(source.key("dp-share", round_idx), round_idx, update.clients, share_std, layout) if share_std > 0 else None
        noise = ReleaseNoise(layout, central_noise(layout, dp.central_std(), source.key("dp-central", round_idx)), shares)
    agg = aggregator.aggregate(update, n_items=n_items, weights=np.ones(len(update)), groups=groups, n_groups=n_groups, noise=noise)
    return agg, shares
