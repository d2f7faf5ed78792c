"""The federated round loop (GFMFR and the federated baselines).

One round (DESIGN section 2): sample a cohort, train it locally (vectorised), let
the aggregation backend turn the uploads into what the server may learn, update the
global model (FedAvg), regroup clients, train the group fusion module and refresh the
teacher's group preferences, hand adversary views to the callbacks, validate.
Model selection uses validation only; the test split is scored once, for the
selected round.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gfmfr_secure import schedules
from gfmfr_secure.aggregation import get_aggregator, group_sums
from gfmfr_secure.client.cohort import train_cohort
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.data import Split, sample_training
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.models import get_backbone, init_shared_params
from gfmfr_secure.rng import derive_seed, numpy_rng, torch_generator
from gfmfr_secure.server.fusion import GroupFusion
from gfmfr_secure.server.grouping import group_clients
from gfmfr_secure.server.step import ServerState, apply_fedavg_, update_teacher_
from gfmfr_secure.simulation.scoring import score_users
from gfmfr_secure.simulation.selection import ValidationSelector
from gfmfr_secure.types import AdversaryView, Exposure, LocalHyper

__all__ = ["FederatedRun", "run_federated", "SERVER_GROUPING", "RoundCallback"]

RoundCallback = Callable[[AdversaryView], None]

#: grouping methods the server runs over individual client features (need per-client exposure)
SERVER_GROUPING = ("spectral", "kmeans")


@dataclass
class FederatedRun:
    """Outcome of a federated run: final state at the selected round plus the record."""

    shared: Any
    store: ClientStateStore
    server: ServerState
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def _n_groups(cfg: Any) -> int:
    if not cfg.distill.enabled:
        return 0
    return 1 if cfg.grouping.method == "none" else int(cfg.grouping.num_groups)


def _make_fusion(cfg: Any, data: Any, n_groups: int, seed: int) -> GroupFusion | None:
    if n_groups == 0:
        return None
    mods = set(cfg.fusion.modalities)
    text = data.text_features if "text" in mods else None
    image = data.image_features if "image" in mods else None
    for name, feats in (("text", text), ("image", image)):
        if name in mods and feats is None:
            raise ConfigError(f"fusion.modalities includes {name!r} but the dataset has no {name} features")
    return GroupFusion.from_features(
        n_groups,
        cfg.model.latent_dim,
        text=None if text is None else torch.as_tensor(text, dtype=torch.float32),
        image=None if image is None else torch.as_tensor(image, dtype=torch.float32),
        n_items=data.n_items,
        embedding_dim=cfg.fusion.embedding_dim,
        operator=cfg.fusion.operator,
        generator=torch_generator(seed, "init", "fusion"),
    )


def _sample_cohort(eligible: np.ndarray, fraction: float, seed: int, round_idx: int) -> np.ndarray:
    """All eligible clients (fraction 1) or Poisson sampling with rate ``fraction``."""
    if fraction >= 1.0:
        return eligible
    rng = numpy_rng(seed, "cohort", round_idx)
    return eligible[rng.random(eligible.size) < fraction]


def run_federated(
    cfg: Any,
    data: Any,
    split: Split,
    *,
    logger: logging.Logger | None = None,
    callbacks: Sequence[RoundCallback] = (),
    progress: bool = True,
) -> FederatedRun:
    """Train a federated recommender as configured and score it.

    Parameters
    ----------
    cfg : ExperimentConfig.
    data : InteractionData (item features are read from it for the fusion module).
    split : the leave-one-out split.
    callbacks : receive one :class:`AdversaryView` per observer per round.
    """
    log = logger or logging.getLogger("gfmfr_secure")
    seed = int(cfg.seed)
    backbone = get_backbone(cfg.model.backbone)
    n_users, n_items, d = split.n_users, split.n_items, cfg.model.latent_dim
    tc = cfg.train
    if cfg.distill.enabled and backbone.private_head:
        raise ConfigError("distill.enabled needs a shared output layer; backbone 'pfedrec' keeps its head private")

    shared = init_shared_params(n_items, d, torch_generator(seed, "init", "shared"))
    store = ClientStateStore.create(
        n_users,
        n_items,
        d,
        user_embedding=backbone.user_embedding,
        personal_items=backbone.personal_items,
        private_head=shared.head_flat() if backbone.private_head else None,
        generator=torch_generator(seed, "init", "users"),
    )
    n_groups = _n_groups(cfg)
    server = ServerState(shared=shared, fusion=_make_fusion(cfg, data, n_groups, seed), teacher=None, assignment=np.full(n_users, -1, dtype=np.int64), n_groups=n_groups)
    aggregator = get_aggregator(cfg.aggregation.backend)
    grouping = cfg.grouping.method
    if n_groups and grouping in SERVER_GROUPING and aggregator.exposure != Exposure.PER_CLIENT:
        raise ConfigError(
            f"grouping.method={grouping!r} clusters individual client updates, which backend "
            f"{aggregator.name!r} does not expose; use grouping.method=oblivious"
        )
    if n_groups and grouping not in SERVER_GROUPING + ("none",):
        raise ConfigError(f"grouping.method={grouping!r} is not available in this version; known: spectral, kmeans, none")

    if cfg.data.negatives_exclude_heldout and not cfg.data.negatives_fixed:
        log.warning(
            "data.negatives_exclude_heldout without data.negatives_fixed leaks the held-out items "
            "(every other item is eventually drawn as a negative); metrics of this run are not comparable"
        )
    eligible = np.flatnonzero(split.train_counts() > 0).astype(np.int64)
    ks = tuple(cfg.eval.ks)

    def scorer(sh: Any, st: ClientStateStore) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda users: score_users(sh, st, backbone, users)

    selector = ValidationSelector(tc.patience)
    history: list[dict[str, Any]] = []
    timing = {"client": [], "server": [], "eval": []}
    fixed_samples = None
    bar = tqdm(range(tc.rounds), desc=f"{cfg.method}", disable=not progress, unit="round")
    for t in bar:
        rec: dict[str, Any] = {"round": t}
        cohort = _sample_cohort(eligible, tc.client_fraction, seed, t)
        rec["cohort"] = int(cohort.size)
        if cohort.size == 0:
            history.append(rec)
            continue
        t0 = time.perf_counter()
        if cfg.data.negatives_fixed:  # compatibility: one draw for every user, reused every round
            if fixed_samples is None:
                fixed_samples = sample_training(split, tc.num_negatives, numpy_rng(seed, "negatives", 0), exclude_heldout=cfg.data.negatives_exclude_heldout)
            samples = fixed_samples
        else:
            samples = sample_training(
                split, tc.num_negatives, numpy_rng(seed, "negatives", t), users=cohort, exclude_heldout=cfg.data.negatives_exclude_heldout
            )
        distill_on = server.teacher is not None
        hyper = LocalHyper(
            lr_network=schedules.network_lr(t, tc.lr, tc.lr_decay),
            lr_items=schedules.item_lr(t, tc.lr, tc.item_lr_scale, n_items, tc.item_lr_decay),
            weight_decay=tc.weight_decay,
            alpha=schedules.fedrap_weight(t, tc.alpha),
            beta=schedules.fedrap_weight(t, tc.beta),
            distill=schedules.distill_weight(t, tc.rounds, cfg.distill.schedule) if distill_on else 0.0,
            ema_decay=cfg.distill.ema_decay,
            max_ratio=cfg.distill.max_ratio,
            batch_size=tc.batch_size,
            epochs=tc.local_epochs,
            shuffle_seed=derive_seed(seed, "shuffle", t),
        )
        update = train_cohort(
            server.shared,
            store,
            backbone,
            cohort,
            samples.indptr,
            samples.items,
            samples.labels,
            hyper,
            teacher=server.teacher if distill_on else None,
            groups=store.group[cohort] if distill_on else None,
        )
        t1 = time.perf_counter()

        weights = update.n_samples.astype(np.float64) if tc.weighting == "samples" else np.ones(len(update))
        backend_groups = np.zeros(len(update), dtype=np.int64) if (n_groups and grouping == "none") else None
        agg = aggregator.aggregate(update, n_items=n_items, weights=weights, groups=backend_groups, n_groups=max(n_groups, 1))
        before = server.shared.clone()
        apply_fedavg_(server.shared, agg)
        regroup = n_groups and not (grouping in SERVER_GROUPING and len(update) < n_groups)
        if n_groups and not regroup:
            log.info("round %d: cohort of %d clients is smaller than G=%d; grouping and teacher kept", t, len(update), n_groups)
        if regroup:
            if grouping in SERVER_GROUPING:
                per_client = agg.per_client
                labels = group_clients(
                    per_client.head_after.numpy(),
                    per_client.clients,
                    server.assignment,
                    method=grouping,
                    n_groups=n_groups,
                    use_pca=cfg.grouping.use_pca,
                    pca_variance=cfg.grouping.pca_variance,
                    seed=derive_seed(seed, "grouping", t) % (2**31),
                )
                counts, g_item, g_head = group_sums(per_client, n_items, labels, n_groups)
                agg = dataclasses.replace(agg, group_counts=counts, group_item_sum=g_item, group_head_sum=g_head)
            else:
                labels = backend_groups
            server.assignment[cohort] = labels
            fusion_losses = update_teacher_(
                server,
                before,
                agg,
                epochs=cfg.fusion.server_epochs,
                batch_size=cfg.fusion.batch_size,
                lr=cfg.fusion.server_lr,
                weight_decay=tc.weight_decay,
                optimizer=cfg.fusion.server_optimizer,
                generator=torch_generator(seed, "fusion-shuffle", t),
            )
            store.group[cohort] = labels  # downlink: each client learns its group
            rec["fusion_loss"] = float(fusion_losses[-1]) if fusion_losses else None
            rec["group_sizes"] = [int(c) for c in agg.group_counts.tolist()]
        t2 = time.perf_counter()
        for cb in callbacks:
            _emit_views(cb, t, aggregator, agg, server)
        rec.update(loss=float(np.mean(update.loss)), client_s=t1 - t0, server_s=t2 - t1)
        timing["client"].append(t1 - t0)
        timing["server"].append(t2 - t1)

        if (t + 1) % tc.eval_every == 0 or t == tc.rounds - 1:
            t3 = time.perf_counter()
            val = evaluate_ranking(scorer(server.shared, store), split, "val", ks=ks, chunk_size=cfg.eval.chunk_users)
            timing["eval"].append(time.perf_counter() - t3)
            rec["val"] = val
            bar.set_postfix(loss=f"{rec['loss']:.4f}", ndcg10=f"{val['NDCG@10']:.4f}")
            log.info("round %d: loss %.4f val HR@10 %.4f NDCG@10 %.4f (client %.2fs, server %.2fs)", t, rec["loss"], val["HR@10"], val["NDCG@10"], rec["client_s"], rec["server_s"])
            if selector.observe(t, val, lambda: (server.shared.clone(), store.snapshot())):
                history.append(rec)
                log.info("early stop after round %d (best round %d)", t, selector.best_round)
                break
        history.append(rec)
    bar.close()

    if selector.snapshot is None:
        raise RuntimeError("no validation round was run; check eval.every and train.rounds")
    sel_shared, sel_store = selector.snapshot
    test = evaluate_ranking(scorer(sel_shared, sel_store), split, "test", ks=ks, chunk_size=cfg.eval.chunk_users)
    metrics = {
        "val": selector.best_val,
        "test": test,
        "best_round": selector.best_round,
        "rounds_run": len(history),
        "timing": {
            "client_s_per_round": float(np.mean(timing["client"])) if timing["client"] else 0.0,
            "server_s_per_round": float(np.mean(timing["server"])) if timing["server"] else 0.0,
            "eval_s": float(np.mean(timing["eval"])) if timing["eval"] else 0.0,
        },
    }
    return FederatedRun(shared=sel_shared, store=sel_store, server=server, metrics=metrics, history=history)


def _emit_views(cb: RoundCallback, t: int, aggregator: Any, agg: Any, server: ServerState) -> None:
    """Hand the round's adversary views (server and outsider) to a callback."""
    if aggregator.exposure == Exposure.PER_CLIENT:
        received = {"per_client": agg.per_client}
    else:
        received = {}
    received.update(item_sum=agg.item_sum, head_sum=agg.head_sum, group_counts=agg.group_counts, group_item_sum=agg.group_item_sum, group_head_sum=agg.group_head_sum, weight_total=agg.weight_total)
    released = {"shared": server.shared.clone(), "teacher": None if server.teacher is None else server.teacher.clone()}
    meta = {"n_clients": agg.n_clients, "n_groups": server.n_groups}
    cb(AdversaryView(round=t, backend=aggregator.name, exposure=aggregator.exposure, observer="server", received=received, released=released, meta=meta))
    cb(AdversaryView(round=t, backend=aggregator.name, exposure=aggregator.exposure, observer="outsider", received={}, released=released, meta=meta))
