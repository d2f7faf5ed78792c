"""``FlowerClients``: the :class:`~gfmfr_secure.roles.transport.Clients` transport over a Flower Grid.

Every request goes to every SuperNode still in the run, as one Flower ``Message`` per
node, and the replies are merged (uploads and evaluation replies in client-id order, so
the result does not depend on how users are spread over nodes). A node that has not
answered within ``timeout`` seconds, or whose reply is Flower's "node unavailable" /
"message unavailable" error, is dropped for the rest of the run: the round goes on with
the clients of the nodes that answered, and :attr:`FlowerClients.log` records, per
request, the nodes asked and answering and the users the missing nodes host. A ClientApp
that raised is an error of the run (:class:`~gfmfr_secure.flower.loopback.DeploymentError`),
not a dropout.

Under the plain backend the nodes' uploads reach the server client by client; without
user-level DP the sum of a round is then computed here over the merged uploads with the
backend's own code (see :meth:`FlowerClients._plain_sum`): no second message, and the
floats add in the order of the in-process run (per-node partial sums added afterwards
would round differently). Under central DP the count phase and the noised sums are
released here too (:meth:`FlowerClients._central_release`): the noise is one draw, which
the nodes would each add again; with adaptive clipping each node's train reply carries its
clients' clipped-count query, which the sums reply passes on. Every other sum request
(local DP: the clients' own noise shares) goes to the nodes holding uploads and their
partial sums are added (:func:`~gfmfr_secure.roles.messages.merge_sum_replies`), except
under the secure backends: ``masking`` runs a SecAgg+ round among the nodes' parties
(:meth:`FlowerClients._masking_sums`), ``ckks`` has the parties encrypt on their nodes, adds
the ciphertexts here and has the key holder's node decrypt (:meth:`FlowerClients._ckks_sums`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from gfmfr_secure.aggregation import get_aggregator
from gfmfr_secure.flower.loopback import DeploymentError
from gfmfr_secure.flower.records import get_message, put_message
from gfmfr_secure.roles.messages import (
    Assignment,
    Broadcast,
    EvalReply,
    EvalRequest,
    Hello,
    KeepSnapshot,
    SecAggStep,
    SumReply,
    SumRequest,
    Upload,
    merge_eval_replies,
    merge_hellos,
    merge_sum_replies,
    merge_uploads,
    sum_reply,
)
from gfmfr_secure.types import Exposure

__all__ = ["FlowerClients", "DROPOUT_CODES"]

#: what to change when a node dropped and a distributed-DP sum would carry less noise than accounted
_KEEP_NODES = "keep every SuperNode answering (raise round-timeout) or use privacy.mechanism=central"

#: Flower error codes that mean the node (or its message) is gone, not that the ClientApp failed
DROPOUT_CODES = frozenset({3, 4, 5})  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE

R = TypeVar("R")

#: the transport's copy of the clients' DP plan: its warnings are the server's to log
_QUIET = logging.getLogger("gfmfr_secure.flower.transport.quiet")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


class FlowerClients:
    """The clients on the SuperNodes of a Flower run, as the server role sees them.

    Parameters
    ----------
    grid : the ServerApp's ``Grid``.
    cfg : the experiment config (backend and aggregation settings).
    n_items : I (the plain sum's size).
    nodes : node ids to talk to (default: every node the Grid lists when :meth:`hello` runs).
    timeout : seconds one request waits for the replies.

    Attributes
    ----------
    log : one entry per request: ``round``, ``kind``, ``nodes_asked``, ``nodes_answered``,
        ``dropped_nodes``, ``clients_answered`` (users in the replies), ``clients_missing``
        (cohort members, or evaluated users, hosted by nodes that did not answer) and
        ``seconds``.
    hosted : node id -> int64 users it hosts (from its hello).
    """

    def __init__(self, grid: Grid, cfg: Any, n_items: int, *, nodes: Sequence[int] | None = None, timeout: float = 600.0) -> None:
        self.grid, self.cfg, self.n_items, self.timeout = grid, cfg, int(n_items), float(timeout)
        self.nodes: list[int] = sorted(nodes) if nodes is not None else []
        self.hosted: dict[int, np.ndarray] = {}
        self.log: list[dict[str, Any]] = []
        self.aggregator = get_aggregator(cfg.aggregation.backend, settings=cfg.aggregation, seed=int(cfg.seed), secrets=cfg.secrets, min_group_size=cfg.grouping.min_group_size)
        self.per_client = self.aggregator.exposure == Exposure.PER_CLIENT
        self._pending: dict[int, list[Any]] = {}
        self._uploaded: dict[int, Upload] = {}
        self._merged: Upload | None = None
        self._sent: dict[int, int] = {}  # requests sent to each node: the next one's sequence number
        self._round = -1
        self._population = 0
        self._plan: tuple[int, Any] | None = None  # (population, user-level DP plan) of a central-DP run
        #: central DP: the plain sums and the count phase are released here (see _central_release)
        self.central_here = self.per_client and cfg.privacy.mechanism == "central"
        self._unclipped = 0.0  # the clients' clipped-count query of the round, from the nodes' train replies
        #: masking: the sums run as one SecAgg+ round among the nodes' parties, relayed here (see _masking_sums)
        self.masking = cfg.aggregation.backend == "masking"
        #: ckks: the nodes' clients encrypt, the sums are added here, the key holder's node decrypts (see _ckks_sums)
        self.ckks = cfg.aggregation.backend == "ckks"

    # ------------------------------------------------------------------ exchange

    def _exchange(self, kind: str, message_type: str, request: Any, nodes: Sequence[int], round_idx: int, decode: Callable[[RecordDict], R],
                  users: np.ndarray | None = None, extra: Mapping[str, Any] | None = None) -> dict[int, R]:
        """Send ``request`` (plus each node's queued one-way messages) to ``nodes``; the decoded replies by node.

        ``request``: one message for every node, or a dict node -> that node's message;
        ``extra``: further messages every node receives, by record name.
        """
        messages = []
        for node in nodes:
            content = RecordDict()
            for i, one_way in enumerate(self._pending.pop(node, [])):
                put_message(content, f"before.{i}", one_way)
            mine = request.get(node) if isinstance(request, dict) else request
            if mine is not None:
                put_message(content, "request", mine)
            for name, message in (extra or {}).items():
                put_message(content, name, message)
            content["seq"] = ConfigRecord({"seq": self._sent.get(node, 0)})
            self._sent[node] = self._sent.get(node, 0) + 1
            messages.append(Message(content, dst_node_id=node, message_type=message_type, group_id=f"{kind}-{round_idx}"))
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout)) if messages else []
        seconds = time.perf_counter() - t0
        out: dict[int, R] = {}
        for reply in replies:
            src = int(reply.metadata.src_node_id)
            if reply.has_error():
                if int(reply.error.code) in DROPOUT_CODES:
                    continue
                raise DeploymentError(f"{kind} on node {src} failed: {reply.error.reason}")
            out[src] = decode(reply.content)
        missing = [n for n in nodes if n not in out]
        for node in missing:
            self.nodes.remove(node)
        lost = np.concatenate([self.hosted.get(n, np.zeros(0, dtype=np.int64)) for n in missing]) if missing else np.zeros(0, dtype=np.int64)
        if users is not None:
            lost = np.intersect1d(lost, users)
        self.log.append({
            "round": round_idx, "kind": kind, "nodes_asked": len(nodes), "nodes_answered": len(out), "dropped_nodes": [int(n) for n in missing],
            "clients_missing": int(lost.size), "seconds": round(seconds, 3),
        })
        return out

    def _queue(self, msg: Any) -> None:
        for node in self.nodes:
            self._pending.setdefault(node, []).append(msg)

    # ------------------------------------------------------------------ Clients

    def hello(self) -> Hello:
        if not self.nodes:
            self.nodes = sorted(int(n) for n in self.grid.get_node_ids())
        if not self.nodes:
            raise DeploymentError("no SuperNode is connected to the SuperLink")
        replies = self._exchange("hello", "query.hello", None, list(self.nodes), -1, lambda c: get_message(c, "reply", Hello))
        if not replies:
            raise DeploymentError(f"none of the {self.log[-1]['nodes_asked']} SuperNodes answered the hello within {self.timeout:g} s")
        self.hosted = {node: h.hosted for node, h in replies.items()}
        self.log[-1]["clients_answered"] = int(sum(h.hosted.size for h in replies.values()))
        return merge_hellos([replies[n] for n in sorted(replies)])

    def train(self, msg: Broadcast) -> Upload:
        t = int(msg.round)
        self._round, self._population = t, int(msg.population)
        answers = self._exchange("train", "train", msg, list(self.nodes), t, lambda c: (get_message(c, "reply", Upload), _unclipped_query(c)), users=msg.cohort)
        replies = {n: up for n, (up, _) in answers.items()}
        self._uploaded = replies
        self._unclipped = sum(answers[n][1] for n in sorted(answers))
        self._merged = None
        uploads = [replies[n] for n in sorted(replies)]
        refused = sum(u.refused for u in uploads)
        nonempty = [u for u in uploads if len(u)]
        self.log[-1]["clients_answered"] = int(sum(len(u) for u in nonempty))
        if not nonempty:
            return Upload.empty(int(self.cfg.model.latent_dim), t, refused=refused)
        merged = merge_uploads(nonempty)
        merged = dataclasses.replace(merged, refused=refused) if merged.refused != refused else merged
        self._merged = merged if self.per_client else None
        return merged

    def aggregate(self, msg: SumRequest) -> SumReply:
        t = int(msg.round)
        if self.masking and msg.phase in ("count", "sums"):
            return self._masking_sums(msg)
        if self.ckks and msg.phase in ("count", "sums"):
            return self._ckks_sums(msg)
        if self._merged is not None and msg.phase == "sums" and msg.central is None and math.isinf(float(msg.clip)):
            return self._plain_sum(msg, self._merged)
        if self._merged is not None and self.central_here and msg.phase in ("count", "sums"):
            return self._central_release(msg, self._merged)
        nodes = [n for n in self.nodes if n in self._uploaded and len(self._uploaded[n])]
        # every node's clients size their DP noise shares for all the uploads of the round, not for their own node's
        msg = dataclasses.replace(msg, n_uploads=sum(len(u) for u in self._uploaded.values()))
        replies = self._exchange("aggregate", "query.aggregate", msg, nodes, t, lambda c: get_message(c, "reply", SumReply))
        if not replies:
            raise DeploymentError(f"round {t}: no SuperNode holding uploads answered the sum request")
        parts = [replies[n] for n in sorted(replies)]
        self.log[-1]["clients_answered"] = int(sum(r.n_clients for r in parts))
        return merge_sum_replies(parts)

    def _masking_sums(self, msg: SumRequest) -> SumReply:
        """A ``masking`` sum (count phase or the round's sums): one SecAgg+ round among the parties on the nodes, relayed here.

        The server side plays :class:`~gfmfr_secure.secagg.masking.SecAggServer`
        (:func:`~gfmfr_secure.flower.relay.relay_secure_sum`) and learns the released sum
        only. The log entry of each step counts the parties that answered; the reveal
        step's entry also the round's ``parties``, ``survivors`` (their uploads are in the
        sum) and ``recovered`` (dropped parties whose masks the survivors' shares removed).
        After a count phase the surviving parties check the counts against the phase's
        transcript (:func:`~gfmfr_secure.flower.relay.relay_count_check`), as in process.

        Raises
        ------
        ConfigError
            Under distributed DP, when fewer parties survived than the noise shares were sized for.
        """
        from gfmfr_secure.aggregation.layout import decode_sum
        from gfmfr_secure.flower.relay import relay_count_check, relay_secure_sum

        t = int(msg.round)
        layout = self._secure_layout(msg)
        hosted, exchange = self._step_exchange(t, "query.secagg", SecAggStep)
        out = relay_secure_sum(exchange, msg, self.aggregator, hosted, layout.n_groups * layout.block_size)
        if out.refused:
            return sum_reply(t, msg.phase, refused=out.refused)
        self.log[-1].update(parties=out.parties, survivors=out.survivors, recovered=out.recovered)
        dp = self._dp_plan()
        if dp is not None and (msg.central is not None or msg.phase == "count") and dp.share_std(out.parties, self.aggregator.min_reporting(out.parties)) > 0:
            self.aggregator.check_survivors(out.survivors, out.parties, fix=_KEEP_NODES)
        agg = decode_sum(out.total, layout, n_clients=out.survivors, grouped=bool(msg.grouped))
        cost = {"bytes_up_per_client": out.bytes_up / max(out.survivors, 1), "dropped": float(out.parties - out.survivors), "protocol_s": round(out.seconds, 3)}
        if msg.phase == "count":
            refused = relay_count_check(exchange, msg, out, agg.group_counts.double().numpy(), sorted(hosted))
            if refused:
                return sum_reply(t, "count", refused=refused)
        return sum_reply(t, msg.phase, agg, cost=cost, unclipped=out.unclipped_query)

    def _step_exchange(self, t: int, message_type: str, reply_type: type) -> tuple[dict[int, np.ndarray], Callable[..., dict[int, Any]]]:
        """The parties of a secure sum (node -> int64 users with an upload) and an exchange of its steps with the nodes still in the run."""
        hosted = {n: up.clients for n, up in sorted(self._uploaded.items()) if len(up) and n in self.nodes}
        parties = np.concatenate(list(hosted.values())) if hosted else np.zeros(0, dtype=np.int64)

        def exchange(kind: str, request: Any, nodes: list[int], extra: dict[str, Any] | None) -> dict[int, Any]:
            alive = [n for n in nodes if n in self.nodes]
            replies = self._exchange(kind, message_type, request, alive, t, lambda c: get_message(c, "reply", reply_type), users=parties, extra=extra)
            self.log[-1]["clients_answered"] = len({p for r in replies.values() for p in r.owners.tolist()})
            return replies

        return hosted, exchange

    def _ckks_sums(self, msg: SumRequest) -> SumReply:
        """A ``ckks`` sum (count phase or the round's sums): the nodes' clients encrypt, the sum is added here, the key holder decrypts.

        The key holder is the node hosting user 0 (partition-id 0); this side holds the
        round's public context only (:func:`~gfmfr_secure.flower.ckks_relay.relay_encrypted_sum`)
        and receives the key holder's release, flooded and, under central DP, noised by it.
        The log entry of the decrypt step counts the round's ``parties`` and ``survivors``.
        After a count phase the key holder's node checks the reported counts against its
        release (:func:`~gfmfr_secure.flower.ckks_relay.relay_ckks_count_check`), as the
        in-process clients check them against the key holder's release.

        Raises
        ------
        DeploymentError
            The key holder's node is not in the run (it never joined or stopped answering).
        ConfigError
            Under distributed DP, when a node dropped and fewer parties were summed than the noise shares were sized for.
        """
        from gfmfr_secure.aggregation.layout import decode_sum
        from gfmfr_secure.flower.ckks_relay import relay_ckks_count_check, relay_encrypted_sum
        from gfmfr_secure.roles.messages import CKKSStep

        t = int(msg.round)
        holder = next((n for n in self.nodes if n in self.hosted and np.isin(0, self.hosted[n])), None)
        if holder is None:
            raise DeploymentError(f"round {t}: the ckks key holder (the SuperNode with partition-id 0, hosting user 0) is not in the run")
        layout = self._secure_layout(msg)
        hosted, exchange = self._step_exchange(t, "query.ckks", CKKSStep)
        out = relay_encrypted_sum(exchange, msg, self.aggregator, hosted, holder, layout.n_groups * layout.block_size)
        if out.refused:
            return sum_reply(t, msg.phase, refused=out.refused)
        self.log[-1].update(parties=out.parties, survivors=out.survivors)
        dp = self._dp_plan()
        if dp is not None and dp.share_std(out.parties, out.parties) > 0:  # ckks has no dropout recovery: every party must be summed
            self.aggregator.check_survivors(out.survivors, out.parties, fix=_KEEP_NODES)
        agg = decode_sum(out.total, layout, n_clients=out.survivors, grouped=bool(msg.grouped))
        cost = {
            "bytes_up_per_client": out.bytes_up / max(out.survivors, 1), "bytes_down_per_client": float(out.context_bytes),
            "context_bytes": float(out.context_bytes), "flooding_std": out.flooding_std, "protocol_s": round(out.seconds, 3),
        }
        if msg.phase == "count":
            refused = relay_ckks_count_check(exchange, msg, out, agg.group_counts.double().numpy(), holder)
            if refused:
                return sum_reply(t, "count", refused=refused)
        return sum_reply(t, msg.phase, agg, cost=cost, unclipped=out.unclipped_query)

    def _secure_layout(self, msg: SumRequest) -> Any:
        """The layout of the dense uploads a secure sum of ``msg`` adds (as each client builds it)."""
        from gfmfr_secure.privacy.release import ReleaseLayout

        d, head = int(self.cfg.model.latent_dim), self._head_size()
        dp = self._dp_plan()
        if dp is not None:
            dp.clip = float(msg.clip)
        if msg.phase == "count":  # one count coordinate per group (simulation.group_floor.count_inputs)
            return ReleaseLayout(int(msg.n_groups), 0, d, 0, 1.0 if dp is None else dp.count_value)
        if msg.central is None:
            return ReleaseLayout(int(msg.n_groups) if msg.grouped else 1, self.n_items, d, head, 1.0)
        return ReleaseLayout(int(msg.n_groups), self.n_items, d, head, dp.count_value, write_count=bool(msg.write_count))

    def _dp_plan(self) -> Any:
        """The clients' user-level DP plan for this run's eligible population (as :meth:`ClientNode.dp_plan` makes it)."""
        from gfmfr_secure.simulation.dp import plan_privacy

        if self._plan is None or self._plan[0] != self._population:  # its warnings are the server's own plan's to log
            self._plan = (self._population, plan_privacy(self.cfg, self._population, logger=_QUIET))
        return self._plan[1]

    def _head_size(self) -> int:
        """H: the shared head's length (0 under a private head), as the release layout counts it."""
        from gfmfr_secure.models import get_backbone, init_shared_params
        from gfmfr_secure.rng import torch_generator

        mc = self.cfg.model
        if get_backbone(mc.backbone).private_head:
            return 0
        template = init_shared_params(1, mc.latent_dim, torch_generator(int(self.cfg.seed), "init", "shared"), mc.item_init_std, scorer=mc.scorer, user_std=mc.user_init_std)
        return int(template.head_flat().numel())

    def _central_release(self, msg: SumRequest, up: Upload) -> SumReply:
        """Central DP under the plain backend: the count phase or the noised sums, released here.

        The server holds every clipped upload (plain), and under central DP the noise is
        one draw by the releasing party, not the clients' shares. Asking the nodes would add
        the draw once per node (each adds ``msg.central``, and each the count phase's) and
        add per-node partial sums whose floats round differently from the in-process sum.
        So both are computed here over the merged uploads, with the code the in-process
        clients run (:func:`~gfmfr_secure.simulation.group_floor.count_phase`,
        ``aggregate(noise=ReleaseNoise(...))``); the count phase's central draw uses the
        clients' key ``dp-count-central`` of a :class:`~gfmfr_secure.rng.SecretSource`
        built from the config, as each node's is. The sums reply carries the clients'
        clipped-count query the nodes sent with their uploads (0 without adaptive
        clipping); the server adds its noise to it as in process.
        """
        from gfmfr_secure.privacy.release import ReleaseLayout, ReleaseNoise
        from gfmfr_secure.rng import SecretSource
        from gfmfr_secure.simulation.group_floor import count_phase

        t = int(msg.round)
        dp = self._dp_plan()
        dp.clip = float(msg.clip)
        if msg.phase == "count":
            counts, cost = count_phase(self.aggregator, up.as_update(), up.group, int(msg.n_groups), dp, SecretSource(self.cfg.secrets, int(self.cfg.seed)), t)
            return SumReply(
                round=t, phase="count", refused="", n_clients=len(up), weight_total=0.0, item_sum=np.zeros((0, 0), dtype=np.float32), head_sum=None,
                group_counts=counts.astype(np.float32), group_item_sum=None, group_head_sum=None, share_sum=None, unclipped_query=0.0, cost=json.dumps(cost),
            )
        noise = None
        if msg.central is not None:
            layout = ReleaseLayout(int(msg.n_groups), self.n_items, int(self.cfg.model.latent_dim), self._head_size(), dp.count_value, write_count=bool(msg.write_count))
            noise = ReleaseNoise(layout, torch.from_numpy(np.array(msg.central)), None)
        return dataclasses.replace(self._plain_sum(msg, up, noise), unclipped_query=float(self._unclipped))

    def _plain_sum(self, msg: SumRequest, up: Upload, noise: Any = None) -> SumReply:
        """The plain backend's sum of the merged uploads ``up``, computed here (no message to the nodes).

        The plain backend releases every upload as it is, so the server holds them after
        :meth:`train`; summing them here adds the floats in the in-process order. What the
        nodes would do on a sum request is done by message instead: under a grouped
        release each client commits the group it is summed in (an :class:`Assignment`
        sent with the next request), and without user-level clipping (clip = inf) every
        client's count query ``b_i - 1/2`` is ``+1/2``. ``noise``: the central DP draw
        (:meth:`_central_release`), None without DP; the count query is then 0 here
        (:meth:`_central_release` replaces it with the one the nodes sent).
        """
        update = up.as_update()
        groups = None
        if msg.grouped:
            groups = up.group if msg.merge is None else msg.merge[up.group]  # each client maps its own choice
            update = dataclasses.replace(update, group=groups)
            self._queue(Assignment(round=int(msg.round), clients=up.clients, groups=np.asarray(groups, dtype=np.int64)))
        weights = up.n_samples.astype(np.float64) if msg.weighting == "samples" else np.ones(len(up))
        agg = self.aggregator.aggregate(update, n_items=self.n_items, weights=weights, groups=groups, n_groups=int(msg.n_groups), noise=noise)

        def arr(x: Any) -> np.ndarray | None:
            return None if x is None else x.detach().float().numpy()

        fields = {
            "round": int(msg.round), "phase": "sums", "refused": "", "n_clients": int(agg.n_clients), "weight_total": float(agg.weight_total),
            "item_sum": arr(agg.item_sum), "head_sum": arr(agg.head_sum), "group_counts": arr(agg.group_counts),
            "group_item_sum": arr(agg.group_item_sum), "group_head_sum": arr(agg.group_head_sum), "share_sum": None,
            "unclipped_query": 0.5 * len(up) if noise is None else 0.0, "cost": json.dumps(dict(self.aggregator.last_cost)),
        }
        names = {f.name for f in dataclasses.fields(SumReply)}
        if "per_client" in names and agg.per_client is not None:
            fields["per_client"] = up if groups is None else dataclasses.replace(up, group=np.asarray(groups, dtype=np.int64))
        return SumReply(**{k: v for k, v in fields.items() if k in names})

    def assign(self, msg: Assignment) -> None:
        self._queue(msg)

    def evaluate(self, msg: EvalRequest) -> EvalReply:
        replies = self._exchange("evaluate", "evaluate", msg, list(self.nodes), int(msg.round), lambda c: get_message(c, "reply", EvalReply), users=msg.users)
        parts = [replies[n] for n in sorted(replies)]
        if not parts:
            raise DeploymentError(f"round {msg.round}: no SuperNode answered the {msg.split} evaluation")
        self.log[-1]["clients_answered"] = int(sum(r.users.size for r in parts))
        return merge_eval_replies(parts)

    def keep_snapshot(self, msg: KeepSnapshot) -> None:
        self._queue(msg)


def _unclipped_query(content: RecordDict) -> float:
    """The clients' clipped-count query ``sum_i (b_i - 1/2)`` a node's train reply carries (central DP with adaptive clipping), else 0."""
    return float(content.config_records["unclipped"]["query"]) if "unclipped" in content.config_records else 0.0
