"""Attacks 3 and 4 at the protocol level: a server that lies about who dropped out.

Threat model: the aggregator of :mod:`gfmfr_secure.secagg.masking` decides what each
survivor is told in the unmasking round (which neighbours survived, which dropped), and
may collude with ``c`` clients, who hand it every share they hold. The honest clients
answer with :meth:`~gfmfr_secure.secagg.masking.SecAggClient.reveal_shares`, which
refuses a request listing fewer than ``t`` survivors and never reveals both kinds of
share for one owner.

:class:`ProtocolRound` runs the key rounds and uploads of ``n`` honest clients through
the public client and server classes and keeps every message, so that an attack can
address its own requests to the clients; :meth:`ProtocolRound.transcript` is what the
honest server received (the input of
:func:`gfmfr_secure.client.checks.verify_count_transcript`).

The adversary's request plans (``holder -> (survivors, dropped)``):

* :func:`victim_split_plan` (attack 3): tell half of the victim's holders it survived
  (they reveal shares of its self-mask seed b) and the other half it dropped (shares of
  its mask key); colluders give both. It recovers the victim's input when
  ``2 t <= |N[u]| + c``.
* :func:`fake_dropout_plan` (attack 4, "all others dropped", with different dropout sets
  for different clients): every holder lists only ``t`` survivors, always the target, and
  calls the rest dropped, rotating who is listed so that each other client's mask key is
  revealed by as many holders as possible. With the target's b and every other client's
  mask key the server strips every mask from the target's upload. A holder can reveal at
  most ``|N[u]| - t`` mask keys, so this needs ``n (n - t) >= (n - 1) t``: it works at
  ``t = n / 2`` and fails for every strict majority.

:func:`collect_shares` sends a plan, records refusals and returns the shares;
:func:`reconstruct` rebuilds a secret from them (Shamir raises with fewer than t), and a
mask key is checked against the public key its owner advertised.
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gfmfr_secure.client.checks import SecAggTranscript
from gfmfr_secure.secagg import masking as sa
from gfmfr_secure.secagg.fixedpoint import decode_sum
from gfmfr_secure.secagg.shamir import Share, int_to_secret, reconstruct_secret

__all__ = [
    "ProtocolRound",
    "RequestPlan",
    "collect_shares",
    "fake_dropout_plan",
    "mask_key_matches",
    "reconstruct",
    "strip_masks",
    "victim_split_plan",
]

#: holder -> (survivors it is told about, clients it is told dropped)
RequestPlan = Mapping[int, tuple[tuple[int, ...], tuple[int, ...]]]


@dataclass
class ProtocolRound:
    """Key rounds and masked uploads of ``n`` honest clients, every message kept.

    Build it with :meth:`start`; then :meth:`upload`; then either :meth:`finish` (the
    honest server's unmasking) or an attacker's own requests through :meth:`ask`.
    """

    config: sa.SecAggConfig
    graph: sa.NeighbourGraph
    seeds: list[bytes]
    clients: list[sa.SecAggClient]
    pki: dict[int, bytes]
    server: sa.SecAggServer
    adverts: list[bytes]
    routed_adverts: dict[int, list[bytes]]
    share_messages: list[bytes]
    routed_shares: dict[int, list[bytes]]
    uploads: dict[int, bytes] = field(default_factory=dict)
    reveals: list[bytes] = field(default_factory=list)

    @classmethod
    def start(cls, n: int, dim: int, *, threshold: int, neighbours: int | None = None, value_bound: float = 8.0, round_id: int = 0, seed: int = 0) -> ProtocolRound:
        """Advertise and share keys among ``n`` clients (secrets from the OS CSPRNG)."""
        config = sa.SecAggConfig.create(n, dim, threshold=threshold, value_bound=value_bound, round_id=round_id)
        graph = sa.neighbourhood_graph(n, neighbours, seed)
        seeds = [_secrets.token_bytes(32) for _ in range(n)]
        clients = [sa.SecAggClient(u, config, graph, seeds[u]) for u in range(n)]
        pki = {u: c.identity_public_key for u, c in enumerate(clients)}
        server = sa.SecAggServer(config, graph, pki)
        adverts = [c.advertise_keys() for c in clients]
        routed_adverts = server.collect_adverts(adverts)
        share_messages = [m for u, c in enumerate(clients) for m in c.share_keys(routed_adverts[u], pki)]
        routed_shares = server.route_shares(share_messages)
        for u, c in enumerate(clients):
            c.receive_shares(routed_shares.get(u, []))
        return cls(config, graph, seeds, clients, pki, server, adverts, routed_adverts, share_messages, routed_shares)

    def upload(self, x: np.ndarray, skip: Iterable[int] = ()) -> None:
        """Every client not in ``skip`` masks and sends its row of ``x`` [n, D]; the server sums them."""
        skipped = set(skip)
        for u, c in enumerate(self.clients):
            if u not in skipped:
                self.uploads[u] = c.masked_upload(np.asarray(x[u], dtype=np.float32))
                self.server.receive_upload(self.uploads[u])

    def finish(self) -> np.ndarray:
        """The honest server's unmasking; uint32 [D] ring sum (reveals kept for :meth:`transcript`)."""
        requests = self.server.unmask_requests()
        self.reveals = [self.clients[v].reveal_shares(req) for v, req in requests.items()]
        return self.server.finish(self.reveals)

    def transcript(self) -> SecAggTranscript:
        """Everything the server received this round (after :meth:`finish`)."""
        return SecAggTranscript(tuple(self.adverts), tuple(self.share_messages), tuple(self.uploads.values()), tuple(self.reveals))

    def ask(self, holder: int, survivors: Sequence[int], dropped: Sequence[int], *, colluding: bool = False) -> sa.ShareReveal:
        """Send ``holder`` an unmask request; a colluding holder answers from a fresh copy of itself.

        A colluder knows its own secret seed, so it can run a second copy of its client from
        it (same keys, same decrypted shares) that has revealed nothing yet: that is how it
        hands over both kinds of share. Honest holders answer through their one client
        object and raise :class:`SecAggError` when they refuse.
        """
        request = sa.UnmaskRequest(self.config.round_id, holder, tuple(sorted(survivors)), tuple(sorted(dropped))).to_bytes()
        client = self._twin(holder) if colluding else self.clients[holder]
        return sa.ShareReveal.from_bytes(client.reveal_shares(request))

    def _twin(self, u: int) -> sa.SecAggClient:
        twin = sa.SecAggClient(u, self.config, self.graph, self.seeds[u])
        twin.advertise_keys()
        twin.share_keys(self.routed_adverts[u], self.pki)
        twin.receive_shares(self.routed_shares.get(u, []))
        twin.masked_upload(np.zeros(self.config.dim, dtype=np.float32))  # only an uploader may reveal; never sent
        return twin

    def mask_public(self, u: int) -> bytes:
        """The X25519 mask public key client ``u`` advertised."""
        return sa.KeyAdvert.from_bytes(self.adverts[u]).mask_public


@dataclass(frozen=True)
class CollectedShares:
    """What the adversary got: shares of each owner's self-mask seed and mask key, and the refusals."""

    self_mask: dict[int, list[Share]]
    mask_key: dict[int, list[Share]]
    refused: dict[int, str]


def collect_shares(rnd: ProtocolRound, plan: RequestPlan, colluders: Iterable[int] = ()) -> CollectedShares:
    """Send every request of ``plan``; colluders also answer the opposite request (both kinds)."""
    colluding = set(colluders)
    b: dict[int, list[Share]] = {}
    s: dict[int, list[Share]] = {}
    refused: dict[int, str] = {}
    for holder, (survivors, dropped) in plan.items():
        asks = [(survivors, dropped, holder in colluding)]
        if holder in colluding:  # the colluder's copy answers "everyone survived" too: all its self-mask shares
            asks.append((tuple(rnd.graph.closed(holder)), (), True))
        for surv, drop, twin in asks:
            try:
                reveal = rnd.ask(holder, surv, drop, colluding=twin)
            except sa.SecAggError as err:
                refused[holder] = str(err)
                continue
            for owner, y in reveal.self_mask_shares:
                b.setdefault(owner, []).append(Share(holder + 1, y))
            for owner, y in reveal.mask_key_shares:
                s.setdefault(owner, []).append(Share(holder + 1, y))
    return CollectedShares(_unique(b), _unique(s), refused)


def _unique(table: dict[int, list[Share]]) -> dict[int, list[Share]]:
    return {owner: list({sh.x: sh for sh in shares}.values()) for owner, shares in table.items()}


def reconstruct(shares: Sequence[Share], threshold: int) -> bytes:
    """The 32-byte secret behind ``shares``; raises ValueError with fewer than ``threshold``."""
    return int_to_secret(reconstruct_secret(list(shares), threshold))


def mask_key_matches(secret: bytes, advertised_public: bytes) -> bool:
    """Whether a reconstructed mask key is the one its owner advertised."""
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw() == advertised_public


def victim_split_plan(rnd: ProtocolRound, victim: int, colluders: Sequence[int] = ()) -> RequestPlan:
    """Attack 3: the victim's honest holders split in two; colluders are asked as "dropped" (the twin adds the rest).

    The victim itself (a holder of its own shares) can only be told it survived.
    """
    closed = rnd.graph.closed(victim)
    honest = [v for v in closed if v not in set(colluders) and v != victim]
    t = rnd.config.threshold
    need_b = max(0, t - len(colluders) - 1)  # the victim's own share counts toward b
    b_half, s_half = [victim, *honest[:need_b]], honest[need_b:]
    plan: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for v in b_half:
        plan[v] = (closed, ())
    for v in [*s_half, *colluders]:
        plan[v] = (tuple(w for w in closed if w != victim), (victim,))
    return plan


def fake_dropout_plan(rnd: ProtocolRound, target: int) -> RequestPlan:
    """Attack 4: every holder hears that only t clients survived, the target always among them.

    The other ``t - 2`` survivors listed to each holder are the clients whose mask keys have
    been asked for most often so far, so that every mask key is asked of as many holders as
    the threshold allows (complete graph).
    """
    n, t = rnd.config.n_clients, rnd.config.threshold
    asked = np.zeros(n, dtype=np.int64)  # holders asked so far for each client's mask key
    plan: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for holder in range(n):
        others = [w for w in range(n) if w not in (holder, target)]
        listed = sorted(others, key=lambda w: (-asked[w], w))[: max(0, t - len({holder, target}))]
        survivors = tuple(sorted({holder, target, *listed}))
        dropped = tuple(w for w in others if w not in survivors)
        asked[list(dropped)] += 1
        plan[holder] = (survivors, dropped)
    return plan


def strip_masks(rnd: ProtocolRound, target: int, self_mask_seed: bytes, pair_seeds: Mapping[int, bytes]) -> np.ndarray:
    """float64 [D]: the target's input, from its masked upload, its self-mask seed and its pairwise seeds.

    ``pair_seeds[v]`` is ``s_uv`` for each neighbour v the target masked with; the server
    derives it from v's (or the target's) reconstructed mask key and the other's advertised
    public key, as the honest server does for dropped clients.
    """
    dim = rnd.config.dim
    y = np.frombuffer(sa.MaskedUpload.from_bytes(rnd.uploads[target], dim).payload, dtype="<u4").copy()
    y -= sa.prg_mask(self_mask_seed, dim)
    for v, seed in pair_seeds.items():
        mask = sa.prg_mask(seed, dim)
        y = y - mask if v > target else y + mask  # the target added +PRG(s_uv) for v > u, -PRG(s_uv) for v < u
    return decode_sum(y, frac_bits=rnd.config.frac_bits)
