"""The federated round loop (GFMFR and the federated baselines).

One round (DESIGN section 2): sample a cohort, train it locally (vectorised), let
the aggregation backend turn the uploads into what the server may learn, update the
global model (FedAvg), regroup clients, train the group fusion module and refresh the
teacher's group preferences, hand adversary views to the callbacks, validate.
Model selection uses validation only; the test split is scored once, for the
selected round. With a :class:`~gfmfr_secure.simulation.checkpoint.Checkpointer` the
loop's state is saved after each round, and a saved
:class:`~gfmfr_secure.simulation.checkpoint.LoopState` continues a run where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gfmfr_secure import schedules
from gfmfr_secure.aggregation import get_aggregator, group_sums
from gfmfr_secure.client.checks import ClientRefusal, broadcast_digest, broadcast_refusals, check_reported_counts, verify_count_evidence
from gfmfr_secure.client.cohort import train_cohort
from gfmfr_secure.client.state import ClientRows, ClientStateStore
from gfmfr_secure.data import Split, sample_training
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.privacy.mechanisms import noisy_unclipped_fraction
from gfmfr_secure.models import get_backbone, init_shared_params
from gfmfr_secure.privacy.release import (
    NoiseShares,
    ReleaseLayout,
    ReleaseNoise,
    central_noise,
    noise_release,
)
from gfmfr_secure.rng import SecretSource, derive_seed, numpy_rng, secret_normal, torch_generator
from gfmfr_secure.server.fusion import GroupFusion
from gfmfr_secure.server.grouping import SERVER_GROUPING, group_clients, merge_small_groups, nearest_centroid
from gfmfr_secure.server.step import ServerState, apply_fedavg_, update_teacher_
from gfmfr_secure.simulation.checkpoint import (
    Checkpointer,
    LoopState,
    dp_state,
    global_rng_state,
    restore_dp,
    restore_selector,
    selector_state,
    set_global_rng_state,
)
from gfmfr_secure.simulation.dp import RecordLevelDP, clip_upload, plan_privacy, privacy_report
from gfmfr_secure.simulation.group_floor import count_phase, floor_report, secrets_report
from gfmfr_secure.simulation.scoring import score_users
from gfmfr_secure.simulation.selection import ValidationSelector
from gfmfr_secure.types import AdversaryView, CohortUpdate, Exposure, LocalHyper

__all__ = ["SERVER_GROUPING", "FederatedRun", "RoundCallback", "evaluation_users", "run_federated"]

RoundCallback = Callable[[AdversaryView], None]

#: grouping methods in which each client picks its own group (the server learns group sums only)
CLIENT_GROUPING = ("oblivious", "none")


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
            found = [m for m in cfg.fusion.modalities if getattr(data, f"{m}_features", None) is not None]
            raise ConfigError(
                f"fusion.modalities includes {name!r} but the dataset has no {name} features (no {name}_feat.npy "
                f"in the data folder or beside the CSV, no data.{name}_features=FILE.npy); to train without them add "
                f"--set 'fusion.modalities=[{','.join(found)}]'"
                + ("" if found else " (ID-only: groups are fused with a learned item-id embedding)")
            )
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
    participants: np.ndarray | None = None,
    upload_hook: Callable[[Any, int], Any] | None = None,
    checkpoint: Checkpointer | None = None,
    resume: LoopState | None = None,
    label: str | None = None,
) -> FederatedRun:
    """Train a federated recommender as configured and score it.

    Parameters
    ----------
    cfg : ExperimentConfig.
    data : InteractionData (item features are read from it for the fusion module).
    split : the leave-one-out split.
    callbacks : receive one :class:`AdversaryView` per observer per round.
    participants : int64 user ids allowed to take part in training (default: every user
        with training data). Others never train or upload (membership experiments, DP
        audits); all users are still evaluated.
    upload_hook : ``f(upload, round) -> upload`` called on the cohort's clipped uploads just
        before aggregation; it may append synthetic clients (DP audits insert canary updates
        this way). Appended clients never train and are not in the client store.
    checkpoint : saves the loop's state after the rounds it says are due.
    resume : a saved state (from ``checkpoint.load()``) to continue from instead of round 0;
        ``cfg`` and the data must be those it was saved with.
    label : the progress bar's label (default: the method). The bar is drawn only when
        ``progress`` and stderr is a terminal.
    """
    log = logger or logging.getLogger("gfmfr_secure")
    seed = int(cfg.seed)
    backbone = get_backbone(cfg.model.backbone)
    n_users, n_items, d = split.n_users, split.n_items, cfg.model.latent_dim
    tc = cfg.train
    if cfg.distill.enabled and backbone.private_head:
        raise ConfigError("distill.enabled needs a shared output layer; backbone 'pfedrec' keeps its head private")

    mc = cfg.model
    shared = init_shared_params(
        n_items, d, torch_generator(seed, "init", "shared"), mc.item_init_std, scorer=mc.scorer, user_std=mc.user_init_std
    )
    store = ClientStateStore.create(
        n_users,
        n_items,
        d,
        user_embedding=backbone.user_embedding,
        personal_items=backbone.personal_items,
        private_head=shared.head_flat() if backbone.private_head else None,
        generator=torch_generator(seed, "init", "users"),
        user_std=mc.user_init_std,
    )
    n_groups = _n_groups(cfg)
    server = ServerState(shared=shared, fusion=_make_fusion(cfg, data, n_groups, seed), teacher=None, assignment=np.full(n_users, -1, dtype=np.int64), n_groups=n_groups)
    secret_source = SecretSource(cfg.secrets, seed)  # keys, masks and DP noise: not the run seed unless reproducible
    aggregator = get_aggregator(cfg.aggregation.backend, settings=cfg.aggregation, seed=seed, secrets=cfg.secrets, min_group_size=cfg.grouping.min_group_size)
    grouping = cfg.grouping.method
    # the clients' checks (broadcast consistency, verified counts, round parameters) matter where the
    # server sees only sums; under plain it receives every upload anyway
    secure = aggregator.exposure != Exposure.PER_CLIENT
    grouped_floor = bool(n_groups) and grouping == "oblivious"  # counts first, small groups merged
    floor = cfg.grouping.min_group_size if grouped_floor or secure else None  # no release below it
    check_stats = {"refused_rounds": 0, "broadcast_refusals": 0}
    floor_stats: dict[str, Any] = {"merged_rounds": 0, "skipped_rounds": 0, "smallest": None}
    if n_groups and grouping in SERVER_GROUPING and aggregator.exposure != Exposure.PER_CLIENT:
        raise ConfigError(
            f"grouping.method={grouping!r} clusters individual client updates, which backend "
            f"{aggregator.name!r} does not expose; use grouping.method=oblivious"
        )
    if n_groups and grouping not in SERVER_GROUPING + CLIENT_GROUPING:
        raise ConfigError(f"grouping.method={grouping!r} is unknown; known: {', '.join(SERVER_GROUPING + CLIENT_GROUPING)}")

    if cfg.data.negatives_exclude_heldout and not cfg.data.negatives_fixed:
        log.warning(
            "data.negatives_exclude_heldout without data.negatives_fixed leaks the held-out items "
            "(every other item is eventually drawn as a negative); metrics of this run are not comparable"
        )
    eligible = np.flatnonzero(split.train_counts() > 0).astype(np.int64)
    if participants is not None:
        eligible = np.intersect1d(eligible, np.asarray(participants, dtype=np.int64))
        if eligible.size == 0:
            raise ConfigError("participants leaves no user with training data")
    if floor is not None and eligible.size < floor:
        raise ConfigError(
            f"grouping.min_group_size={floor} exceeds the {eligible.size} clients that can take part: no round could "
            f"release a {'group ' if grouped_floor else 'secure '}sum; lower grouping.min_group_size (>= 2) or use more clients"
        )
    ks = tuple(cfg.eval.ks)
    dp = plan_privacy(cfg, eligible.size, logger=log)
    record_dp = RecordLevelDP(cfg.privacy, seed, n_items, secrets=secret_source) if cfg.privacy.mechanism == "dpsgd" else None
    if record_dp is not None and tc.weighting != "uniform":
        raise ConfigError("privacy.mechanism=dpsgd: clients do not upload their sample counts; set train.weighting=uniform")
    head_size = 0 if backbone.private_head else shared.head_flat().numel()
    init_groups = numpy_rng(seed, "oblivious-init").integers(0, max(n_groups, 1), size=n_users) if grouping == "oblivious" else None
    centroids: np.ndarray | None = None  # oblivious grouping: [G, H] mean head update of each group

    def scorer(sh: Any, st: ClientStateStore) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda users: score_users(sh, st, backbone, users, scorer=mc.scorer)

    eval_users = evaluation_users(split, cfg.eval.max_users, seed)
    if eval_users is not None:
        log.info("validation and test rank a fixed sample of %d of the %d users with a test item (eval.max_users)", eval_users.size, int((split.test_items >= 0).sum()))

    selector = ValidationSelector(tc.patience, mode=tc.selection)
    history: list[dict[str, Any]] = []
    timing: dict[str, list[float]] = {"client": [], "server": [], "eval": []}
    fixed_samples = None
    start, stopped = 0, False
    if resume is not None:
        start, stopped = resume.next_round, resume.stopped
        server.shared, store = resume.shared, resume.store
        if server.fusion is not None and resume.fusion is not None:
            server.fusion.load_state_dict(resume.fusion)
        server.teacher, server.assignment, centroids = resume.teacher, resume.assignment, resume.centroids
        aggregator.rounds_done = resume.aggregator_rounds
        floor_stats, history, timing = resume.floor_stats, resume.history, resume.timing
        restore_dp(dp, resume.dp)
        if record_dp is not None and resume.dpsgd_events is not None:
            record_dp.events = resume.dpsgd_events
        restore_selector(selector, resume.selector, resume.snapshot)
        set_global_rng_state(resume.rng)
        log.info("resuming after round %d of %d%s", start - 1, tc.rounds, " (early stopping had ended training)" if stopped else "")

    def finish(t: int, rec: dict[str, Any], stop: bool = False) -> None:
        """Close round ``t``: add its record to the history and save a checkpoint when due."""
        history.append(rec)
        if checkpoint is None or not checkpoint.due(t, tc.rounds, stop):
            return
        state = LoopState(
            next_round=t + 1, stopped=stop, shared=server.shared, store=store, teacher=server.teacher,
            fusion=None if server.fusion is None else server.fusion.state_dict(),
            assignment=server.assignment, centroids=centroids, aggregator_rounds=aggregator.rounds_done,
            floor_stats=floor_stats, dp=dp_state(dp), dpsgd_events=None if record_dp is None else record_dp.events,
            selector=selector_state(selector), snapshot=selector.snapshot, history=history, timing=timing,
            rng=global_rng_state(),
        )
        seconds, size = checkpoint.save(state)
        log.info("round %d: checkpoint written in %.2fs (%.0f MB)", t, seconds, size / 1e6)

    def validate(t: int, rec: dict[str, Any], note: str) -> bool:
        """Validate after round ``t`` when due, into ``rec``; True when early stopping says stop."""
        if not ((t + 1) % tc.eval_every == 0 or t == tc.rounds - 1):
            return False
        t3 = time.perf_counter()
        val = evaluate_ranking(scorer(server.shared, store), split, "val", ks=ks, chunk_size=cfg.eval.chunk_users, users=eval_users)
        timing["eval"].append(time.perf_counter() - t3)
        rec["val"] = val
        bar.set_postfix(ndcg10=f"{val['NDCG@10']:.4f}")
        log.info("round %d: val HR@10 %.4f NDCG@10 %.4f (%s)", t, val["HR@10"], val["NDCG@10"], note)
        return selector.observe(t, val, lambda: (server.shared.clone(), store.snapshot()))

    def release_nothing(t: int, rec: dict[str, Any], why: str) -> bool:
        """Close round ``t`` that released no sum; True when early stopping ends training."""
        rec["skipped"] = why
        if dp is not None:  # the round happened (and under the floor its counts were released): account for it
            dp.record(t)
        # clients that trained kept their private state: validate as usual
        if validate(t, rec, "nothing released"):
            finish(t, rec, stop=True)
            log.info("early stop after round %d (best round %d)", t, selector.best_round)
            return True
        finish(t, rec)
        return False

    def refuse(t: int, rec: dict[str, Any], err: ClientRefusal) -> bool:
        """The clients refused round ``t`` (one of their checks failed): nothing is released."""
        log.warning("round %d: the clients refused the round, nothing is released: %s", t, err)
        check_stats["refused_rounds"] += 1
        rec["refused"] = str(err)
        return release_nothing(t, rec, "clients refused the round")

    bar = tqdm(range(tc.rounds if stopped else start, tc.rounds), desc=label or cfg.method, disable=None if progress else True, unit="round", initial=start, total=tc.rounds)
    for t in bar:
        rec: dict[str, Any] = {"round": t}
        if dp is not None and not dp.fits(t):
            log.info("round %d would exceed the privacy budget (epsilon %.4g of %.4g spent): training stops", t, dp.epsilon(), dp.target_epsilon)
            break
        cohort = _sample_cohort(eligible, tc.client_fraction, seed, t)
        if dp is None:  # under user-level DP the exact cohort size is not released (the noised counts are)
            rec["cohort"] = int(cohort.size)
        if cohort.size == 0:
            if dp is not None:  # the round happened (sampling is data-independent); account for it
                dp.record(t)
            if validate(t, rec, "empty cohort"):
                finish(t, rec, stop=True)
                break
            finish(t, rec)
            continue
        t0 = time.perf_counter()
        if secure and cohort.size >= floor:  # (below the floor nothing is released anyway)
            # every client attests what it received; one with too few neighbours attesting the same refuses
            refused = broadcast_refusals_of(aggregator, server, centroids, cohort, t)
            if refused.any():
                log.warning("round %d: %d clients refused the broadcast (too few neighbours attested the one they received)", t, int(refused.sum()))
                check_stats["broadcast_refusals"] += int(refused.sum())
                rec["broadcast_refusals"] = int(refused.sum())
                cohort = cohort[~refused]  # they neither train on the broadcast nor upload
                if cohort.size < floor:
                    stop = release_nothing(t, rec, "cohort below grouping.min_group_size after broadcast refusals")
                    floor_stats["skipped_rounds"] += 1
                    if stop:
                        break
                    continue
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
            scorer=mc.scorer,
            lr_user=schedules.item_lr(t, tc.user_lr, 1.0, n_items, tc.item_lr_decay),
            embedding_weight_decay=tc.embedding_weight_decay,
        )
        if record_dp is None:
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
        else:
            update = record_dp.train(server.shared, store, backbone, cohort, samples, hyper, t, teacher=server.teacher if distill_on else None, groups=store.group[cohort] if distill_on else None)
        t1 = time.perf_counter()
        _check_finite(update, t, hyper)

        # ---- client side: clip, pick a group (oblivious), add own noise share
        upload, norms = clip_upload(update, dp, cfg)
        client_groups = None
        if n_groups and grouping == "oblivious":
            # [n, H] this round's head change as it enters the group sums (clipped), like the centroids
            offsets = upload.head_delta if upload.head_delta is not None else update.head_after - server.shared.head_flat().unsqueeze(0)
            client_groups = oblivious_groups(store, cohort, offsets, centroids, init_groups)
        elif n_groups and grouping == "none":
            client_groups = np.zeros(len(update), dtype=np.int64)
        if not (n_groups and grouping in SERVER_GROUPING):
            upload = dataclasses.replace(upload, head_after=None)  # only server-side grouping needs it
        if client_groups is not None:
            upload = dataclasses.replace(upload, group=client_groups)
        if upload_hook is not None:
            upload = upload_hook(upload, t)
            if client_groups is not None:
                client_groups = upload.group
            if n_groups and grouping in SERVER_GROUPING and len(upload) != len(update):
                raise ConfigError("synthetic clients from upload_hook need client-side grouping (oblivious or none)")

        # ---- group floor: no secure sum below it; under oblivious grouping a count phase first,
        # checked by the clients, and groups below the floor merged before any sum
        phase_counts = None
        if floor is not None:
            if grouped_floor and len(upload) >= floor:
                try:
                    phase_counts, count_cost = counted_groups(aggregator, upload, client_groups, n_groups, dp, secret_source, t, secure)
                except ClientRefusal as err:
                    if refuse(t, rec, err):
                        break
                    continue
                merge = merge_small_groups(phase_counts, centroids, floor)
                phase_counts = np.bincount(merge, weights=phase_counts, minlength=n_groups)
                floor_stats["merged_rounds"] += int((merge != np.arange(n_groups)).any())
                client_groups = merge[client_groups]  # each client maps its own choice
                upload = dataclasses.replace(upload, group=client_groups)
            if not releasable(len(upload), phase_counts, floor):
                log.info("round %d: cohort of %d clients is below grouping.min_group_size=%d; nothing is released", t, len(upload), floor)
                floor_stats["skipped_rounds"] += 1
                if release_nothing(t, rec, "cohort below grouping.min_group_size"):
                    break
                continue
            if phase_counts is not None:
                rec["count_cost"] = count_cost

        # ---- aggregation backend, then (paper mode) grouping by the server
        if tc.weighting == "samples" and len(upload) != len(update):
            raise ConfigError("synthetic clients from upload_hook need train.weighting=uniform")
        weights = update.n_samples.astype(np.float64) if tc.weighting == "samples" else np.ones(len(upload))
        server_grouped = bool(n_groups) and grouping in SERVER_GROUPING
        release_noise = shares = None
        if dp is not None and not server_grouped:  # groups are the clients' own: noise goes into the backend
            layout = ReleaseLayout(max(n_groups, 1), n_items, d, head_size, dp.count_value, write_count=phase_counts is None)
            share_std = dp.share_std(len(upload), aggregator.min_reporting(len(upload)))
            shares = NoiseShares(secret_source.key("dp-share", t), t, upload.clients, share_std, layout) if share_std > 0 else None
            release_noise = ReleaseNoise(layout, central_noise(layout, dp.central_std(), secret_source.key("dp-central", t)), shares)
        try:
            agg = aggregator.aggregate(upload, n_items=n_items, weights=weights, groups=client_groups, n_groups=max(n_groups, 1), noise=release_noise)
        except ClientRefusal as err:  # check_round_parameters: a round the clients' own configuration forbids
            if refuse(t, rec, err):
                break
            continue
        if phase_counts is not None and dp is not None:  # the counts were released (noised) in the count phase
            agg = dataclasses.replace(agg, group_counts=torch.as_tensor(phase_counts, dtype=torch.float32), weight_total=max(float(phase_counts.sum()), 1.0))
        if phase_counts is not None:
            released = agg.group_counts.double().numpy()
            smallest = float(released[released >= 0.5].min()) if (released >= 0.5).any() else None
            if smallest is not None and (floor_stats["smallest"] is None or smallest < floor_stats["smallest"]):
                floor_stats["smallest"] = smallest
        rec["cost"] = dict(aggregator.last_cost)
        if dp is not None and aggregator.exposure == Exposure.PER_CLIENT:
            rec["cost"].pop("bytes_up_per_client", None)  # plain: the mean count of touched rows, a raw statistic
        rec["cost"].update({f"count_phase_{k}": v for k, v in rec.pop("count_cost", {}).items()})
        rec["cost"]["broadcast_bytes_per_client"] = float(4 * (server.shared.item_table.numel() + head_size + (0 if server.teacher is None else server.teacher.numel()) + (0 if centroids is None else centroids.size)))
        regroup = bool(n_groups) and not (grouping in SERVER_GROUPING and len(update) < n_groups)
        if n_groups and not regroup:
            log.info("round %d: cohort of %d clients is smaller than G=%d; grouping and teacher kept", t, len(update), n_groups)
        labels = client_groups
        t_group = time.perf_counter()
        if regroup and grouping in SERVER_GROUPING:
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
            server.assignment[cohort] = labels

        rec["grouping_s"] = time.perf_counter() - t_group
        # ---- differential privacy: the paper's server-side grouping noises the sums it formed itself
        if dp is not None and server_grouped:
            blocks = n_groups if agg.group_counts is not None else 1
            layout = ReleaseLayout(blocks, n_items, d, head_size, dp.count_value)
            noise = central_noise(layout, dp.central_std(), secret_source.key("dp-central", t))
            share_std = dp.share_std(len(update))
            if share_std > 0:  # each client's single-block share lands in the group the server chose
                shares = NoiseShares(secret_source.key("dp-share", t), t, cohort, share_std, dataclasses.replace(layout, n_groups=1))
                noise = noise + shares.sum_by_group(labels if blocks > 1 else None).view(layout.shape)
            agg = noise_release(agg, noise, layout)
        if dp is not None:
            dp.record(t)
            # only released, noised quantities: no statistic of the raw updates (their median norm) goes to history
            rec["dp"] = {"clip": dp.clip, "epsilon": dp.epsilon()}
            if dp.adaptive:
                count_noise = float(secret_normal(secret_source.key("dp-count", t), (1,))[0]) * dp.count_stddev
                dp.adapt_clip(noisy_unclipped_fraction(norms, dp.clip, count_noise, tc.client_fraction * eligible.size))

        # ---- server: FedAvg, centroids, fusion and teacher
        before = server.shared.clone()
        apply_fedavg_(server.shared, agg, items=tc.item_aggregation)
        if regroup:
            if grouping == "oblivious" and agg.group_head_sum is not None:
                centroids = _update_centroids(centroids, agg)
            t_fusion = time.perf_counter()
            fusion_losses = update_teacher_(
                server,
                before,
                agg,
                epochs=cfg.fusion.server_epochs,
                batch_size=cfg.fusion.batch_size,
                lr=cfg.fusion.server_lr,
                weight_decay=tc.weight_decay,
                optimizer=cfg.fusion.server_optimizer,
                compiled=cfg.fusion.compile,
                generator=torch_generator(seed, "fusion-shuffle", t),
            )
            rec["fusion_s"] = time.perf_counter() - t_fusion  # fusion training and teacher
            store.group[cohort] = labels[: cohort.size]  # each client knows its own group
            rec["fusion_loss"] = float(fusion_losses[-1]) if fusion_losses else None
            rec["group_sizes"] = [round(float(c), 3) for c in agg.group_counts.tolist()]
        t2 = time.perf_counter()
        for cb in callbacks:
            _emit_views(cb, t, aggregator, agg, server, upload, shares, dp, before, client_groups if client_groups is not None else labels, grouping)
        rec.update(client_s=t1 - t0, server_s=t2 - t1)
        mean_loss = float(np.mean(update.loss))  # of the raw local training: logged, kept out of history under DP
        if dp is None and record_dp is None:
            rec["loss"] = mean_loss
        timing["client"].append(t1 - t0)
        timing["server"].append(t2 - t1)

        if validate(t, rec, f"loss {mean_loss:.4f}, client {rec['client_s']:.2f}s, server {rec['server_s']:.2f}s"):
            finish(t, rec, stop=True)
            log.info("early stop after round %d (best round %d)", t, selector.best_round)
            break
        finish(t, rec)
    bar.close()

    if selector.snapshot is None:
        raise RuntimeError("no validation round was run; check eval.every and train.rounds")
    sel_shared, sel_store = selector.snapshot
    test = evaluate_ranking(scorer(sel_shared, sel_store), split, "test", ks=ks, chunk_size=cfg.eval.chunk_users, users=eval_users)
    metrics = {
        "privacy": record_dp.report(cfg, grouping, n_groups) if record_dp is not None else privacy_report(cfg, dp, grouping, n_groups),
        "val": selector.best_val,
        "test": test,
        "best_round": selector.best_round,
        "rounds_run": len(history),
        "cost": _mean_cost(history),
        "secrets": cfg.secrets,
        "timing": {
            "client_s_per_round": float(np.mean(timing["client"])) if timing["client"] else 0.0,
            "server_s_per_round": float(np.mean(timing["server"])) if timing["server"] else 0.0,
            "eval_s": float(np.mean(timing["eval"])) if timing["eval"] else 0.0,
        },
    }
    privacy = metrics["privacy"]
    privacy["secrets"] = secrets_report(cfg.secrets)
    if cfg.secrets == "reproducible" and privacy.get("epsilon") is not None:
        reason = "secrets=reproducible: the DP noise follows from the seed written to config.yaml and run.json"
        privacy["epsilon"] = None
        privacy["epsilon_withheld_because"] = "; ".join(filter(None, [privacy.get("epsilon_withheld_because"), reason]))
    if floor is not None:
        privacy["group_floor"] = floor_report(floor, floor_stats["merged_rounds"], floor_stats["skipped_rounds"], floor_stats["smallest"])
    if secure:
        privacy["client_checks"] = dict(check_stats)
    return FederatedRun(shared=sel_shared, store=sel_store, server=server, metrics=metrics, history=history)


def deliver_broadcast(server: ServerState, centroids: np.ndarray | None, cohort: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray]:
    """What the server sends the cohort at the start of a round.

    Returns the distinct broadcasts (each: shared item table ``[I, d]``, head ``[H]``, teacher
    ``[G, I]`` or None, centroids ``[G, H]`` or None) and int64 [n] which one each client
    received. The in-process server sends every client the same objects: one broadcast.
    """
    parts = {"item_table": server.shared.item_table, "head": server.shared.head_flat(), "teacher": server.teacher, "centroids": centroids}
    return [parts], np.zeros(cohort.size, dtype=np.int64)


def broadcast_refusals_of(aggregator: Any, server: ServerState, centroids: np.ndarray | None, cohort: np.ndarray, round_idx: int) -> np.ndarray:
    """The broadcast-consistency check of a secure round; bool [n], True for each client that refuses.

    Each distinct broadcast is hashed once (:func:`~gfmfr_secure.client.checks.broadcast_digest`);
    clients compare digests with the neighbours the backend's attestation graph gives them
    (:func:`~gfmfr_secure.client.checks.broadcast_refusals`).
    """
    sent, received = deliver_broadcast(server, centroids, cohort)
    digests = [broadcast_digest(round_idx, parts) for parts in sent]
    first = {dg: i for i, dg in reversed(list(enumerate(digests)))}  # equal bytes, equal class
    classes = np.array([first[dg] for dg in digests], dtype=np.int64)[received]
    graph, min_matching = aggregator.attestation_scope(int(cohort.size))
    return broadcast_refusals(classes, graph, min_matching)


def counted_groups(
    aggregator: Any, upload: CohortUpdate, groups: np.ndarray, n_groups: int, dp: Any, source: SecretSource, round_idx: int, verify: bool
) -> tuple[np.ndarray, dict[str, float]]:
    """The count phase and, under a secure backend, the clients' check of the counts the server reports.

    Returns the reported counts float64 [G] and the phase's cost. With ``verify`` the
    backend keeps the phase's evidence (masking: its transcript; ckks: the key holder's
    release) and the clients refuse counts that differ from it.

    Raises
    ------
    ClientRefusal
        The reported counts differ from the verified ones, or the evidence does not verify.
    """
    aggregator.record_transcript = verify
    try:
        counts, cost = count_phase(aggregator, upload, groups, n_groups, dp, source, round_idx)
    finally:
        aggregator.record_transcript = False
    if verify:
        check_reported_counts(counts, verify_count_evidence(aggregator.last_evidence), tolerance=COUNT_TOLERANCE)
    return counts, cost


#: slack on a verified count: the float32 decoding of a count of up to ~10^4 (a lie moves a count by >= 1)
COUNT_TOLERANCE = 1e-2


def releasable(n: int, counts: np.ndarray | None, floor: int) -> bool:
    """The honest server's floor: a round of ``n`` uploads releases sums only when ``n >= floor``
    and, after the merge, some group count reaches it."""
    return n >= floor and (counts is None or float(counts.max()) >= floor)


def evaluation_users(split: Split, max_users: int, seed: int) -> np.ndarray | None:
    """The users validation and test rank: None (all) or a fixed sample, int64 [max_users] ascending.

    With more than ``max_users`` users holding a test item (and ``max_users > 0``),
    ``max_users`` of them are drawn uniformly without replacement from the run's seed;
    every validation and the test use the same sample (a validation ranks those of
    them with a validation item).
    """
    candidates = np.flatnonzero(split.test_items >= 0)
    if max_users <= 0 or candidates.size <= max_users:
        return None
    rng = numpy_rng(seed, "eval-users")
    return np.sort(rng.choice(candidates, size=max_users, replace=False))


def _check_finite(update: CohortUpdate, round_idx: int, hyper: LocalHyper) -> None:
    """Raise ``FloatingPointError`` naming the clients whose local training diverged.

    A client's update is checked where the client produced it, before clipping,
    aggregation or the server's fusion see it (there a NaN would surface as an
    unrelated-looking error, or silently poison every group).
    """
    bad = ~np.isfinite(update.loss)
    # A finite sum proves every entry finite (NaN and inf propagate); only a
    # non-finite sum, which a huge but finite update can also give, needs the
    # row-by-row test that names the clients. One pass and no [R, d] mask.
    if not bool(torch.isfinite(update.item_delta.sum())):
        rows_bad = ~torch.isfinite(update.item_delta).all(dim=1).numpy()
        owner = np.searchsorted(update.row_ptr, np.flatnonzero(rows_bad), side="right") - 1
        bad[np.unique(owner)] = True
    for tensor in (update.head_delta, update.head_after):
        if tensor is not None and not bool(torch.isfinite(tensor.sum())):
            bad |= ~torch.isfinite(tensor).all(dim=1).numpy()
    if bad.any():
        raise FloatingPointError(
            f"round {round_idx}: local training diverged (non-finite loss or update) for "
            f"{int(bad.sum())} of {len(update)} clients, e.g. users {update.clients[bad][:5].tolist()}; "
            f"lower train.lr, train.item_lr_scale or train.user_lr (network lr this round {hyper.lr_network:g}, "
            f"item-table lr {hyper.lr_items:g}, user-vector lr {hyper.lr_user:g})"
        )


def _mean_cost(history: list[dict[str, Any]]) -> dict[str, float]:
    """Per-round aggregation cost averaged over rounds (bytes per client, seconds)."""
    costs = [h["cost"] for h in history if h.get("cost")]
    keys = sorted({k for c in costs for k in c})
    return {k: float(np.mean([c[k] for c in costs if k in c])) for k in keys}


def oblivious_groups(
    store: ClientStateStore, cohort: np.ndarray, offsets: torch.Tensor, centroids: np.ndarray | None, init_groups: np.ndarray
) -> np.ndarray:
    """Client side of oblivious grouping (one federated k-means step per round); [n] int64 groups.

    The broadcast centroids are the group means of the (clipped) head changes of the round
    that produced them, so each client compares them with its own clipped head change *of
    that same round* (``store.head_offset``), not with this round's: the whole cohort's head change
    drifts from round to round, and measured against last round's centroids it put every
    client of ML-100K in one group from round 1 on. A client without a previous change
    (first round, or not sampled before) keeps the data-independent random partition
    ``init_groups``. Afterwards this round's change is stored for the next round.

    Parameters
    ----------
    store : the clients' private state (``head_offset``, rows ``[U, H]`` kept for the clients
        that took part, is created here).
    cohort : [n] int64 user ids; offsets : [n, H] this round's head changes.
    centroids : [G, H] broadcast centroids, or None before any were released.
    init_groups : [U] int64 random partition.
    """
    if store.head_offset is None:
        store.head_offset = ClientRows(init_groups.size, torch.full((offsets.shape[1],), float("nan")))
    groups = init_groups[cohort].copy()
    if centroids is not None:
        previous = store.head_offset.gather(cohort)
        known = ~torch.isnan(previous).any(dim=1)
        if bool(known.any()):
            groups[known.numpy()] = nearest_centroid(previous[known].double().numpy(), centroids)
    store.head_offset.scatter(cohort, offsets.float())
    return groups


def _update_centroids(centroids: np.ndarray | None, agg: Any) -> np.ndarray:
    """Federated k-means step: each group's mean head update, from the (noised) group sums.

    Groups that received no members keep their previous centroid (zeros before any).
    """
    counts = agg.group_counts.double()
    mean = (agg.group_head_sum.double() / counts.clamp(min=1.0).unsqueeze(1)).numpy()
    out = np.zeros_like(mean) if centroids is None else centroids.copy()
    has = (counts >= 0.5).numpy()
    out[has] = mean[has]
    return out


def _emit_views(
    cb: RoundCallback, t: int, aggregator: Any, agg: Any, server: ServerState, upload: Any, shares: Any, dp: Any, broadcast: Any, groups: Any,
    grouping: str,
) -> None:
    """Hand the round's adversary views (server and outsider) to a callback.

    Under ``plain`` the server receives each client's upload as sent (clipped when
    DP is on; its own noise share, if any, in ``noise_shares``), and the released
    sums; secure backends give it only the sums.
    """
    if aggregator.exposure == Exposure.PER_CLIENT:
        # with noise shares a client uploads its dense noisy vector: row_items are then not visible
        received = {"per_client": upload, "noise_shares": shares, "upload_format": "sparse" if shares is None else "dense"}
    else:
        received = {}
    received["broadcast"] = broadcast  # the model the server sent at the start of the round
    received.update(item_sum=agg.item_sum, head_sum=agg.head_sum, group_counts=agg.group_counts, group_item_sum=agg.group_item_sum, group_head_sum=agg.group_head_sum, weight_total=agg.weight_total)
    released = {"shared": server.shared.clone(), "teacher": None if server.teacher is None else server.teacher.clone()}
    meta = {"n_clients": agg.n_clients, "n_groups": server.n_groups, "grouping": grouping, "dp": None if dp is None else {"mechanism": dp.mechanism, "clip": dp.clip, "noise_multiplier": dp.noise_multiplier}}
    truth = {"clients": upload.clients, "groups": None if groups is None else np.asarray(groups)}
    cb(AdversaryView(round=t, backend=aggregator.name, exposure=aggregator.exposure, observer="server", received=received, released=released, meta=meta, truth=truth))
    cb(AdversaryView(round=t, backend=aggregator.name, exposure=aggregator.exposure, observer="outsider", received={}, released=released, meta=meta, truth=truth))
