"""The client role of pairwise-mask secure aggregation: holds its own secrets, speaks in bytes."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gfmfr_secure.secagg.fixedpoint import encode
from gfmfr_secure.secagg.masking.messages import UPLOAD_HEADER, EncryptedShare, KeyAdvert, MaskedUpload, ShareReveal, UnmaskRequest
from gfmfr_secure.secagg.masking.params import NeighbourGraph, SecAggConfig
from gfmfr_secure.secagg.masking.primitives import (
    KEY_BYTES,
    ZERO_NONCE12,
    Keystream,
    SecAggError,
    check_bytes,
    check_magic,
    clamp_x25519,
    commitment_to,
    derive_pair_seed,
    hkdf,
    keystream_bytes,
    share_key_pair,
    verify_signature,
)
from gfmfr_secure.secagg.shamir import PRIME, int_to_secret, randomness_bytes_needed, split_secret

__all__ = ["SecAggClient"]

_STATE_MAGIC = b"SAC1"
_STATE_HDR = struct.Struct("<4sIIBIII")  # magic, round, client, flags (advertised, uploaded), peers, held, revealed; + secret seed
_PEER = struct.Struct("<I32s32s")  # neighbour, c_v^PK, s_v^PK
_HELD = struct.Struct("<I32s32s")  # owner, share of s_owner^SK, share of b_owner
_REVEALED = struct.Struct("<IB")  # owner, kind (index into _REVEAL_KINDS)
_REVEAL_KINDS = ("mask key", "self mask")


class SecAggClient:
    """One client: holds its own secrets only and speaks to the server in bytes.

    Call order per round: :meth:`advertise_keys`, :meth:`share_keys`, :meth:`receive_shares`,
    :meth:`masked_upload`, :meth:`reveal_shares`.

    Parameters
    ----------
    client_id : u in [0, n).
    config : the round's public parameters.
    graph : the public neighbourhood graph.
    secret_seed : 32 secret random bytes; every key, seed and Shamir coefficient is derived from it.
    """

    def __init__(
        self, client_id: int, config: SecAggConfig, graph: NeighbourGraph, secret_seed: bytes
    ) -> None:
        config.check_graph(graph)
        if not 0 <= client_id < config.n_clients:
            raise ValueError(f"client_id {client_id} is outside [0, {config.n_clients})")
        if len(secret_seed) != KEY_BYTES:
            raise ValueError(f"secret_seed must be {KEY_BYTES} bytes, got {len(secret_seed)}")
        self._id = int(client_id)
        self._config = config
        self._neighbours = frozenset(graph.neighbours[client_id])
        self._seed = bytes(secret_seed)
        self._identity = Ed25519PrivateKey.from_private_bytes(hkdf(self._seed, "identity"))
        self._enc_key: X25519PrivateKey | None = None
        self._mask_key_bytes = b""
        self._mask_key: X25519PrivateKey | None = None
        self._self_seed = b""
        self._peer_enc: dict[int, X25519PublicKey] = {}  # verified neighbours (U1 within N(u))
        self._peer_mask: dict[int, X25519PublicKey] = {}
        # share keys (to, from) each neighbour, from X25519(c_u^SK, c_v^PK); computed once per neighbour
        self._enc_shared: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[int, int]] = {}  # owner -> (y of s_owner^SK, y of b_owner)
        self._revealed: dict[int, str] = {}  # owner -> "mask key" | "self mask"
        self._uploaded = False

    @property
    def client_id(self) -> int:
        return self._id

    @property
    def identity_public_key(self) -> bytes:
        """Raw Ed25519 public key (32 bytes), registered in the PKI."""
        return self._identity.public_key().public_bytes_raw()

    def _round(self) -> int:
        return self._config.round_id

    def advertise_keys(self) -> bytes:
        """Round 0: make this round's key pairs and b_u; return the signed :class:`KeyAdvert` bytes."""
        if self._enc_key is not None:
            raise SecAggError(
                f"client {self._id} already advertised keys for round {self._round()}"
            )
        r = self._round()
        self._make_round_keys()
        unsigned = KeyAdvert(
            r,
            self._id,
            self._enc_key.public_key().public_bytes_raw(),
            self._mask_key.public_key().public_bytes_raw(),
            b"",
        )
        return KeyAdvert(
            r,
            self._id,
            unsigned.enc_public,
            unsigned.mask_public,
            self._identity.sign(unsigned.signed_part()),
        ).to_bytes()

    def _make_round_keys(self) -> None:
        """This round's encryption and mask key pairs and self-mask seed b_u, from the secret seed."""
        r = self._round()
        self._enc_key = X25519PrivateKey.from_private_bytes(hkdf(self._seed, "share-encryption-key", r))
        self._mask_key_bytes = clamp_x25519(hkdf(self._seed, "mask-key", r))
        self._mask_key = X25519PrivateKey.from_private_bytes(self._mask_key_bytes)
        seed_b = bytearray(hkdf(self._seed, "self-mask-seed", r))
        seed_b[31] &= 127  # below 2^255 < p, so it is one field element
        self._self_seed = bytes(seed_b)

    def export_state(self) -> bytes:
        """Everything this client holds in the round, as bytes, for :meth:`resume` in another process.

        The secret seed (from which every key, b_u and Shamir coefficient follows), the
        neighbours' verified public keys, the shares it holds, what it revealed and whether
        it uploaded. It is the client's secret: keep it on the client's own machine.
        """
        flags = (self._enc_key is not None) | (self._uploaded << 1)
        parts = [_STATE_HDR.pack(_STATE_MAGIC, self._round(), self._id, flags, len(self._peer_enc), len(self._held), len(self._revealed)), self._seed]
        parts += [_PEER.pack(v, self._peer_enc[v].public_bytes_raw(), self._peer_mask[v].public_bytes_raw()) for v in sorted(self._peer_enc)]
        parts += [_HELD.pack(o, int_to_secret(s), int_to_secret(b)) for o, (s, b) in sorted(self._held.items())]
        parts += [_REVEALED.pack(o, _REVEAL_KINDS.index(kind)) for o, kind in sorted(self._revealed.items())]
        return b"".join(parts)

    @classmethod
    def resume(cls, config: SecAggConfig, graph: NeighbourGraph, state: bytes) -> SecAggClient:
        """The client :meth:`export_state` wrote, under the same round parameters.

        Raises
        ------
        SecAggError
            If ``state`` is malformed or belongs to another round.
        """
        state = check_bytes(state, "client state")
        if len(state) < _STATE_HDR.size + KEY_BYTES:
            raise SecAggError(f"client state has {len(state)} bytes, shorter than its header")
        magic, round_id, client, flags, n_peers, n_held, n_revealed = _STATE_HDR.unpack_from(state)
        check_magic(magic, _STATE_MAGIC, "client state")
        expected = _STATE_HDR.size + KEY_BYTES + n_peers * _PEER.size + n_held * _HELD.size + n_revealed * _REVEALED.size
        if len(state) != expected or round_id != config.round_id:
            raise SecAggError(f"client state of client {client} does not fit round {config.round_id} ({len(state)} bytes, round {round_id})")
        offset = _STATE_HDR.size
        self = cls(client, config, graph, state[offset : offset + KEY_BYTES])
        offset += KEY_BYTES
        if flags & 1:
            self._make_round_keys()
        for _ in range(n_peers):
            v, enc, mask = _PEER.unpack_from(state, offset)
            self._peer_enc[v], self._peer_mask[v] = X25519PublicKey.from_public_bytes(enc), X25519PublicKey.from_public_bytes(mask)
            offset += _PEER.size
        for _ in range(n_held):
            o, s_y, b_y = _HELD.unpack_from(state, offset)
            self._held[o] = (int.from_bytes(s_y, "little"), int.from_bytes(b_y, "little"))
            offset += _HELD.size
        for _ in range(n_revealed):
            o, kind = _REVEALED.unpack_from(state, offset)
            self._revealed[o] = _REVEAL_KINDS[kind]
            offset += _REVEALED.size
        self._uploaded = bool(flags & 2)
        return self

    def share_keys(
        self, adverts: Iterable[bytes], identity_keys: Mapping[int, bytes]
    ) -> list[bytes]:
        """Round 1: verify the neighbours' keys, Shamir-share s_u^SK and b_u, encrypt per neighbour.

        Parameters
        ----------
        adverts : the :class:`KeyAdvert` bytes of the neighbours, as forwarded by the server.
        identity_keys : the PKI: client id -> raw Ed25519 public key.

        Returns
        -------
        list[bytes]
            One :class:`EncryptedShare` per verified neighbour, for the server to route.
        """
        if self._enc_key is None or self._mask_key is None:
            raise SecAggError(f"client {self._id}: advertise_keys must run before share_keys")
        if self._peer_enc:
            raise SecAggError(f"client {self._id} already shared its keys")
        r = self._round()
        for raw in adverts:
            advert = KeyAdvert.from_bytes(raw)
            v = advert.client
            if v not in self._neighbours:
                raise SecAggError(
                    f"client {self._id} got keys of client {v}, which is not its neighbour"
                )
            if advert.round_id != r:
                raise SecAggError(f"keys of client {v} are for round {advert.round_id}, not {r}")
            if v in self._peer_enc:
                raise SecAggError(f"client {self._id} got two key advertisements from client {v}")
            if v not in identity_keys:
                raise SecAggError(f"client {v} has no identity key in the PKI")
            verify_signature(
                Ed25519PublicKey.from_public_bytes(identity_keys[v]),
                advert.signature,
                advert.signed_part(),
                f"key advertisement of client {v}",
            )
            self._peer_enc[v] = X25519PublicKey.from_public_bytes(advert.enc_public)
            self._peer_mask[v] = X25519PublicKey.from_public_bytes(advert.mask_public)
        holders = sorted((*self._peer_enc, self._id))
        t = self._config.threshold
        if len(holders) < t:
            raise SecAggError(
                f"client {self._id}: only {len(holders)} members of its neighbourhood (itself included) "
                f"advertised keys, threshold {t} required; aborting"
            )
        xs = [h + 1 for h in holders]
        need = randomness_bytes_needed(t)
        mask_shares = split_secret(
            int.from_bytes(self._mask_key_bytes, "little"),
            t,
            xs,
            keystream_bytes(hkdf(self._seed, "shamir-mask-key", r), need),
        )
        self_shares = split_secret(
            int.from_bytes(self._self_seed, "little"),
            t,
            xs,
            keystream_bytes(hkdf(self._seed, "shamir-self-mask", r), need),
        )
        out = []
        for holder, s_share, b_share in zip(holders, mask_shares, self_shares):
            if holder == self._id:
                self._held[self._id] = (s_share.y, b_share.y)
                continue
            header = EncryptedShare(r, self._id, holder, b"")
            key = self._share_keys(holder)[0]
            plain = int_to_secret(s_share.y) + int_to_secret(b_share.y)
            ciphertext = ChaCha20Poly1305(key).encrypt(ZERO_NONCE12, plain, header.header())
            out.append(EncryptedShare(r, self._id, holder, ciphertext).to_bytes())
        return out

    def _share_keys(self, peer: int) -> tuple[bytes, bytes]:
        """Keys of the share ciphertexts to and from ``peer``, from X25519(c_u^SK, c_peer^PK); computed once."""
        keys = self._enc_shared.get(peer)
        if keys is None:
            if self._enc_key is None:
                raise SecAggError(f"client {self._id}: advertise_keys must run first")
            shared = self._enc_key.exchange(self._peer_enc[peer])
            keys = self._enc_shared[peer] = share_key_pair(shared, self._round(), self._id, peer)
        return keys

    def receive_shares(self, messages: Iterable[bytes]) -> None:
        """Round 1 (end): decrypt and keep the shares the neighbours sent to this client."""
        if self._enc_key is None or self._id not in self._held:
            raise SecAggError(f"client {self._id}: share_keys must run before receive_shares")
        r = self._round()
        for raw in messages:
            msg = EncryptedShare.from_bytes(raw)
            u = msg.sender
            if msg.receiver != self._id or msg.round_id != r:
                raise SecAggError(
                    f"client {self._id} got a share meant for client {msg.receiver} in round {msg.round_id}"
                )
            if u not in self._peer_enc:
                raise SecAggError(
                    f"client {self._id} got shares from client {u}, whose keys it never verified"
                )
            if u in self._held:
                raise SecAggError(f"client {self._id} got two share messages from client {u}")
            key = self._share_keys(u)[1]
            try:
                plain = ChaCha20Poly1305(key).decrypt(ZERO_NONCE12, msg.ciphertext, msg.header())
            except InvalidTag:
                raise SecAggError(
                    f"shares from client {u} to client {self._id} failed authentication"
                ) from None
            s_y = int.from_bytes(plain[:KEY_BYTES], "little")
            b_y = int.from_bytes(plain[KEY_BYTES:], "little")
            if s_y >= PRIME or b_y >= PRIME:
                raise SecAggError(f"shares from client {u} are not field elements")
            self._held[u] = (s_y, b_y)

    def pair_seed(self, other: int) -> bytes:
        """s_uv with neighbour ``other`` (from this client's own s_u^SK and other's s_v^PK).

        Exposed so a simulation can expand each pair's mask once for both endpoints.
        """
        if self._mask_key is None:
            raise SecAggError(f"client {self._id}: advertise_keys must run first")
        if other == self._id or other not in self._held:
            raise SecAggError(f"client {self._id} shares no pairwise mask with client {other}")
        return derive_pair_seed(self._mask_key, self._peer_mask[other], self._round(), self._id, other)

    def mask_partners(self) -> tuple[int, ...]:
        """The neighbours this client shares pairwise masks with (those whose shares it holds)."""
        return tuple(sorted(v for v in self._held if v != self._id))

    def masked_upload(self, x: np.ndarray, *, pair_mask_total: np.ndarray | None = None) -> bytes:
        """Round 2: encode, mask, sign; return the upload bytes (see :class:`MaskedUpload`).

        Parameters
        ----------
        x : float32 [D], every value within ``[-value_bound, value_bound]``.
        pair_mask_total : uint32 [D] or None. None: the client expands its pairwise masks itself.
            Otherwise the precomputed ``sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)`` over
            :meth:`mask_partners` (a simulation shortcut; the client trusts it).

        Returns
        -------
        bytes
            ``4 D + 112`` bytes.
        """
        cfg = self._config
        if self._uploaded:
            raise SecAggError(f"client {self._id} already uploaded in round {cfg.round_id}")
        if not self._held:
            raise SecAggError(f"client {self._id}: the key-sharing round must complete first")
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (cfg.dim,):
            got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(
                f"client {self._id}: input must be a float32 array of shape ({cfg.dim},), got {got}"
            )
        y = encode(x, frac_bits=cfg.frac_bits, value_bound=cfg.value_bound, client=self._id)
        keystream = Keystream(cfg.dim)
        if pair_mask_total is None:
            for v in self.mask_partners():
                mask = keystream.fill(self.pair_seed(v))
                if v > self._id:
                    np.add(y, mask, out=y)
                else:
                    np.subtract(y, mask, out=y)
        else:
            if pair_mask_total.dtype != np.uint32 or pair_mask_total.shape != (cfg.dim,):
                raise ValueError(
                    f"pair_mask_total must be uint32 [{cfg.dim}], got {pair_mask_total.dtype} "
                    f"{pair_mask_total.shape}"
                )
            np.add(y, pair_mask_total, out=y)
        np.add(y, keystream.fill(self._self_seed), out=y)
        payload = memoryview(y.astype("<u4", copy=False)).cast("B")
        header = UPLOAD_HEADER.pack(MaskedUpload.MAGIC, cfg.round_id, self._id, cfg.dim)
        commitment = commitment_to(self._self_seed, cfg.round_id, self._id)
        signature = self._identity.sign(MaskedUpload.signed_digest(header, commitment, payload))
        self._uploaded = True
        return b"".join((header, commitment, payload, signature))

    def reveal_shares(self, request: bytes) -> bytes:
        """Round 3: answer an :class:`UnmaskRequest` with a signed :class:`ShareReveal`.

        Reveals the share of b_v for each listed survivor and of s_v^SK for each listed dropped
        client. Refuses (SecAggError) to reveal both kinds for one client, ever; to act when the
        lists overlap or name clients whose shares it does not hold; when it did not upload
        itself; and when fewer than ``t`` survivors are listed.
        """
        cfg = self._config
        req = UnmaskRequest.from_bytes(request)
        if req.recipient != self._id or req.round_id != cfg.round_id:
            raise SecAggError(f"client {self._id} got an unmask request for client {req.recipient}")
        if not self._uploaded:
            raise SecAggError(f"client {self._id} did not upload, so it reveals nothing")
        survivors, dropped = set(req.survivors), set(req.dropped)
        if survivors & dropped:
            raise SecAggError(
                f"client {self._id} refuses: clients {sorted(survivors & dropped)} are listed both as "
                f"survivors and as dropped"
            )
        if self._id in dropped or self._id not in survivors:
            raise SecAggError(
                f"client {self._id} refuses: it uploaded but is not listed as a survivor"
            )
        unknown = (survivors | dropped) - set(self._held)
        if unknown:
            raise SecAggError(f"client {self._id} holds no shares of clients {sorted(unknown)}")
        if len(survivors) < cfg.threshold:
            raise SecAggError(
                f"client {self._id} refuses: only {len(survivors)} survivors listed in its neighbourhood, "
                f"threshold {cfg.threshold}"
            )
        for owner in dropped:
            if self._revealed.get(owner, "mask key") != "mask key":
                raise SecAggError(
                    f"client {self._id} refuses to reveal the mask-key share of client {owner}: it already "
                    f"revealed its self-mask share"
                )
        for owner in survivors:
            if self._revealed.get(owner, "self mask") != "self mask":
                raise SecAggError(
                    f"client {self._id} refuses to reveal the self-mask share of client {owner}: it already "
                    f"revealed its mask-key share"
                )
        self._revealed.update({owner: "mask key" for owner in dropped})
        self._revealed.update({owner: "self mask" for owner in survivors})
        unsigned = ShareReveal(
            cfg.round_id,
            self._id,
            tuple((o, self._held[o][0]) for o in sorted(dropped)),
            tuple((o, self._held[o][1]) for o in sorted(survivors)),
            b"",
        )
        signature = self._identity.sign(unsigned.signed_part())
        return ShareReveal(
            cfg.round_id, self._id, unsigned.mask_key_shares, unsigned.self_mask_shares, signature
        ).to_bytes()
