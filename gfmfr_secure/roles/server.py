"""The server role: broadcast out, uploads and sums in, FedAvg, grouping, fusion, validation.

:class:`FederatedServer` runs the rounds of DESIGN section 2 over any
:class:`~gfmfr_secure.roles.transport.Clients` transport, with nothing but server-side
data (:class:`ServerData`: the sizes and the item features) and the messages that cross
the boundary. It never imports or holds client-side state (a test walks its imports):
under a secure backend it receives only the released sums; the clients choose their
oblivious groups, clip, add their noise shares and keep their state to themselves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gfmfr_secure import schedules
from gfmfr_secure.aggregation import AGGREGATORS, group_sums
from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.models import SharedParams, get_backbone, init_shared_params
from gfmfr_secure.privacy.release import Release, ReleaseLayout, noise_release
from gfmfr_secure.rng import SecretSource, derive_seed, numpy_rng, secret_normal, torch_generator
from gfmfr_secure.roles.messages import Assignment, Broadcast, EvalReply, EvalRequest, KeepSnapshot, SumReply, SumRequest, Upload
from gfmfr_secure.roles.transport import Clients
from gfmfr_secure.server.fusion import GroupFusion
from gfmfr_secure.server.grouping import SERVER_GROUPING, group_clients, merge_small_groups
from gfmfr_secure.server.step import ServerState, apply_fedavg_, update_teacher_
from gfmfr_secure.simulation.dp import RecordLevelDP, plan_privacy, privacy_report
from gfmfr_secure.simulation.group_floor import floor_report, secrets_report
from gfmfr_secure.simulation.selection import ValidationSelector
from gfmfr_secure.types import AggregateResult, Exposure, LocalHyper

__all__ = [
    "CLIENT_GROUPING", "COUNT_TOLERANCE", "FederatedServer", "RoundRelease", "ServerData", "eval_metrics", "evaluation_sample", "make_fusion",
    "n_groups_of", "releasable", "sample_cohort", "to_aggregate",
]

#: grouping methods in which each client picks its own group (the server learns group sums only)
CLIENT_GROUPING = ("oblivious", "none")
#: slack on a verified count: the float32 decoding of a count of up to ~10^4 (a lie moves a count by >= 1)
COUNT_TOLERANCE = 1e-2


@dataclass(frozen=True, eq=False)
class ServerData:
    """What the server knows of the data: sizes and item features, no interaction.

    Attributes
    ----------
    n_users, n_items : U and I.
    text_features : float [I, D_t] or None; image_features : float [I, D_v] or None.
    """

    n_users: int
    n_items: int
    text_features: np.ndarray | None = None
    image_features: np.ndarray | None = None

    @classmethod
    def of(cls, data: Any, n_users: int, n_items: int) -> ServerData:
        """The server's part of an ``InteractionData`` (its item features)."""
        return cls(n_users, n_items, getattr(data, "text_features", None), getattr(data, "image_features", None))


def n_groups_of(cfg: Any) -> int:
    """G: groups of the run (0 without distillation, 1 under ``grouping.method=none``)."""
    if not cfg.distill.enabled:
        return 0
    return 1 if cfg.grouping.method == "none" else int(cfg.grouping.num_groups)


def make_fusion(cfg: Any, data: ServerData, n_groups: int, seed: int) -> GroupFusion | None:
    """The server's group fusion module over the configured item modalities (None without groups)."""
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


def sample_cohort(eligible: np.ndarray, fraction: float, seed: int, round_idx: int) -> np.ndarray:
    """All eligible clients (fraction 1) or Poisson sampling with rate ``fraction``; int64 [n] ascending."""
    if fraction >= 1.0:
        return eligible
    rng = numpy_rng(seed, "cohort", round_idx)
    return eligible[rng.random(eligible.size) < fraction]


def evaluation_sample(candidates: np.ndarray, max_users: int, seed: int) -> np.ndarray | None:
    """The users validation and test rank: None (all) or a fixed sample, int64 [max_users] ascending.

    ``candidates``: int64 users holding a test item, ascending. With more than
    ``max_users`` of them (and ``max_users > 0``), ``max_users`` are drawn uniformly
    without replacement from the run's seed.
    """
    if max_users <= 0 or candidates.size <= max_users:
        return None
    rng = numpy_rng(seed, "eval-users")
    return np.sort(rng.choice(candidates, size=max_users, replace=False))


