"""The client role: the clients one machine hosts, their private state and data.

A :class:`ClientNode` hosts a set of users. Each of them is its own client in the
protocol (its own update, clipping, group choice and noise); the node trains the ones a
:class:`~gfmfr_secure.roles.messages.Broadcast` samples together, as one vectorised
batch (:func:`gfmfr_secure.client.cohort.train_cohort`), which gives every client the
result it would get alone. The node keeps only its users' data (the split restricted to
them) and their private state; it answers with messages only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch

from gfmfr_secure.client.cohort import train_cohort
from gfmfr_secure.client.state import ClientRows, ClientStateStore, RowStore
from gfmfr_secure.data.negatives import sample_training
from gfmfr_secure.data.split import Split, csr_rows
from gfmfr_secure.metrics import METRIC_NAMES, _as_long, _csr_entries, _sparse_ranks
from gfmfr_secure.models import SharedParams, get_backbone, init_shared_params
from gfmfr_secure.privacy.mechanisms import clipped_count_query
from gfmfr_secure.roles.messages import Assignment, Broadcast, EvalReply, EvalRequest, Hello, KeepSnapshot, Upload
from gfmfr_secure.rng import SecretSource, numpy_rng, torch_generator
from gfmfr_secure.server.grouping import SERVER_GROUPING, nearest_centroid
from gfmfr_secure.simulation.dp import RecordLevelDP, clip_upload, plan_privacy
from gfmfr_secure.simulation.scoring import score_users
from gfmfr_secure.types import CohortUpdate, LocalHyper

__all__ = ["ClientNode", "check_finite", "oblivious_groups", "per_user_metrics", "restrict_split", "shared_from", "user_ranks"]


#: the clients' copy of the DP plan: its warnings are the server's to log
_QUIET = logging.getLogger("gfmfr_secure.roles.client.quiet")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def restrict_split(split: Split, users: np.ndarray) -> Split:
    """The split as a node hosting ``users`` (int64 [k], distinct) holds it: other users have no data."""
    if users.size == split.n_users:  # every user: nothing to drop (and no copy)
        return split
    keep = np.zeros(split.n_users, dtype=bool)
    keep[users] = True
    counts = np.where(keep, np.diff(split.train_indptr), 0)
    indptr = np.zeros(split.n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return Split(
        n_users=split.n_users,
        n_items=split.n_items,
        train_indptr=indptr,
        train_items=split.train_items[csr_rows(split.train_indptr, np.flatnonzero(keep))],
        val_items=np.where(keep, split.val_items, -1),
        test_items=np.where(keep, split.test_items, -1),
    )


def shared_from(template: SharedParams, item_table: np.ndarray, head: np.ndarray) -> SharedParams:
    """The broadcast model as :class:`SharedParams`: item table float32 [I, d], flat head float32 [H]."""
    shared = SharedParams(item_table=torch.from_numpy(item_table), **{k: torch.empty_like(getattr(template, k)) for k in ("w1_user", "w1_item", "b1", "w2", "b2")})
    shared.set_head_flat_(torch.from_numpy(head))
    return shared


class ClientNode:
    """The clients one machine hosts.

    Parameters
    ----------
    cfg : the experiment config (the clients' own copy).
    split : the leave-one-out split; the node keeps only ``users``' rows of it.
    users : int64 [k] the user ids this node hosts.
    secrets : where the clients' keys and noise come from (default ``SecretSource(cfg.secrets, cfg.seed)``).

    Attributes
    ----------
    store : the hosted clients' private state (rows of other users are never touched).
    best : the state kept at the best validation round (:meth:`keep_snapshot`), or None.
    """

    def __init__(self, cfg: Any, split: Split, users: np.ndarray, *, secrets: SecretSource | None = None) -> None:
        self.cfg = cfg
        self.seed = seed = int(cfg.seed)
        self.users = np.unique(np.asarray(users, dtype=np.int64))
        self.split = restrict_split(split, self.users)
        self.backbone = get_backbone(cfg.model.backbone)
        mc = cfg.model
        n_users, n_items, d = split.n_users, split.n_items, mc.latent_dim
        self.template = init_shared_params(n_items, d, torch_generator(seed, "init", "shared"), mc.item_init_std, scorer=mc.scorer, user_std=mc.user_init_std)
        self.store = ClientStateStore.create(
            n_users, n_items, d, user_embedding=self.backbone.user_embedding, personal_items=self.backbone.personal_items,
            private_head=self.template.head_flat() if self.backbone.private_head else None,
            generator=torch_generator(seed, "init", "users"), user_std=mc.user_init_std,
        )
        self.best: ClientStateStore | None = None
        self.secrets = SecretSource(cfg.secrets, seed) if secrets is None else secrets
        self.record_dp = RecordLevelDP(cfg.privacy, seed, n_items, secrets=self.secrets) if cfg.privacy.mechanism == "dpsgd" else None
        n_groups = (1 if cfg.grouping.method == "none" else int(cfg.grouping.num_groups)) if cfg.distill.enabled else 0
        self.n_groups = n_groups
        self.init_groups = numpy_rng(seed, "oblivious-init").integers(0, max(n_groups, 1), size=n_users) if cfg.grouping.method == "oblivious" else None
        self.fixed_samples: Any = None
        self._dp: Any = None
        self._dp_population = -1
        self._norms = torch.zeros(0)
        self._clip = math.inf

    # ------------------------------------------------------------------ messages

    def hello(self) -> Hello:
        """The hosted users, those with training data and those with a validation / test item."""
        s, u = self.split, self.users
        return Hello(hosted=u, trainable=u[s.train_counts()[u] > 0], val_users=u[s.val_items[u] >= 0], test_users=u[s.test_items[u] >= 0])

    def dp_plan(self, population: int) -> Any:
        """The clients' user-level DP plan for an eligible population (None without user-level DP)."""
        if population != self._dp_population:
            self._dp, self._dp_population = plan_privacy(self.cfg, population, logger=_QUIET), population
        return self._dp

    def train(self, msg: Broadcast) -> Upload:
        """Local training of the cohort members this node hosts, then their uploads.

        Negatives, :func:`train_cohort` (or DP-SGD), the finiteness check, clipping under
        user-level DP, the oblivious group choice; the uploads in client-id order.
        """
        cfg, tc, t = self.cfg, self.cfg.train, int(msg.round)
        cohort = np.intersect1d(msg.cohort, self.users)
        if cohort.size == 0:
            return Upload.empty(self.cfg.model.latent_dim, t)
        if cfg.data.negatives_fixed:  # compatibility: one draw for every user, reused every round
            if self.fixed_samples is None:
                self.fixed_samples = sample_training(self.split, tc.num_negatives, numpy_rng(self.seed, "negatives", 0), exclude_heldout=cfg.data.negatives_exclude_heldout)
            samples = self.fixed_samples
        else:
            samples = sample_training(self.split, tc.num_negatives, numpy_rng(self.seed, "negatives", t), users=cohort, exclude_heldout=cfg.data.negatives_exclude_heldout)
        shared = shared_from(self.template, msg.item_table, msg.head)
        teacher = None if msg.teacher is None else torch.from_numpy(msg.teacher)
        groups = None
        if teacher is not None:
            groups = msg.groups[np.searchsorted(msg.cohort, cohort)] if msg.groups is not None else self.store.group[cohort]
        dpsgd = None
        if self.record_dp is None:
            update = train_cohort(shared, self.store, self.backbone, cohort, samples.indptr, samples.items, samples.labels, msg.hyper, teacher=teacher, groups=groups)
        else:
            update = self.record_dp.train(shared, self.store, self.backbone, cohort, samples, msg.hyper, t, teacher=teacher, groups=groups)
            dpsgd = np.array([self.record_dp.events[int(c)][-1] for c in cohort], dtype=np.float64)
        check_finite(update, t, msg.hyper)

        dp = self.dp_plan(int(msg.population))
        if dp is not None:
            dp.clip = float(msg.clip)
        upload, self._norms = clip_upload(update, dp, cfg)
        self._clip = float(msg.clip)
        grouping = cfg.grouping.method
        if self.n_groups and grouping == "oblivious":
            # [n, H] this round's head change as it enters the group sums (clipped), like the centroids
            offsets = upload.head_delta if upload.head_delta is not None else update.head_after - shared.head_flat().unsqueeze(0)
            upload = dataclasses.replace(upload, group=oblivious_groups(self.store, cohort, offsets, msg.centroids, self.init_groups))
        elif self.n_groups and grouping == "none":
            upload = dataclasses.replace(upload, group=np.zeros(len(update), dtype=np.int64))
        if not (self.n_groups and grouping in SERVER_GROUPING):
            upload = dataclasses.replace(upload, head_after=None)  # only server-side grouping needs it
        return Upload.of(upload, t, dpsgd)

    def unclipped_query(self) -> float:
        """This round's share of adaptive clipping's count: ``sum_i (b_i - 1/2)`` over the node's uploads."""
        return clipped_count_query(self._norms, self._clip) if self._norms.numel() else 0.0

    def commit_groups(self, clients: np.ndarray, groups: np.ndarray) -> None:
        """Each hosted client among ``clients`` [n] records its group ``groups`` [n] (the round released)."""
        mine = np.isin(clients, self.users)
        self.store.group[clients[mine]] = groups[mine]

    def assign(self, msg: Assignment) -> None:
        """Server-side grouping told the cohort members their groups."""
        self.commit_groups(msg.clients, msg.groups)

    def keep_snapshot(self, msg: KeepSnapshot) -> None:
        """Keep the hosted clients' state as the best round's (for the test at the end)."""
        self.best = self.store.snapshot()

    def evaluate(self, msg: EvalRequest) -> EvalReply:
        """Each hosted user's metric values of the requested model on the ``msg.split`` item.

        The ranks are :func:`gfmfr_secure.metrics.evaluate_ranking`'s (training items masked,
        and for the test the validation item); each column of the reply is one metric of
        :func:`gfmfr_secure.metrics.metrics_from_ranks`, per user.
        """
        store = self.store if msg.model == "current" else self.best
        if store is None:
            raise ValueError("no client state was kept for the best round (KeepSnapshot was never sent)")
        shared = shared_from(self.template, msg.item_table, msg.head)
        split = self.split
        targets = split.val_items if msg.split == "val" else split.test_items
        users = self.users[targets[self.users] >= 0]
        if msg.users is not None:
            users = np.intersect1d(users, msg.users)
        ranks = user_ranks(lambda u: score_users(shared, store, self.backbone, u, scorer=self.cfg.model.scorer), split, msg.split, users, int(msg.chunk_users))
        names, values = per_user_metrics(ranks, msg.ks)
        return EvalReply(round=msg.round, split=msg.split, users=users, names=names, values=values)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The hosted clients' private state as tensors (a node may persist it between messages)."""
        st = self.store
        out = {"user_embedding": st.user_embedding, "ema_ratio": st.ema_ratio, "group": torch.from_numpy(st.group)}
        if st.heads is not None:
            out["heads"] = st.heads
        if st.personal is not None:
            out.update({f"personal.{k}": v for k, v in st.personal.state_tensors().items()})
        if st.head_offset is not None:
            out.update({f"head_offset.{k}": v for k, v in st.head_offset.state_tensors().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the state :meth:`state_dict` returned."""
        n_users, n_items = self.split.n_users, self.split.n_items
        sub = {p: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(p + ".")} for p in ("personal", "head_offset")}
        self.store = ClientStateStore(
            user_embedding=state["user_embedding"], ema_ratio=state["ema_ratio"], group=state["group"].numpy().copy(), heads=state.get("heads"),
            personal=RowStore.from_state_tensors(n_users, n_items, sub["personal"]) if sub["personal"] else None,
            head_offset=ClientRows.from_state_tensors(sub["head_offset"]) if sub["head_offset"] else None,
        )


def user_ranks(score_fn: Any, split: Split, which: str, users: np.ndarray, chunk_size: int) -> np.ndarray:
    """0-based rank of each user's ``which`` item, as :func:`gfmfr_secure.metrics.evaluate_ranking` ranks it.

    Parameters
    ----------
    score_fn : ``score_fn(users LongTensor [B]) -> [B, I]`` scores.
    users : int64 [k] users that have a ``which`` item, ascending.

    Returns
    -------
    np.ndarray
        int64 [k].
    """
    n_items = split.n_items
    indptr, items = _as_long(split.train_indptr, "train_indptr"), _as_long(split.train_items, "train_items")
    val_items = _as_long(split.val_items, "val_items")
    targets = val_items if which == "val" else _as_long(split.test_items, "test_items")
    out: list[torch.Tensor] = []
    buffer: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, users.size, chunk_size):
            chunk = torch.from_numpy(users[start : start + chunk_size])
            scores = score_fn(chunk)
            ex_rows, ex_items = _csr_entries(chunk, indptr, items)
            keys = ex_rows * n_items + ex_items
            if which == "test":  # the validation item is known history by test time
                has_val = torch.nonzero(val_items[chunk] >= 0).flatten()
                keys = torch.cat([keys, has_val * n_items + val_items[chunk][has_val]])
            keys = torch.unique(keys)
            if buffer is None or buffer.numel() < scores.numel():
                buffer = torch.empty(scores.numel(), dtype=torch.float32)
            out.append(_sparse_ranks(scores, targets[chunk], keys // n_items, keys % n_items, buffer))
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def per_user_metrics(ranks: np.ndarray, ks: tuple[int, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """Each user's HR, NDCG, Recall and MRR at each cut-off: (names, float64 [k, M]).

    Column means are :func:`gfmfr_secure.metrics.metrics_from_ranks` (same order of names).
    """
    r = torch.from_numpy(np.asarray(ranks)).to(torch.float64)
    ndcg_gain, rr_gain = 1.0 / torch.log2(r + 2.0), 1.0 / (r + 1.0)
    cols: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = r < k
        cols[f"HR@{k}"] = hit.to(torch.float64)
        cols[f"NDCG@{k}"] = torch.where(hit, ndcg_gain, 0.0)
        cols[f"Recall@{k}"] = cols[f"HR@{k}"]
        cols[f"MRR@{k}"] = torch.where(hit, rr_gain, 0.0)
    names = tuple(f"{name}@{k}" for name in METRIC_NAMES for k in ks)
    values = torch.stack([cols[n] for n in names], dim=1) if names else torch.zeros(r.numel(), 0, dtype=torch.float64)
    return names, values.numpy()


def check_finite(update: CohortUpdate, round_idx: int, hyper: LocalHyper) -> None:
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
