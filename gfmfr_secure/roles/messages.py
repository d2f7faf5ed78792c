"""The messages clients and server exchange: typed, serialisable, nothing else crosses.

Every message is a frozen dataclass of numpy arrays and scalars. ``to_arrays()`` gives
``(arrays, config)``: a dict of plain numpy arrays and a dict of ``int | float | str |
bool`` (they map one to one onto Flower's ``ArrayRecord`` and ``ConfigRecord``);
``from_arrays(arrays, config)`` rebuilds the message and checks every array's dtype and
rank. ``to_bytes()`` writes a JSON header (the config and each array's dtype, shape and
offset) and the arrays' raw bytes (no pickle, one copy); ``from_bytes()`` reads it back. The in-process engine passes every message
through bytes, so what the server uses is exactly what crossed the boundary.

One round (t)::

    server --Broadcast--> nodes       (model, cohort, round hyper-parameters, clip)
    server <--Upload----- nodes       (plain: every cohort member's update, which the
                                       server sees anyway; secure backends: the public part)
    server --SumRequest-> nodes       (count phase / sums / DP shares by group)
    server <--SumReply--- nodes       (what the aggregation releases: AggregateResult)
    server <-SecAggStep-> nodes       (masking across machines: the SecAgg+ messages the
                                       server relays between the client parties)
    server --Assignment-> nodes       (server-side grouping: each member's group)
    server --EvalRequest-> nodes ; EvalReply <-- nodes    (validation, test)
    server --KeepSnapshot-> nodes     (this round is the best so far: keep its state)

A node answers ``Hello`` first: which of its users have training data and which a
validation / test item.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from gfmfr_secure.errors import GfmfrError
from gfmfr_secure.types import AggregateResult, CohortUpdate, LocalHyper

__all__ = [
    "Assignment",
    "Broadcast",
    "CKKS_WIRE",
    "CKKSStep",
    "EvalReply",
    "EvalRequest",
    "Hello",
    "KeepSnapshot",
    "MessageError",
    "SecAggRound",
    "SecAggStep",
    "SumReply",
    "SumRequest",
    "Upload",
    "merge_eval_replies",
    "merge_hellos",
    "merge_sum_replies",
    "merge_uploads",
    "sum_reply",
]

Scalar = int | float | str | bool
M = TypeVar("M", bound="Message")

_NONE_KEY = "__none__"  # config entry: JSON list of the fields that are None
_TYPE_KEY = "__type__"  # config entry: the message's class name


class MessageError(GfmfrError, ValueError):
    """A message that does not decode: wrong type, missing field, wrong dtype or rank."""


class Message:
    """Mixin: (de)serialisation of a frozen dataclass of arrays and scalars.

    Subclasses declare ``ARRAYS``: ``{field: (dtype, ndim)}`` for every array field
    (an array field may be None). ``LocalHyper`` fields are flattened into the config as
    ``hyper.<name>``; tuple-of-str fields are stored as JSON lists.
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {}

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Scalar]]:
        """``(arrays, config)``: numpy arrays (C-contiguous) and scalars; None fields listed in the config."""
        arrays: dict[str, np.ndarray] = {}
        config: dict[str, Scalar] = {_TYPE_KEY: type(self).__name__}
        nones = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                nones.append(f.name)
            elif f.name in self.ARRAYS:
                arrays[f.name] = np.ascontiguousarray(value)
            elif isinstance(value, LocalHyper):
                config.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
            elif isinstance(value, tuple):
                config[f.name] = json.dumps(list(value))
            else:
                config[f.name] = value
        config[_NONE_KEY] = json.dumps(nones)
        return arrays, config

    @classmethod
    def from_arrays(cls: type[M], arrays: dict[str, np.ndarray], config: dict[str, Scalar]) -> M:
        """Rebuild the message; raises :class:`MessageError` on anything it does not expect."""
        if config.get(_TYPE_KEY) != cls.__name__:
            raise MessageError(f"expected a {cls.__name__} message, got {config.get(_TYPE_KEY)!r}")
        nones = set(json.loads(str(config.get(_NONE_KEY, "[]"))))
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            name = f.name
            if name in nones:
                values[name] = None
            elif name in cls.ARRAYS:
                if name not in arrays:
                    raise MessageError(f"{cls.__name__}: array {name!r} is missing")
                values[name] = _checked(cls.__name__, name, np.asarray(arrays[name]), *cls.ARRAYS[name])
            elif f.type in ("LocalHyper", LocalHyper):
                try:
                    values[name] = LocalHyper(**{h.name: config[f"{name}.{h.name}"] for h in dataclasses.fields(LocalHyper)})
                except KeyError as err:
                    raise MessageError(f"{cls.__name__}: {name}.{err.args[0]} is missing") from None
            elif name not in config:
                raise MessageError(f"{cls.__name__}: {name!r} is missing")
            elif str(f.type).startswith("tuple"):
                values[name] = tuple(json.loads(str(config[name])))
            else:
                values[name] = config[name]
        return cls(**values)

    def to_bytes(self) -> bytes:
        """The message as bytes: a JSON header (config, each array's name, dtype, shape and offset),
        then the arrays' raw little-endian bytes, each 64-byte aligned; no pickle."""
        return bytes(self.to_buffer())

    def to_buffer(self) -> bytearray:
        """:meth:`to_bytes` as a mutable buffer (no second copy; :meth:`from_bytes` reads it in place)."""
        arrays, config = self.to_arrays()
        index, offset = [], 0
        for name, arr in arrays.items():
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            arrays[name] = arr
            index.append([name, arr.dtype.str, list(arr.shape), offset])
            offset += -(-arr.nbytes // _ALIGN) * _ALIGN
        header = json.dumps({"config": config, "arrays": index}, sort_keys=True).encode("utf-8")
        start = -(-(len(_MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
        out = bytearray(start + offset)
        out[: len(_MAGIC) + 8 + len(header)] = _MAGIC + len(header).to_bytes(8, "little") + header
        view = memoryview(out)
        for (_, _, _, off), arr in zip(index, arrays.values(), strict=True):
            view[start + off : start + off + arr.nbytes] = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return out

    @classmethod
    def from_bytes(cls: type[M], data: bytes | bytearray) -> M:
        """Read a message written by :meth:`to_bytes` or :meth:`to_buffer`.

        The arrays are views of one writable copy of ``data`` (of ``data`` itself when it is
        a ``bytearray``, which the message then owns).
        """
        head = len(_MAGIC) + 8
        if len(data) < head or bytes(data[: len(_MAGIC)]) != _MAGIC:
            raise MessageError(f"not a {cls.__name__} message")
        size = int.from_bytes(data[len(_MAGIC) : head], "little")
        try:
            meta = json.loads(bytes(data[head : head + size]).decode("utf-8"))
            buf = data if isinstance(data, bytearray) else bytearray(data)
            start = -(-(head + size) // _ALIGN) * _ALIGN
            arrays = {
                name: np.frombuffer(buf, dtype=np.dtype(dtype), count=math.prod(shape), offset=start + off).reshape(shape)
                for name, dtype, shape, off in meta["arrays"]
            }
        except (ValueError, TypeError, KeyError) as err:
            raise MessageError(f"not a {cls.__name__} message: {err}") from None
        return cls.from_arrays(arrays, meta["config"])


_MAGIC = b"gfmfr-msg/1\n"
_ALIGN = 64


def _checked(kind: str, name: str, array: np.ndarray, dtype: str, ndim: int) -> np.ndarray:
    if array.dtype != np.dtype(dtype) or array.ndim != ndim:
        raise MessageError(f"{kind}.{name} must be {dtype} with {ndim} dimensions, got {array.dtype} {array.shape}")
    return array


@dataclass(frozen=True, eq=False)
class Hello(Message):
    """A node's answer to the server's first message: which of its users can take part.

    Attributes
    ----------
    hosted : int64 [k] every user the node hosts, ascending.
    trainable : int64 [a] hosted users with training data (the eligible population).
    val_users : int64 [b] hosted users with a validation item.
    test_users : int64 [c] hosted users with a test item.
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {k: ("int64", 1) for k in ("hosted", "trainable", "val_users", "test_users")}

    hosted: np.ndarray
    trainable: np.ndarray
    val_users: np.ndarray
    test_users: np.ndarray


@dataclass(frozen=True, eq=False)
class Broadcast(Message):
    """What the server sends the cohort at the start of round ``round``.

    Attributes
    ----------
    round : t.
    cohort : int64 [n] sorted user ids; a node trains the ones it hosts.
    item_table : float32 [I, d] the shared item table.
    head : float32 [H] the shared head, flat (H = 0 when heads are private).
    teacher : float32 [G, I] group preference scores, or None (no distillation this round).
    centroids : float64 [G, H] oblivious grouping's centroids, or None.
    groups : int64 [n] the group the server assigned each cohort member (server-side
        grouping, -1 = none yet), or None (the clients keep their own).
    hyper : this round's local hyper-parameters.
    clip : the DP clip C in force (``inf`` without user-level DP).
    count_value : kappa, what a client writes into its count coordinate.
    population : the number of clients that can take part (the eligible population; the
        clients' DP plan is sized with it).
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {
        "cohort": ("int64", 1),
        "item_table": ("float32", 2),
        "head": ("float32", 1),
        "teacher": ("float32", 2),
        "centroids": ("float64", 2),
        "groups": ("int64", 1),
    }

    round: int
    cohort: np.ndarray
    item_table: np.ndarray
    head: np.ndarray
    teacher: np.ndarray | None
    centroids: np.ndarray | None
    groups: np.ndarray | None
    hyper: LocalHyper
    clip: float
    count_value: float
    population: int


@dataclass(frozen=True, eq=False)
class Upload(Message):
    """One node's uploads of a round; every user its own record (rows in client-id order).

    The fields of :class:`~gfmfr_secure.types.CohortUpdate`, as numpy. Under a secure
    backend a node sends the server only the public part (:meth:`public`): who took part
    and its training loss; the updates reach the server only as sums (:class:`SumReply`).

    Attributes
    ----------
    clients : int64 [n] user ids, ascending.
    n_samples : int64 [n] training samples each used (0 where it keeps the count to itself).
    row_ptr : int64 [n + 1] CSR pointer into the touched rows.
    row_items : int64 [R] item ids of the touched rows.
    item_delta : float32 [R, d] item-table change on those rows (clipped under DP).
    head_delta : float32 [n, H] head change (clipped under DP), or None (private heads).
    head_after : float32 [n, H] head after training (server-side grouping only), or None.
    group : int64 [n] the group each client placed itself in, -1 if none.
    loss : float64 [n] mean local training loss.
    dpsgd : float64 [n, 3] record-level DP-SGD's (noise multiplier, sample rate, steps)
        of each client this round, or None.
    refused : cohort members of this node that refused the broadcast (did not train).
    round : t.
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {
        "clients": ("int64", 1),
        "n_samples": ("int64", 1),
        "row_ptr": ("int64", 1),
        "row_items": ("int64", 1),
        "item_delta": ("float32", 2),
        "head_delta": ("float32", 2),
        "head_after": ("float32", 2),
        "group": ("int64", 1),
        "loss": ("float64", 1),
        "dpsgd": ("float64", 2),
    }

    clients: np.ndarray
    n_samples: np.ndarray
    row_ptr: np.ndarray
    row_items: np.ndarray
    item_delta: np.ndarray
    head_delta: np.ndarray | None
    head_after: np.ndarray | None
    group: np.ndarray
    loss: np.ndarray
    dpsgd: np.ndarray | None = None
    refused: int = 0
    round: int = 0

    def __len__(self) -> int:
        return int(self.clients.size)

    @classmethod
    def empty(cls, latent_dim: int, round_idx: int, refused: int = 0) -> Upload:
        """No client of this node uploads this round."""
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, np.zeros(1, dtype=np.int64), z, np.zeros((0, latent_dim), dtype=np.float32), None, None, z, np.zeros(0), refused=refused, round=round_idx)

    @classmethod
    def of(cls, update: CohortUpdate, round_idx: int, dpsgd: np.ndarray | None = None, refused: int = 0) -> Upload:
        """A :class:`~gfmfr_secure.types.CohortUpdate` as a message (numpy views of its tensors)."""

        def arr(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().numpy()

        return cls(
            clients=np.asarray(update.clients, dtype=np.int64), n_samples=np.asarray(update.n_samples, dtype=np.int64),
            row_ptr=np.asarray(update.row_ptr, dtype=np.int64), row_items=np.asarray(update.row_items, dtype=np.int64),
            item_delta=update.item_delta.detach().numpy(), head_delta=arr(update.head_delta), head_after=arr(update.head_after),
            group=np.asarray(update.group, dtype=np.int64), loss=np.asarray(update.loss, dtype=np.float64), dpsgd=dpsgd, refused=refused, round=round_idx,
        )

    def as_update(self) -> CohortUpdate:
        """The uploads as the :class:`~gfmfr_secure.types.CohortUpdate` the aggregation takes (tensors share memory)."""

        def ten(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a)

        return CohortUpdate(
            clients=self.clients, n_samples=self.n_samples, row_ptr=self.row_ptr, row_items=self.row_items, item_delta=torch.from_numpy(self.item_delta),
            head_delta=ten(self.head_delta), head_after=ten(self.head_after), group=self.group, loss=self.loss,
        )

    def public(self) -> Upload:
        """What a node sends the server directly under a secure backend: clients, losses, refusals; no update."""
        n = len(self)
        z = np.zeros(n, dtype=np.int64)
        d = int(self.item_delta.shape[1])
        return Upload(self.clients, z, np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, d), dtype=np.float32), None, None, np.full(n, -1, dtype=np.int64), self.loss, self.dpsgd, self.refused, self.round)


def merge_uploads(uploads: list[Upload]) -> Upload:
    """One :class:`Upload` of several nodes' (disjoint clients), ordered by client id.

    The order does not depend on how users are partitioned over nodes, so sums over the
    merged upload are partition-invariant.
    """
    if not uploads:
        raise MessageError("merge_uploads needs at least one upload")
    if len(uploads) == 1:
        return uploads[0]
    clients = np.concatenate([u.clients for u in uploads])
    if np.unique(clients).size != clients.size:
        raise MessageError("merge_uploads: a client uploads twice")
    order = np.argsort(clients, kind="stable")
    counts = np.concatenate([np.diff(u.row_ptr) for u in uploads])
    starts = np.concatenate([u.row_ptr[:-1] + off for u, off in zip(uploads, np.cumsum([0] + [u.row_items.size for u in uploads])[:-1], strict=True)])
    rows = np.repeat(starts[order] - np.concatenate([[0], np.cumsum(counts[order])[:-1]]), counts[order]) + np.arange(int(counts.sum()))
    row_ptr = np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(u, name) for u in uploads]
        if any(p is None for p in parts):
            return None
        return np.concatenate(parts)

    item_delta = np.concatenate([u.item_delta for u in uploads])[rows]
    per_client = {k: (None if (v := cat(k)) is None else v[order]) for k in ("n_samples", "head_delta", "head_after", "group", "loss", "dpsgd")}
    return Upload(
        clients=clients[order],
        n_samples=per_client["n_samples"],
        row_ptr=row_ptr,
        row_items=np.concatenate([u.row_items for u in uploads])[rows],
        item_delta=item_delta,
        head_delta=per_client["head_delta"],
        head_after=per_client["head_after"],
        group=per_client["group"],
        loss=per_client["loss"],
        dpsgd=per_client["dpsgd"],
        refused=sum(u.refused for u in uploads),
        round=uploads[0].round,
    )


def merge_hellos(hellos: list[Hello]) -> Hello:
    """The union of several nodes' :class:`Hello` (disjoint users), ascending."""
    return Hello(*(np.sort(np.concatenate([getattr(h, k) for h in hellos])) for k in ("hosted", "trainable", "val_users", "test_users")))


@dataclass(frozen=True, eq=False)
class SumRequest(Message):
    """The server asks the cohort's nodes for a sum of their uploads of round ``round``.

    The sum runs through the configured aggregation backend among the clients (under a
    secure backend the server learns only what it releases).

    Attributes
    ----------
    round : t.
    phase : ``count`` (oblivious grouping's group counts), ``sums`` (the round's release)
        or ``shares`` (the sum of the clients' DP noise shares by the server's grouping).
    n_groups : G of the release (1 without groups).
    merge : int64 [G] the public merge of small groups (each client maps its own choice
        ``g -> merge[g]``), or None.
    labels : int64 [n] (``shares``) the server's group of each upload in client order, or None.
    weighting : ``samples`` or ``uniform`` FedAvg weights.
    grouped : whether the release is group-wise (the clients' own groups).
    clip : the DP clip C in force (``inf`` without user-level DP).
    write_count : False when the count phase already released the counts.
    central : float32 [G, block] the server's central DP draw, added where the sum is
        released (``sums``), or None.
    n_uploads : the uploads the sum covers across every node (their DP noise shares are
        sized for it); 0: those of the node asked.
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {"merge": ("int64", 1), "labels": ("int64", 1), "central": ("float32", 2)}

    round: int
    phase: str
    n_groups: int
    merge: np.ndarray | None = None
    labels: np.ndarray | None = None
    weighting: str = "uniform"
    grouped: bool = False
    clip: float = float("inf")
    write_count: bool = True
    central: np.ndarray | None = None
    n_uploads: int = 0


@dataclass(frozen=True, eq=False)
class SumReply(Message):
    """What a sum releases to the server: the fields of :class:`~gfmfr_secure.types.AggregateResult`.

    Attributes
    ----------
    round, phase : as requested.
    refused : why the clients refused the sum (one of their checks failed), or "" .
    n_clients : uploads aggregated.
    weight_total : sum of FedAvg weights.
    item_sum : float32 [I, d]; head_sum : float32 [H] or None.
    group_counts : float32 [G] or None; group_item_sum : float32 [G, I, d] or None;
    group_head_sum : float32 [G, H] or None.
    share_sum : float32 [G, block] (phase ``shares``) the clients' noise shares summed by group, or None.
    unclipped_query : ``sum_i (b_i - 1/2)``, ``b_i = 1`` for a client whose update norm was
        at most the clip (adaptive clipping's count, before the server's noise).
    cost : JSON object of the backend's cost (bytes per client, seconds).
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {
        "item_sum": ("float32", 2),
        "head_sum": ("float32", 1),
        "group_counts": ("float32", 1),
        "group_item_sum": ("float32", 3),
        "group_head_sum": ("float32", 2),
        "share_sum": ("float32", 2),
    }

    round: int
    phase: str
    refused: str
    n_clients: int
    weight_total: float
    item_sum: np.ndarray
    head_sum: np.ndarray | None
    group_counts: np.ndarray | None
    group_item_sum: np.ndarray | None
    group_head_sum: np.ndarray | None
    share_sum: np.ndarray | None
    unclipped_query: float
    cost: str


def sum_reply(t: int, phase: str, agg: AggregateResult | None = None, *, refused: str = "", cost: dict[str, float] | None = None, unclipped: float = 0.0, share_sum: torch.Tensor | None = None) -> SumReply:
    """A :class:`SumReply` from an :class:`~gfmfr_secure.types.AggregateResult` (or a refusal / a share sum)."""

    def arr(x: torch.Tensor | None) -> np.ndarray | None:
        return None if x is None else x.detach().float().numpy()

    return SumReply(
        round=t, phase=phase, refused=refused, n_clients=0 if agg is None else int(agg.n_clients), weight_total=0.0 if agg is None else float(agg.weight_total),
        item_sum=np.zeros((0, 0), dtype=np.float32) if agg is None else arr(agg.item_sum), head_sum=None if agg is None else arr(agg.head_sum),
        group_counts=None if agg is None else arr(agg.group_counts), group_item_sum=None if agg is None else arr(agg.group_item_sum),
        group_head_sum=None if agg is None else arr(agg.group_head_sum), share_sum=arr(share_sum), unclipped_query=float(unclipped),
        cost=json.dumps(cost or {}),
    )


def merge_sum_replies(replies: list[SumReply]) -> SumReply:
    """Several nodes' partial sums of one request added up (plain backend; a secure sum
    across nodes runs as one protocol, not as a sum of replies)."""
    if len(replies) == 1:
        return replies[0]
    refused = "; ".join(r.refused for r in replies if r.refused)

    def add(name: str) -> np.ndarray | None:
        parts = [getattr(r, name) for r in replies]
        return None if parts[0] is None else np.sum(np.stack(parts), axis=0, dtype=np.float64).astype(np.float32)

    return SumReply(
        round=replies[0].round,
        phase=replies[0].phase,
        refused=refused,
        n_clients=sum(r.n_clients for r in replies),
        weight_total=float(sum(r.weight_total for r in replies)),
        item_sum=add("item_sum"),  # type: ignore[arg-type]
        head_sum=add("head_sum"),
        group_counts=add("group_counts"),
        group_item_sum=add("group_item_sum"),
        group_head_sum=add("group_head_sum"),
        share_sum=add("share_sum"),
        unclipped_query=float(sum(r.unclipped_query for r in replies)),
        cost=replies[0].cost,
    )


def pack_blobs(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``blobs`` concatenated: (uint8 [B] bytes, int64 [m + 1] offsets)."""
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), offsets


def blobs_by_owner(owners: np.ndarray, blobs: np.ndarray, offsets: np.ndarray) -> dict[int, list[bytes]]:
    """The blobs packed by :func:`pack_blobs` (uint8 [B], int64 [m + 1] offsets) by owner (int64 [m]), in order."""
    out: dict[int, list[bytes]] = {}
    data = blobs.tobytes()
    for i, owner in enumerate(owners.tolist()):
        out.setdefault(int(owner), []).append(data[int(offsets[i]) : int(offsets[i + 1])])
    return out


#: the wire format of a ``ckks`` sum across nodes: the backend's (one value per coefficient, public-key encrypted)
CKKS_WIRE = "packed"


@dataclass(frozen=True, eq=False)
class CKKSStep(Message):
    """One step of a ``ckks`` sum between the server's transport, the key holder's node and the clients' nodes.

    Every cohort member with an upload encrypts its dense layout on the node hosting it;
    the server's transport adds the ciphertexts with the round's public context; the key
    holder (a node, :mod:`gfmfr_secure.roles.ckks_party`) makes the round's keys and
    decrypts the sum only::

        keys:    request to the key holder (parameters)              -> reply: the public context (one blob)
        encrypt: request to the clients' nodes (public context; + SumRequest) -> reply: each party's ciphertexts
        decrypt: request to the key holder (the encrypted sum; + SumRequest)  -> reply: ``released``
        check:   request to the key holder (count phase: ``reported``)        -> reply: refused or ""

    Attributes
    ----------
    round : t; phase : the :class:`SumRequest` phase summed (``count`` or ``sums``).
    step : ``keys``, ``encrypt``, ``decrypt`` or ``check``.
    round_id : the backend's count of sums before this one (names the flooding key).
    n_parties, dim, value_bound : n, D and the clients' bound on ``|x|``: they fix the CKKS
        parameters (:func:`~gfmfr_secure.aggregation.ckks.ckks_params_for`).
    parties : int64 [n] (keys and encrypt requests) the user id of each party, in party order; else empty.
    owners : int64 [m] the party each blob is from (encrypt reply: one blob per ciphertext); else zeros.
    blobs : uint8 [B] contexts or ciphertexts, concatenated; offsets : int64 [m + 1].
    n_summands : (decrypt request) the uploads the encrypted sum adds.
    released : float64 [D] (decrypt reply) the flooded (and centrally noised) decryption; else None.
    reported : float64 [G] (check request) the group counts the server reports; else None.
    refused : why the clients refuse the round (or, ``check``, the reported counts), or "".
    unclipped_query : (encrypt reply) ``sum_i (b_i - 1/2)`` over the node's uploads.
    flooding_std : (decrypt reply) std of the flooding noise on every released value.
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {
        "parties": ("int64", 1), "owners": ("int64", 1), "blobs": ("uint8", 1), "offsets": ("int64", 1), "released": ("float64", 1), "reported": ("float64", 1),
    }

    round: int
    phase: str
    step: str
    round_id: int
    n_parties: int
    dim: int
    value_bound: float
    parties: np.ndarray
    owners: np.ndarray
    blobs: np.ndarray
    offsets: np.ndarray
    n_summands: int = 0
    released: np.ndarray | None = None
    reported: np.ndarray | None = None
    refused: str = ""
    unclipped_query: float = 0.0
    flooding_std: float = 0.0

    def parameters(self) -> dict[str, Any]:
        """The round's public parameters by field name."""
        return {k: getattr(self, k) for k in ("round", "phase", "round_id", "n_parties", "dim", "value_bound")}

    def messages(self) -> dict[int, list[bytes]]:
        """The blobs by party (``owners``), in order."""
        return blobs_by_owner(self.owners, self.blobs, self.offsets)

    def only_blob(self, what: str) -> bytes:
        """The step's one blob (a context), or :class:`MessageError` naming ``what`` was expected."""
        if self.owners.size != 1:
            raise MessageError(f"round {self.round}: the {self.step} step should carry {what} as one blob, it carries {self.owners.size}")
        return self.blobs.tobytes()

    def ckks_params(self) -> Any:
        """The :class:`~gfmfr_secure.secagg.ckks.CKKSParams` of the round: the in-process backend's for n uploads |x| <= value_bound."""
        from gfmfr_secure.aggregation.ckks import ckks_params_for

        return ckks_params_for(float(self.value_bound), max(int(self.n_parties), 1), packing="coefficients")

    def answer(self, step: str, owners: list[int], blobs: list[bytes], *, parties: np.ndarray | None = None, **extra: Any) -> CKKSStep:
        """This round's parameters with other content: ``blobs`` from ``owners``, and ``parties`` (default none)."""
        packed, offsets = pack_blobs(blobs)
        fields = {"released": None, "reported": None, "refused": "", "unclipped_query": 0.0, "flooding_std": 0.0, "n_summands": 0, **extra}
        return dataclasses.replace(
            self, step=step, parties=np.zeros(0, dtype=np.int64) if parties is None else np.asarray(parties, dtype=np.int64),
            owners=np.asarray(owners, dtype=np.int64), blobs=packed, offsets=offsets, **fields,
        )


@dataclass(frozen=True, eq=False)
class SecAggRound(Message):
    """The public parameters of one ``masking`` sum across nodes (fields of :class:`SecAggStep` and of a node's kept state).

    Attributes
    ----------
    round : t (training round); phase : the :class:`SumRequest` phase summed (``sums``).
    round_id, n_parties, dim, threshold, value_bound : the
        :class:`~gfmfr_secure.secagg.masking.SecAggConfig` of the round.
    neighbours, graph_seed : its :func:`~gfmfr_secure.secagg.masking.neighbourhood_graph`
        (``neighbours`` 0: the complete graph).
    """

    round: int
    phase: str
    round_id: int
    n_parties: int
    dim: int
    threshold: int
    neighbours: int
    graph_seed: int
    value_bound: float

    def parameters(self) -> dict[str, Any]:
        """The round's parameters by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SecAggRound)}


@dataclass(frozen=True, eq=False)
class SecAggStep(SecAggRound):
    """One step of a ``masking`` secure sum between the server's relay and one node's client parties.

    Each cohort member with an upload is its own party of the SecAgg+ protocol
    (:class:`~gfmfr_secure.secagg.masking.SecAggClient`, on the node hosting it); the
    server's transport plays :class:`~gfmfr_secure.secagg.masking.SecAggServer` and relays
    the protocol's wire messages, which travel here unchanged as bytes. A request asks
    for ``step`` and carries what the server routes to the node's parties; the reply
    carries what they send back::

        advertise: request (parameters, parties)        -> reply: KeyAdvert + identity key per party
        share:     request (neighbours' adverts, PKI)   -> reply: EncryptedShare messages
        upload:    request (routed shares; + SumRequest) -> reply: MaskedUpload per party
        reveal:    request (UnmaskRequest per survivor) -> reply: ShareReveal per survivor
        check:     request (count phase: the reported counts, the transcript, the PKI) -> reply: refused or ""

    Attributes
    ----------
    round .. value_bound : the round's public parameters (:class:`SecAggRound`).
    step : ``advertise``, ``share``, ``upload``, ``reveal`` or ``check``.
    parties : int64 [n] (advertise request) the user id of each party, in party order; else empty.
    owners : int64 [m] the party each blob is for (request) or from (reply); in a check request,
        which part of the transcript it is (0 adverts, 1 shares, 2 uploads, 3 reveals).
    blobs : uint8 [B] the protocol messages, concatenated; offsets : int64 [m + 1].
    key_owners : int64 [k] and keys : uint8 [k, 32]: the parties' Ed25519 identity keys
        (advertise reply: the node's parties; share request: every party that advertised).
    refused : why the node's clients refuse the round's parameters (or, ``check``, the reported counts), or "".
    reported : float64 [G] (check request, count phase) the group counts the server reports.
    unclipped_query : (upload reply) ``sum_i (b_i - 1/2)`` over the node's uploads (adaptive clipping).
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {
        "parties": ("int64", 1), "owners": ("int64", 1), "blobs": ("uint8", 1), "offsets": ("int64", 1), "key_owners": ("int64", 1), "keys": ("uint8", 2),
        "reported": ("float64", 1),
    }

    step: str
    parties: np.ndarray
    owners: np.ndarray
    blobs: np.ndarray
    offsets: np.ndarray
    key_owners: np.ndarray
    keys: np.ndarray
    refused: str = ""
    unclipped_query: float = 0.0
    reported: np.ndarray | None = None

    def messages(self) -> dict[int, list[bytes]]:
        """The protocol messages by party (``owners``), in order."""
        return blobs_by_owner(self.owners, self.blobs, self.offsets)

    def identity_keys(self) -> dict[int, bytes]:
        """Party -> raw Ed25519 public key (32 bytes)."""
        return {int(o): bytes(k) for o, k in zip(self.key_owners.tolist(), self.keys, strict=True)}

    def answer(self, step: str, owners: list[int], blobs: list[bytes], keys: dict[int, bytes] | None = None, **extra: Any) -> SecAggStep:
        """This step's parameters with other content: ``blobs`` from or for ``owners``, identity ``keys`` by party."""
        packed, offsets = pack_blobs(blobs)
        keys = keys or {}
        key_owners = np.array(sorted(keys), dtype=np.int64)
        key_bytes = np.frombuffer(b"".join(keys[o] for o in key_owners.tolist()), dtype=np.uint8).reshape(-1, 32).copy()
        return dataclasses.replace(
            self, step=step, parties=np.zeros(0, dtype=np.int64), owners=np.asarray(owners, dtype=np.int64), blobs=packed, offsets=offsets,
            key_owners=key_owners, keys=key_bytes, **extra,
        )


@dataclass(frozen=True, eq=False)
class Assignment(Message):
    """Server-side grouping's result for round ``round``: the group of each cohort member.

    Attributes
    ----------
    round : t.
    clients : int64 [n] user ids; groups : int64 [n] their groups.
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {"clients": ("int64", 1), "groups": ("int64", 1)}

    round: int
    clients: np.ndarray
    groups: np.ndarray


@dataclass(frozen=True, eq=False)
class EvalRequest(Message):
    """The server asks the nodes to score their users.

    Attributes
    ----------
    round : t (the round validated; the test is scored after the last round).
    split : ``val`` or ``test``.
    model : ``current`` (the model after round t, with the clients' current state) or
        ``best`` (the broadcast model and client state kept at the best validation round).
    item_table : float32 [I, d]; head : float32 [H]: the model to score with.
    users : int64 [k] the users to evaluate (those of them with a ``split`` item), or None for all.
    ks : the cut-offs, as a JSON list.
    chunk_users : users scored per batch.
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {"item_table": ("float32", 2), "head": ("float32", 1), "users": ("int64", 1)}

    round: int
    split: str
    model: str
    item_table: np.ndarray
    head: np.ndarray
    users: np.ndarray | None
    ks: tuple[int, ...]
    chunk_users: int


@dataclass(frozen=True, eq=False)
class EvalReply(Message):
    """Per-user metric values of one node; the server averages them over all nodes' users.

    Attributes
    ----------
    round, split : as requested.
    users : int64 [k] evaluated users, ascending.
    names : the metric names (columns of ``values``).
    values : float64 [k, M] each user's value of each metric.
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {"users": ("int64", 1), "values": ("float64", 2)}

    round: int
    split: str
    users: np.ndarray
    names: tuple[str, ...]
    values: np.ndarray


def merge_eval_replies(replies: list[EvalReply]) -> EvalReply:
    """Several nodes' replies as one, users ascending."""
    if len(replies) == 1:
        return replies[0]
    users = np.concatenate([r.users for r in replies])
    order = np.argsort(users, kind="stable")
    return EvalReply(replies[0].round, replies[0].split, users[order], replies[0].names, np.concatenate([r.values for r in replies])[order])


@dataclass(frozen=True, eq=False)
class KeepSnapshot(Message):
    """Round ``round`` is the best validated so far: each node keeps a copy of its clients' state."""

    round: int