def releasable(n: int, counts: np.ndarray | None, floor: int) -> bool:
    """The honest server's floor: a round of ``n`` uploads releases sums only when ``n >= floor``
    and, after the merge, some group count reaches it."""
    return n >= floor and (counts is None or float(counts.max()) >= floor)


def to_aggregate(reply: SumReply, per_client: Upload | None = None) -> AggregateResult:
    """A :class:`SumReply` as the :class:`AggregateResult` the server step takes; ``per_client``:
    the uploads the server received one by one (plain backend), or None."""

    def ten(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a)

    return AggregateResult(
        n_clients=int(reply.n_clients), weight_total=float(reply.weight_total), item_sum=torch.from_numpy(reply.item_sum), head_sum=ten(reply.head_sum),
        group_counts=ten(reply.group_counts), group_item_sum=ten(reply.group_item_sum), group_head_sum=ten(reply.group_head_sum),
        per_client=None if per_client is None else per_client.as_update(),
    )


def eval_metrics(reply: EvalReply) -> dict[str, float]:
    """The mean of each metric over the evaluated users (as :func:`gfmfr_secure.metrics.metrics_from_ranks`), plus ``users``."""
    if reply.users.size == 0:
        raise DataError(f"no user has a {reply.split} item: nothing to evaluate")
    out = {name: float(torch.from_numpy(np.ascontiguousarray(reply.values[:, j])).mean()) for j, name in enumerate(reply.names)}
    out["users"] = int(reply.users.size)
    return out


def _update_centroids(centroids: np.ndarray | None, agg: AggregateResult) -> np.ndarray:
    """Federated k-means step: each group's mean head update, from the (noised) group sums.

    Groups that received no members keep their previous centroid (zeros before any).
    """
    counts = agg.group_counts.double()
    mean = (agg.group_head_sum.double() / counts.clamp(min=1.0).unsqueeze(1)).numpy()
    out = np.zeros_like(mean) if centroids is None else centroids.copy()
    has = (counts >= 0.5).numpy()
    out[has] = mean[has]
    return out


def _mean_cost(history: list[dict[str, Any]]) -> dict[str, float]:
    """Per-round aggregation cost averaged over rounds (bytes per client, seconds)."""
    costs = [h["cost"] for h in history if h.get("cost")]
    keys = sorted({k for c in costs for k in c})
    return {k: float(np.mean([c[k] for c in costs if k in c])) for k in keys}


@dataclass
class RoundRelease:
    """What a released round hands the engine's observers (adversary views).

    Attributes
    ----------
    round : t.
    agg : the released sums as the server received them.
    before : the model broadcast at the start of the round.
    labels : int64 [n] the server's grouping of the uploads, or None (the clients' own).
    """

    round: int
    agg: AggregateResult
    before: SharedParams
    labels: np.ndarray | None


