"""The server role of pairwise-mask secure aggregation: routes messages, sums masked uploads, unmasks the sum.

It sees public keys, opaque share ciphertexts, masked uploads and the shares survivors
reveal; it never imports the client role (a test walks the imports).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gfmfr_secure.secagg.fixedpoint import out_of_range
from gfmfr_secure.secagg.masking.messages import UPLOAD_HEADER, EncryptedShare, KeyAdvert, MaskedUpload, ShareReveal, UnmaskRequest
from gfmfr_secure.secagg.masking.params import NeighbourGraph, SecAggConfig
from gfmfr_secure.secagg.masking.primitives import Keystream, SecAggError, commitment_to, derive_pair_seed, payload_digest, verify_signature
from gfmfr_secure.secagg.shamir import Share, int_to_secret, reconstruct_secret

__all__ = ["CheckedUpload", "SecAggServer"]


@dataclass(frozen=True, eq=False)
class CheckedUpload:
    """A masked upload that passed :meth:`SecAggServer.check_upload`: its client, the BLAKE3
    of its payload, its commitment to b_u and the payload as uint32 [D] (a view of the bytes)."""

    client: int
    digest: bytes
    commitment: bytes
    payload: np.ndarray


class SecAggServer:
    """The aggregator: sees public keys, opaque share ciphertexts, masked uploads and revealed shares.

    Call order: :meth:`collect_adverts`, :meth:`route_shares`, :meth:`receive_upload` (once per
    arriving upload; they are summed on arrival and not kept), :meth:`unmask_requests`,
    :meth:`finish`.

    Parameters
    ----------
    config : the round's public parameters.
    graph : the public neighbourhood graph.
    identity_keys : the PKI: client id -> raw Ed25519 public key, for all n clients.
    workers : threads that expand the masks removed when unmasking (the AES keystream and
        numpy release the GIL).
    """

    def __init__(
        self, config: SecAggConfig, graph: NeighbourGraph, identity_keys: Mapping[int, bytes], *, workers: int = 1
    ) -> None:
        config.check_graph(graph)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self._workers = workers
        missing = set(range(config.n_clients)) - set(identity_keys)
        if missing:
            raise ValueError(
                f"identity keys missing for {len(missing)} clients, e.g. {sorted(missing)[:5]}"
            )
        self._config = config
        self._graph = graph
        self._identity = {
            u: Ed25519PublicKey.from_public_bytes(identity_keys[u]) for u in range(config.n_clients)
        }
        self._adverts: dict[int, KeyAdvert] = {}
        self._mask_public: dict[int, X25519PublicKey] = {}
        self._sharers: set[int] = set()
        self._shares_routed = False
        self._total = np.zeros(config.dim, dtype=np.uint32)
        self._uploaded: dict[int, bytes] = {}  # client -> BLAKE3 digest of its payload
        self._commitments: dict[int, bytes] = {}
        self._requests: dict[int, UnmaskRequest] | None = None
        self._dropped_needed: tuple[int, ...] = ()
        self._finished = False

    @property
    def survivors(self) -> tuple[int, ...]:
        """Clients whose masked upload was accepted (U3), sorted."""
        return tuple(sorted(self._uploaded))

    @property
    def dropped(self) -> tuple[int, ...]:
        """Clients that shared keys but sent no accepted upload (U2 - U3), sorted."""
        return tuple(sorted(self._sharers - set(self._uploaded)))

    def upload_digest(self, client: int) -> bytes:
        """BLAKE3 digest of the masked payload accepted from ``client``."""
        return self._uploaded[client]

    def collect_adverts(self, messages: Iterable[bytes]) -> dict[int, list[bytes]]:
        """Round 0: verify the key advertisements and route each client its neighbours' ones.

        Returns
        -------
        dict[int, list[bytes]]
            For every advertising client u, the advertisements of its advertising neighbours.
        """
        if self._adverts:
            raise SecAggError("key advertisements were already collected")
        r = self._config.round_id
        for raw in messages:
            advert = KeyAdvert.from_bytes(raw)
            u = advert.client
            if not 0 <= u < self._config.n_clients:
                raise SecAggError(f"key advertisement from unknown client {u}")
            if advert.round_id != r:
                raise SecAggError(
                    f"key advertisement of client {u} is for round {advert.round_id}, not {r}"
                )
            if u in self._adverts:
                raise SecAggError(f"client {u} advertised keys twice")
            verify_signature(
                self._identity[u],
                advert.signature,
                advert.signed_part(),
                f"key advertisement of client {u}",
            )
            self._adverts[u] = advert
            self._mask_public[u] = X25519PublicKey.from_public_bytes(advert.mask_public)
        return {
            u: [
                self._adverts[v].to_bytes() for v in self._graph.neighbours[u] if v in self._adverts
            ]
            for u in self._adverts
        }

    def route_shares(self, messages: Iterable[bytes]) -> dict[int, list[bytes]]:
        """Round 1: route encrypted shares by receiver (reading headers only); senders form U2."""
        if not self._adverts:
            raise SecAggError("collect_adverts must run before route_shares")
        if self._shares_routed:
            raise SecAggError("shares were already routed")
        r = self._config.round_id
        routed: dict[int, list[bytes]] = {}
        seen: set[tuple[int, int]] = set()
        for raw in messages:
            msg = EncryptedShare.from_bytes(raw)
            u, v = msg.sender, msg.receiver
            if msg.round_id != r:
                raise SecAggError(f"shares from client {u} are for round {msg.round_id}, not {r}")
            if (
                u not in self._adverts
                or v not in self._adverts
                or v not in self._graph.neighbours[u]
            ):
                raise SecAggError(
                    f"shares from client {u} to client {v} do not follow the advertised graph"
                )
            if (u, v) in seen:
                raise SecAggError(f"client {u} sent two share messages to client {v}")
            seen.add((u, v))
            self._sharers.add(u)
            routed.setdefault(v, []).append(msg.to_bytes())
        self._shares_routed = True
        return routed

    def receive_upload(self, data: bytes) -> int:
        """Round 2: check one masked upload and add it to the running sum; return its client id.

        The same as :meth:`accept_upload` of :meth:`check_upload`.

        Raises
        ------
        SecAggError
            Not bytes, wrong length (truncated, wrong dtype or dim), bad header, unknown or
            duplicate client, a client that did not share keys, or a failed signature.
        """
        return self.accept_upload(self.check_upload(data))

    def check_upload(self, data: bytes) -> CheckedUpload:
        """Round 2, first half: parse and authenticate one masked upload without changing any state.

        Safe to call from several threads at once (hashing the payload and checking the
        signature are the expensive part of receiving an upload); :meth:`accept_upload`
        then adds it, one upload at a time.
        """
        if not self._shares_routed:
            raise SecAggError("route_shares must run before uploads are accepted")
        if self._requests is not None:
            raise SecAggError("uploads are closed: unmasking has started")
        upload = MaskedUpload.from_bytes(data, self._config.dim)
        u = upload.client
        if upload.round_id != self._config.round_id:
            raise SecAggError(f"masked upload of client {u} is for round {upload.round_id}")
        if u not in self._sharers:
            raise SecAggError(f"masked upload from client {u}, which did not share its keys")
        if u in self._uploaded:
            raise SecAggError(f"client {u} uploaded twice")
        digest = payload_digest(upload.payload)
        header = bytes(data[: UPLOAD_HEADER.size])
        signed = header + upload.commitment + digest
        verify_signature(self._identity[u], upload.signature, signed, f"masked upload of client {u}")
        return CheckedUpload(u, digest, upload.commitment, np.frombuffer(upload.payload, dtype="<u4"))

    def accept_upload(self, checked: CheckedUpload) -> int:
        """Round 2, second half: add an upload :meth:`check_upload` passed to the running sum; return its client id."""
        u = checked.client
        if self._requests is not None:
            raise SecAggError("uploads are closed: unmasking has started")
        if u in self._uploaded:
            raise SecAggError(f"client {u} uploaded twice")
        np.add(self._total, checked.payload, out=self._total)
        self._uploaded[u] = checked.digest
        self._commitments[u] = checked.commitment
        return u

    def _mask_sum(self, seeds: list[bytes]) -> np.ndarray:
        """uint32 [D]: the sum of PRG(seed) over ``seeds``, expanded on ``workers`` threads."""
        dim, k = self._config.dim, max(1, min(self._workers, len(seeds)))

        def part(chunk: list[bytes]) -> np.ndarray:
            acc, keystream = np.zeros(dim, dtype=np.uint32), Keystream(dim)
            for seed in chunk:
                np.add(acc, keystream.fill(seed), out=acc)
            return acc

        chunks = [seeds[i::k] for i in range(k)]
        if k == 1:
            return part(chunks[0])
        with ThreadPoolExecutor(k) as pool:
            parts = list(pool.map(part, chunks))
        return np.sum(parts, axis=0, dtype=np.uint32)

    def unmask_requests(self) -> dict[int, bytes]:
        """Round 3: close uploads; check every needed secret can be rebuilt; address the survivors.

        Returns
        -------
        dict[int, bytes]
            survivor id -> :class:`UnmaskRequest` bytes.

        Raises
        ------
        SecAggError
            Fewer than t uploads, or some needed secret with fewer than t surviving share holders
            (raised before anyone reveals a share).
        """
        if not self._shares_routed:
            raise SecAggError("the key rounds must complete before unmasking")
        if self._requests is not None:
            raise SecAggError("unmask requests were already issued")
        t = self._config.threshold
        graph = self._graph
        alive = set(self._uploaded)
        if len(alive) < t:
            raise SecAggError(
                f"cannot unmask: only {len(alive)} of {len(self._sharers)} clients uploaded masked inputs "
                f"({len(self._sharers) - len(alive)} dropped), fewer than the threshold t={t}"
            )
        needed_dropped = tuple(u for u in self.dropped if alive.intersection(graph.neighbours[u]))
        problems = []
        for u in sorted(alive):
            available = len(alive.intersection(graph.closed(u)))
            if available < t:
                problems.append(
                    f"self-mask seed of client {u}: {available} shares available, {t} required"
                )
        for u in needed_dropped:
            available = len(alive.intersection(graph.neighbours[u]))
            if available < t:
                problems.append(
                    f"mask key of dropped client {u}: {available} shares available, {t} required"
                )
        if problems:
            raise SecAggError(
                f"cannot unmask: {len(problems)} secret(s) have fewer surviving share holders than the "
                f"threshold t={t}: "
                + "; ".join(problems[:5])
                + ("; ..." if len(problems) > 5 else "")
            )
        needed = set(needed_dropped)
        self._dropped_needed = needed_dropped
        self._requests = {
            v: UnmaskRequest(
                self._config.round_id,
                v,
                tuple(w for w in graph.closed(v) if w in alive),
                tuple(w for w in graph.neighbours[v] if w in needed),
            )
            for v in sorted(alive)
        }
        return {v: req.to_bytes() for v, req in self._requests.items()}

    def finish(self, reveals: Iterable[bytes]) -> np.ndarray:
        """Round 3 (end): rebuild the needed secrets, strip the masks, return the ring sum.

        Returns
        -------
        np.ndarray
            uint32 [D]: the sum of the survivors' fixed-point encodings mod 2^32.

        Raises
        ------
        SecAggError
            A reveal that is forged, unrequested or off-request; fewer than t shares for a needed
            secret; a reconstructed secret that contradicts its public key / commitment; or an
            unmasked sum that no ``|U3|`` uploads bounded by the value bound can produce (some
            upload was out of range or corrupt: the round is rejected, nothing is released).
        """
        if self._requests is None:
            raise SecAggError("unmask_requests must run before finish")
        if self._finished:
            raise SecAggError("the round is already finished")
        cfg = self._config
        t = cfg.threshold
        mask_key_shares: dict[int, list[Share]] = {u: [] for u in self._dropped_needed}
        self_shares: dict[int, list[Share]] = {u: [] for u in self._uploaded}
        senders: set[int] = set()
        for raw in reveals:
            reveal = ShareReveal.from_bytes(raw)
            v = reveal.sender
            request = self._requests.get(v)
            if request is None or reveal.round_id != cfg.round_id:
                raise SecAggError(f"share reveal from client {v}, which was not asked to reveal")
            if v in senders:
                raise SecAggError(f"client {v} revealed shares twice")
            verify_signature(
                self._identity[v],
                reveal.signature,
                reveal.signed_part(),
                f"share reveal of client {v}",
            )
            owners_s = [o for o, _ in reveal.mask_key_shares]
            owners_b = [o for o, _ in reveal.self_mask_shares]
            if not set(owners_s) <= set(request.dropped) or not set(owners_b) <= set(
                request.survivors
            ):
                raise SecAggError(
                    f"share reveal of client {v} contains shares that were not requested"
                )
            if len(set(owners_s)) != len(owners_s) or len(set(owners_b)) != len(owners_b):
                raise SecAggError(f"share reveal of client {v} repeats an owner")
            senders.add(v)
            for owner, y in reveal.mask_key_shares:
                mask_key_shares[owner].append(Share(v + 1, y))
            for owner, y in reveal.self_mask_shares:
                self_shares[owner].append(Share(v + 1, y))
        short = [
            f"{kind} of client {u}: {len(shares)} shares available, {t} required"
            for kind, table in (("mask key", mask_key_shares), ("self-mask seed", self_shares))
            for u, shares in sorted(table.items())
            if len(shares) < t
        ]
        if short:
            raise SecAggError(
                f"cannot unmask: {len(short)} secret(s) have fewer revealed shares than the threshold "
                f"t={t}: " + "; ".join(short[:5]) + ("; ..." if len(short) > 5 else "")
            )
        alive = set(self._uploaded)
        added: list[bytes] = []  # masks to add back: y_v carried -PRG(s_uv) for a dropped u > v
        removed: list[bytes] = []  # masks to take away: +PRG(s_uv) for u < v, and every PRG(b_u)
        for u in self._dropped_needed:
            key_bytes = int_to_secret(reconstruct_secret(mask_key_shares[u], t))
            key = X25519PrivateKey.from_private_bytes(key_bytes)
            if key.public_key().public_bytes_raw() != self._adverts[u].mask_public:
                raise SecAggError(
                    f"reconstructed mask key of dropped client {u} does not match its public key"
                )
            for v in self._graph.neighbours[u]:
                if v in alive:
                    seed = derive_pair_seed(key, self._mask_public[v], cfg.round_id, u, v)
                    (removed if u > v else added).append(seed)  # y_v carried +PRG(s_uv) when u > v
        for u in sorted(alive):
            seed_b = int_to_secret(reconstruct_secret(self_shares[u], t))
            if commitment_to(seed_b, cfg.round_id, u) != self._commitments[u]:
                raise SecAggError(
                    f"reconstructed self-mask seed of client {u} does not match its commitment"
                )
            removed.append(seed_b)
        total = self._total.copy()
        np.add(total, self._mask_sum(added), out=total)
        np.subtract(total, self._mask_sum(removed), out=total)
        self._finished = True
        bad = out_of_range(total, len(alive), cfg.frac_bits, cfg.value_bound)
        if bad.size:
            raise SecAggError(
                f"the unmasked sum of {len(alive)} uploads has {bad.size} of {cfg.dim} coordinates "
                f"outside [-{len(alive)} B, {len(alive)} B] with B = value_bound = {cfg.value_bound} "
                f"(first at index {int(bad[0])}): some upload was out of range or corrupt; the round "
                f"is rejected. Honest clients check their own values, so look for a malicious or "
                f"faulty client, or raise aggregation.value_bound if values were clipped too tightly"
            )
        return total