@dataclass
class FederatedServer:
    """The server of one federated run.

    ``cfg`` has passed :func:`gfmfr_secure.config_rules.validate` (``load_config`` and
    ``with_overrides`` apply it); the server checks only what needs the clients' Hello
    (the group floor against the eligible population) or the data (item features).

    Parameters
    ----------
    cfg : the experiment config.
    data : :class:`ServerData`.
    logger : the run's log.
    participants : int64 user ids allowed to train (default: every user with training data).
    on_release : called with each released round's :class:`RoundRelease` (views for attacks).
    on_round_end : called with ``(t, stop)`` after each round's record is in ``history``
        (checkpoints).
    centroid_step, merge_groups : replace :func:`_update_centroids` and
        :func:`~gfmfr_secure.server.grouping.merge_small_groups` (active-server experiments set
        them through :class:`~gfmfr_secure.roles.active.ActiveServer`).
    """

    cfg: Any
    data: ServerData
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("gfmfr_secure"))
    participants: np.ndarray | None = None
    on_release: Callable[[RoundRelease], None] | None = None
    on_round_end: Callable[[int, bool], None] | None = None
    #: the centroid step and the merge of small groups (None: the honest ones); simulations of an active server replace them
    centroid_step: Callable[[np.ndarray | None, AggregateResult], np.ndarray] | None = None
    merge_groups: Callable[[np.ndarray, np.ndarray | None, int], np.ndarray] | None = None

    def __post_init__(self) -> None:
        cfg, seed = self.cfg, int(self.cfg.seed)
        self.seed = seed
        backbone = get_backbone(cfg.model.backbone)
        mc = cfg.model
        shared = init_shared_params(self.data.n_items, mc.latent_dim, torch_generator(seed, "init", "shared"), mc.item_init_std, scorer=mc.scorer, user_std=mc.user_init_std)
        self.n_groups = n_groups = n_groups_of(cfg)
        self.state = ServerState(shared=shared, fusion=make_fusion(cfg, self.data, n_groups, seed), teacher=None, assignment=np.full(self.data.n_users, -1, dtype=np.int64), n_groups=n_groups)
        self.head_size = 0 if backbone.private_head else shared.head_flat().numel()
        self.secrets = SecretSource(cfg.secrets, seed)  # the server's own noise keys
        backend = cfg.aggregation.backend  # a registered one (config_rules.validate)
        self.backend, self.exposure = backend, AGGREGATORS[backend].exposure
        grouping = self.grouping = cfg.grouping.method
        self.secure = self.exposure != Exposure.PER_CLIENT
        self.grouped_floor = bool(n_groups) and grouping == "oblivious"
        self.floor = cfg.grouping.min_group_size if self.grouped_floor or self.secure else None
        if cfg.data.negatives_exclude_heldout and not cfg.data.negatives_fixed:
            self.logger.warning(
                "data.negatives_exclude_heldout without data.negatives_fixed leaks the held-out items "
                "(every other item is eventually drawn as a negative); metrics of this run are not comparable"
            )
        self.centroids: np.ndarray | None = None
        self.check_stats = {"refused_rounds": 0, "broadcast_refusals": 0}
        self.floor_stats: dict[str, Any] = {"merged_rounds": 0, "skipped_rounds": 0, "smallest": None}
        self.selector = ValidationSelector(cfg.train.patience, mode=cfg.train.selection)
        self.history: list[dict[str, Any]] = []
        self.timing: dict[str, list[float]] = {"client": [], "server": [], "eval": []}
        self.best_shared: SharedParams | None = None
        self.dp: Any = None
        self.record_dp: RecordLevelDP | None = None
        self.eligible = np.zeros(0, dtype=np.int64)
        self.eval_users: np.ndarray | None = None
        self.met = False  # meet() has run
        self.bar: Any = None  # the progress bar of run()

    # ------------------------------------------------------------------ set-up

    def meet(self, clients: Clients) -> None:
        """Learn the eligible population and the evaluation sample from the nodes' Hello; plan DP."""
        cfg, log = self.cfg, self.logger
        hello = clients.hello()
        eligible = np.asarray(hello.trainable, dtype=np.int64)
        if self.participants is not None:
            eligible = np.intersect1d(eligible, np.asarray(self.participants, dtype=np.int64))
            if eligible.size == 0:
                raise ConfigError("participants leaves no user with training data")
        floor = self.floor
        if floor is not None and eligible.size < floor:
            raise ConfigError(
                f"grouping.min_group_size={floor} exceeds the {eligible.size} clients that can take part: no round could "
                f"release a {'group ' if self.grouped_floor else 'secure '}sum; lower grouping.min_group_size (>= 2) or use more clients"
            )
        self.eligible, self.met = eligible, True
        self.dp = plan_privacy(cfg, eligible.size, logger=log)
        if cfg.privacy.mechanism == "dpsgd":
            self.record_dp = RecordLevelDP(cfg.privacy, self.seed, self.data.n_items, secrets=self.secrets)  # accounting only
        self.eval_users = evaluation_sample(np.asarray(hello.test_users, dtype=np.int64), cfg.eval.max_users, self.seed)
        if self.eval_users is not None:
            log.info("validation and test rank a fixed sample of %d of the %d users with a test item (eval.max_users)", self.eval_users.size, int(hello.test_users.size))

    def hyper(self, t: int) -> LocalHyper:
        """Round ``t``'s local hyper-parameters."""
        cfg, tc, n_items = self.cfg, self.cfg.train, self.data.n_items
        return LocalHyper(
            lr_network=schedules.network_lr(t, tc.lr, tc.lr_decay),
            lr_items=schedules.item_lr(t, tc.lr, tc.item_lr_scale, n_items, tc.item_lr_decay),
            weight_decay=tc.weight_decay,
            alpha=schedules.fedrap_weight(t, tc.alpha),
            beta=schedules.fedrap_weight(t, tc.beta),
            distill=schedules.distill_weight(t, tc.rounds, cfg.distill.schedule) if self.state.teacher is not None else 0.0,
            ema_decay=cfg.distill.ema_decay,
            max_ratio=cfg.distill.max_ratio,
            batch_size=tc.batch_size,
            epochs=tc.local_epochs,
            shuffle_seed=derive_seed(self.seed, "shuffle", t),
            scorer=cfg.model.scorer,
            lr_user=schedules.item_lr(t, tc.user_lr, 1.0, n_items, tc.item_lr_decay),
            embedding_weight_decay=tc.embedding_weight_decay,
        )

    def broadcast(self, t: int, cohort: np.ndarray) -> Broadcast:
        """The message that opens round ``t`` for ``cohort``."""
        st, dp = self.state, self.dp
        server_grouped = bool(self.n_groups) and self.grouping in SERVER_GROUPING
        return Broadcast(
            round=t, cohort=cohort, item_table=st.shared.item_table.numpy(), head=st.shared.head_flat().numpy(),
            teacher=None if st.teacher is None else st.teacher.float().numpy(), centroids=self.centroids,
            groups=st.assignment[cohort] if server_grouped else None, hyper=self.hyper(t),
            clip=math.inf if dp is None else float(dp.clip), count_value=1.0 if dp is None else float(dp.count_value), population=int(self.eligible.size),
        )

    # ------------------------------------------------------------------ the rounds

    def _finish(self, t: int, rec: dict[str, Any], stop: bool = False) -> None:
        self.history.append(rec)
        if self.on_round_end is not None:
            self.on_round_end(t, stop)

    def _validate(self, clients: Clients, t: int, rec: dict[str, Any], note: str) -> bool:
        """Validate after round ``t`` when due, into ``rec``; True when early stopping says stop."""
        tc = self.cfg.train
        if not ((t + 1) % tc.eval_every == 0 or t == tc.rounds - 1):
            return False
        t3 = time.perf_counter()
        val = self.evaluate(clients, t, "val", "current")
        self.timing["eval"].append(time.perf_counter() - t3)
        rec["val"] = val
        if self.bar is not None:
            self.bar.set_postfix(ndcg10=f"{val['NDCG@10']:.4f}")
        self.logger.info("round %d: val HR@10 %.4f NDCG@10 %.4f (%s)", t, val["HR@10"], val["NDCG@10"], note)

        def keep() -> SharedParams:
            clients.keep_snapshot(KeepSnapshot(round=t))
            return self.state.shared.clone()

        return self.selector.observe(t, val, keep)

    def evaluate(self, clients: Clients, t: int, which: str, model: str) -> dict[str, float]:
        """Ask the nodes to score ``which`` with the current or the kept best model; the mean metrics."""
        shared = self.state.shared if model == "current" else self.selector.snapshot
        msg = EvalRequest(round=t, split=which, model=model, item_table=shared.item_table.numpy(), head=shared.head_flat().numpy(), users=self.eval_users, ks=tuple(int(k) for k in self.cfg.eval.ks), chunk_users=int(self.cfg.eval.chunk_users))
        return eval_metrics(clients.evaluate(msg))

    def _release_nothing(self, clients: Clients, t: int, rec: dict[str, Any], why: str) -> bool:
        """Close round ``t`` that released no sum; True when early stopping ends training."""
        rec["skipped"] = why
        if self.dp is not None:  # the round happened (and under the floor its counts were released): account for it
            self.dp.record(t)
        # clients that trained kept their private state: validate as usual
        if self._validate(clients, t, rec, "nothing released"):
            self._finish(t, rec, stop=True)
            self.logger.info("early stop after round %d (best round %d)", t, self.selector.best_round)
            return True
        self._finish(t, rec)
        return False

    def _refuse(self, clients: Clients, t: int, rec: dict[str, Any], why: str) -> bool:
        """The clients refused round ``t`` (one of their checks failed): nothing is released."""
        self.logger.warning("round %d: the clients refused the round, nothing is released: %s", t, why)
        self.check_stats["refused_rounds"] += 1
        rec["refused"] = why
        return self._release_nothing(clients, t, rec, "clients refused the round")

    def run(self, clients: Clients, *, start: int = 0, stopped: bool = False, progress: bool = True, label: str | None = None) -> None:
        """Rounds ``start .. train.rounds - 1`` (none when ``stopped``) over ``clients``."""
        tc = self.cfg.train
        if not self.met:
            self.meet(clients)
        self.bar = tqdm(range(tc.rounds if stopped else start, tc.rounds), desc=label or self.cfg.method, disable=None if progress else True, unit="round", initial=start, total=tc.rounds)
        for t in self.bar:
            if self.round(clients, t):
                break
        self.bar.close()

    def round(self, clients: Clients, t: int) -> bool:
        """Round ``t``; True when training ends after it (early stopping or the privacy budget)."""
        cfg, tc, log, st, dp = self.cfg, self.cfg.train, self.logger, self.state, self.dp
        n_items, d, n_groups, grouping, floor = self.data.n_items, cfg.model.latent_dim, self.n_groups, self.grouping, self.floor
        rec: dict[str, Any] = {"round": t}
        if dp is not None and not dp.fits(t):
            log.info("round %d would exceed the privacy budget (epsilon %.4g of %.4g spent): training stops", t, dp.epsilon(), dp.target_epsilon)
            return True
        cohort = sample_cohort(self.eligible, tc.client_fraction, self.seed, t)
        if dp is None:  # under user-level DP the exact cohort size is not released (the noised counts are)
            rec["cohort"] = int(cohort.size)
        if cohort.size == 0:
            if dp is not None:  # the round happened (sampling is data-independent); account for it
                dp.record(t)
            if self._validate(clients, t, rec, "empty cohort"):
                self._finish(t, rec, stop=True)
                return True
            self._finish(t, rec)
            return False
        t0 = time.perf_counter()
        upload = clients.train(self.broadcast(t, cohort))
        t1 = time.perf_counter()
        if upload.refused:
            log.warning("round %d: %d clients refused the broadcast (too few neighbours attested the one they received)", t, upload.refused)
            self.check_stats["broadcast_refusals"] += int(upload.refused)
            rec["broadcast_refusals"] = int(upload.refused)
            if cohort.size - upload.refused < floor:
                self.floor_stats["skipped_rounds"] += 1
                return self._release_nothing(clients, t, rec, "cohort below grouping.min_group_size after broadcast refusals")
        if self.record_dp is not None and upload.dpsgd is not None:
            for c, ev in zip(upload.clients.tolist(), upload.dpsgd.tolist(), strict=True):
                self.record_dp.events.setdefault(int(c), []).append((float(ev[0]), float(ev[1]), int(ev[2])))
        n_up = len(upload)

        # ---- group floor: no secure sum below it; under oblivious grouping a count phase first,
        # checked by the clients, and groups below the floor merged before any sum
        phase_counts = merge = None
        count_cost: dict[str, float] = {}
        if floor is not None:
            if self.grouped_floor and n_up >= floor:
                counted = clients.aggregate(SumRequest(round=t, phase="count", n_groups=n_groups, grouped=True, clip=self._clip()))
                if counted.refused:
                    return self._refuse(clients, t, rec, counted.refused)
                phase_counts, count_cost = counted.group_counts.astype(np.float64), json.loads(counted.cost)
                merge = (self.merge_groups or merge_small_groups)(phase_counts, self.centroids, floor)
                phase_counts = np.bincount(merge, weights=phase_counts, minlength=n_groups)
                self.floor_stats["merged_rounds"] += int((merge != np.arange(n_groups)).any())
            if not releasable(n_up, phase_counts, floor):
                log.info("round %d: cohort of %d clients is below grouping.min_group_size=%d; nothing is released", t, n_up, floor)
                self.floor_stats["skipped_rounds"] += 1
                return self._release_nothing(clients, t, rec, "cohort below grouping.min_group_size")

        # ---- aggregation backend, then (paper mode) grouping by the server
        server_grouped = bool(n_groups) and grouping in SERVER_GROUPING
        client_grouped = bool(n_groups) and not server_grouped
        central = None
        if dp is not None and not server_grouped:  # groups are the clients' own: noise goes into the backend
            layout = ReleaseLayout(max(n_groups, 1), n_items, d, self.head_size, dp.count_value, write_count=phase_counts is None)
            central = Release(dp, layout, t).central(self.secrets).numpy()  # the clients add their shares (Release.shares)
        reply = clients.aggregate(SumRequest(
            round=t, phase="sums", n_groups=max(n_groups, 1), merge=merge, weighting=tc.weighting, grouped=client_grouped,
            clip=self._clip(), write_count=phase_counts is None, central=central,
        ))
        if reply.refused:  # check_round_parameters: a round the clients' own configuration forbids
            return self._refuse(clients, t, rec, reply.refused)
        agg = to_aggregate(reply, None if self.secure else upload)  # plain: the server received every upload
        if phase_counts is not None and dp is not None:  # the counts were released (noised) in the count phase
            agg = dataclasses.replace(agg, group_counts=torch.as_tensor(phase_counts, dtype=torch.float32), weight_total=max(float(phase_counts.sum()), 1.0))
        if phase_counts is not None:
            released = agg.group_counts.double().numpy()
            smallest = float(released[released >= 0.5].min()) if (released >= 0.5).any() else None
            if smallest is not None and (self.floor_stats["smallest"] is None or smallest < self.floor_stats["smallest"]):
                self.floor_stats["smallest"] = smallest
        rec["cost"] = json.loads(reply.cost)
        if dp is not None and not self.secure:
            rec["cost"].pop("bytes_up_per_client", None)  # plain: the mean count of touched rows, a raw statistic
        rec["cost"].update({f"count_phase_{k}": v for k, v in count_cost.items()})
        rec["cost"]["broadcast_bytes_per_client"] = float(4 * (st.shared.item_table.numel() + self.head_size + (0 if st.teacher is None else st.teacher.numel()) + (0 if self.centroids is None else self.centroids.size)))
        regroup = bool(n_groups) and not (server_grouped and n_up < n_groups)
        if n_groups and not regroup:
            log.info("round %d: cohort of %d clients is smaller than G=%d; grouping and teacher kept", t, n_up, n_groups)
        labels = None
        t_group = time.perf_counter()
        if regroup and server_grouped:
            per_client = agg.per_client
            labels = group_clients(
                per_client.head_after.numpy(), per_client.clients, st.assignment, method=grouping, n_groups=n_groups,
                use_pca=cfg.grouping.use_pca, pca_variance=cfg.grouping.pca_variance, seed=derive_seed(self.seed, "grouping", t) % (2**31),
            )
            counts, g_item, g_head = group_sums(per_client, n_items, labels, n_groups)
            agg = dataclasses.replace(agg, group_counts=counts, group_item_sum=g_item, group_head_sum=g_head)
            st.assignment[per_client.clients] = labels
        rec["grouping_s"] = time.perf_counter() - t_group
        # ---- differential privacy: the paper's server-side grouping noises the sums it formed itself
        if dp is not None and server_grouped:
            blocks = n_groups if agg.group_counts is not None else 1
            layout = ReleaseLayout(blocks, n_items, d, self.head_size, dp.count_value)
            release = Release(dp, layout, t)
            noise = release.central(self.secrets)
            if release.share_std(n_up) > 0:  # each client's single-block share lands in the group the server chose
                shares = clients.aggregate(SumRequest(round=t, phase="shares", n_groups=blocks, labels=labels if blocks > 1 else None, clip=self._clip()))
                noise = noise + torch.from_numpy(shares.share_sum).view(layout.shape)
            agg = noise_release(agg, noise, layout)
        if dp is not None:
            dp.record(t)
            # only released, noised quantities: no statistic of the raw updates (their median norm) goes to history
            rec["dp"] = {"clip": dp.clip, "epsilon": dp.epsilon()}
            if dp.adaptive:
                count_noise = float(secret_normal(self.secrets.key("dp-count", t), (1,))[0]) * dp.count_stddev
                # noisy_unclipped_fraction (privacy.mechanisms) from the clients' summed count query
                dp.adapt_clip((reply.unclipped_query + count_noise) / max(float(tc.client_fraction * self.eligible.size), 1.0) + 0.5)

        # ---- server: FedAvg, centroids, fusion and teacher
        before = st.shared.clone()
        apply_fedavg_(st.shared, agg, items=tc.item_aggregation)
        if regroup:
            if grouping == "oblivious" and agg.group_head_sum is not None:
                self.centroids = (self.centroid_step or _update_centroids)(self.centroids, agg)
            t_fusion = time.perf_counter()
            fusion_losses = update_teacher_(
                st, before, agg, epochs=cfg.fusion.server_epochs, batch_size=cfg.fusion.batch_size, lr=cfg.fusion.server_lr,
                weight_decay=tc.weight_decay, optimizer=cfg.fusion.server_optimizer, compiled=cfg.fusion.compile,
                generator=torch_generator(self.seed, "fusion-shuffle", t),
            )
            rec["fusion_s"] = time.perf_counter() - t_fusion  # fusion training and teacher
            if labels is not None:  # each client learns the group the server put it in
                clients.assign(Assignment(round=t, clients=agg.per_client.clients, groups=labels))
            rec["fusion_loss"] = float(fusion_losses[-1]) if fusion_losses else None
            rec["group_sizes"] = [round(float(c), 3) for c in agg.group_counts.tolist()]
        t2 = time.perf_counter()
        if self.on_release is not None:
            self.on_release(RoundRelease(round=t, agg=agg, before=before, labels=labels))
        rec.update(client_s=t1 - t0, server_s=t2 - t1)
        mean_loss = float(np.mean(upload.loss)) if n_up else float("nan")  # of the raw local training: logged, kept out of history under DP
        del upload, reply, agg  # the round's messages are done with before the clients' state is scored and copied
        if dp is None and self.record_dp is None:
            rec["loss"] = mean_loss
        self.timing["client"].append(t1 - t0)
        self.timing["server"].append(t2 - t1)
        if self._validate(clients, t, rec, f"loss {mean_loss:.4f}, client {rec['client_s']:.2f}s, server {rec['server_s']:.2f}s"):
            self._finish(t, rec, stop=True)
            log.info("early stop after round %d (best round %d)", t, self.selector.best_round)
            return True
        self._finish(t, rec)
        return False

    def _clip(self) -> float:
        return math.inf if self.dp is None else float(self.dp.clip)

    # ------------------------------------------------------------------ the end

    def finish(self, clients: Clients) -> dict[str, Any]:
        """Score the test split on the selected round's model; the run's metrics."""
        cfg, dp = self.cfg, self.dp
        if self.selector.snapshot is None:
            raise RuntimeError("no validation round was run; check eval.every and train.rounds")
        test = self.evaluate(clients, self.selector.best_round, "test", "best")
        timing = self.timing
        metrics = {
            "privacy": self.record_dp.report(cfg, self.grouping, self.n_groups) if self.record_dp is not None else privacy_report(cfg, dp, self.grouping, self.n_groups),
            "val": self.selector.best_val,
            "test": test,
            "best_round": self.selector.best_round,
            "rounds_run": len(self.history),
            "cost": _mean_cost(self.history),
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
        if self.floor is not None:
            fs = self.floor_stats
            privacy["group_floor"] = floor_report(self.floor, fs["merged_rounds"], fs["skipped_rounds"], fs["smallest"])
        if self.secure:
            privacy["client_checks"] = dict(self.check_stats)
        return metrics
