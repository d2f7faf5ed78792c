"""Pairwise-mask secure aggregation (Bonawitz et al., CCS 2017), with SecAgg+ neighbourhoods.

The server learns the sum of the surviving clients' vectors and nothing else
about any individual vector, even when clients drop out mid-round.

Protocol (one aggregation round, ``n`` clients, vectors of length ``D``)
----------------------------------------------------------------------
Every client ``u`` holds a long-term Ed25519 identity key whose public half
is known to everybody (a PKI); all messages a client sends to the server are
signed with it.

0. **AdvertiseKeys.** ``u`` creates two X25519 key pairs for this round: an
   *encryption* pair ``(c_u^SK, c_u^PK)`` and a *mask* pair ``(s_u^SK, s_u^PK)``,
   and sends the signed public keys. The server forwards them to ``u``'s
   neighbours (everybody in the complete graph).
1. **ShareKeys.** ``u`` draws a self-mask seed ``b_u`` and Shamir-shares both
   ``b_u`` and ``s_u^SK`` with threshold ``t`` among its *closed*
   neighbourhood ``N[u] = N(u) + {u}`` (it keeps its own share). Each share
   pair for ``v`` is encrypted with ChaCha20-Poly1305 under
   ``HKDF(X25519(c_u^SK, c_v^PK))``, so the server routes ciphertexts it
   cannot read. ``U2`` is the set of clients that sent shares.
2. **MaskedInputCollection.** ``u`` encodes its vector into Z_{2^32}
   (:mod:`gfmfr_secure.secagg.fixedpoint`) and uploads::

       y_u = x_u + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)

   (mod 2^32, ``v`` over the neighbours in ``U2``), where
   ``s_uv = HKDF-SHA256(X25519(s_u^SK, s_v^PK))`` is the same for both
   endpoints and ``PRG`` is the AES-256-CTR keystream (zero initial counter:
   every key is used once) read as ``D`` little-endian uint32 words, as in
   Bonawitz et al.'s implementation (AES runs in hardware on x86-64 and ARMv8,
   about 1.7x the speed of ChaCha20 there). The upload is bytes:
   a header, a SHA-256 commitment to ``b_u``, the ``4 D`` payload bytes and
   an Ed25519 signature over header, commitment and BLAKE3 of the payload;
   a tampered, truncated or mis-sized upload is rejected. ``U3`` is the set of
   clients whose upload arrived.
3. **Unmasking.** The server tells each survivor ``v`` which of its
   neighbours survived (``U3``) and which dropped (``U2 - U3``). ``v``
   reveals its share of ``b_u`` for survivors and of ``s_u^SK`` for dropped
   clients, and refuses ever to reveal both kinds for the same client. The
   server reconstructs each ``s_u^SK`` of a dropped client (checked against
   the advertised ``s_u^PK``), recomputes and removes the pairwise masks
   between it and its surviving neighbours, reconstructs each survivor's
   ``b_u`` (checked against its commitment) and removes ``PRG(b_u)``. The
   remaining pairwise masks between survivors cancel in the sum. Last, the
   server checks that every coordinate of the unmasked sum is one that
   ``|U3|`` uploads bounded by the value bound can produce
   (:func:`gfmfr_secure.secagg.fixedpoint.out_of_range`); a sum that is not
   is rejected with :class:`SecAggError` and nothing is released.

If fewer than ``t`` shares of a needed secret can be obtained, the round fails
with :class:`SecAggError` naming the secret, the shares available and ``t``;
the server checks this *before* asking anyone to reveal anything.

Threat model. Secure against an honest-but-curious server colluding with
fewer than ``t`` clients of any closed neighbourhood: a masked upload is
uniform on Z_{2^32}^D, and ``b_u`` (resp. ``s_u^SK``) of a survivor (resp. a
client declared dropped) stays hidden. Uploads, key advertisements and
revealed shares are authenticated, so a network attacker cannot alter them.
The "never both kinds" rule means a server that lies about who dropped
cannot collect ``t`` shares of *both* secrets of a client when
``t > |N[u]| / 2``: the two kinds would have to come from disjoint sets of
honest holders, each of size ``t``. Every party enforces that strict majority
(:meth:`SecAggConfig.check_graph`), so an honest client refuses to take part in
a round with a smaller threshold. With ``c`` of the holders colluding with the
server (each of them hands over both kinds), the bound becomes
``2 t > |N[u]| + c``. The consistency-check round of the fully malicious
variant is not implemented, and a malicious server can always make a round
fail.

Malicious clients. A masked upload is uniform on the ring, so nobody can
range-check one client's vector without zero-knowledge proofs (not
implemented). Each honest client checks its own values before encoding; the
server checks the unmasked sum (above). Together with the headroom of the
encoding (:data:`gfmfr_secure.secagg.fixedpoint.HEADROOM_BITS`) this rejects a
round carrying a value outside ``[-B, B]`` or garbage words unless the
attacker chose them to land in range; a client that knows the encoding can
still set each coordinate of the sum to any value in ``[-|U3| B, |U3| B]``.

SecAgg+ neighbourhoods (``neighbours=k``)
-----------------------------------------
With ``k=None`` every pair of clients shares a mask (the original protocol):
per-client work and traffic grow with ``n`` (``n - 1`` key agreements, share
ciphertexts and ``D``-word PRG expansions), and the server's unmasking costs
``O(n_dropped * n * D)``. With an even ``k`` the clients form a random Harary
graph: a ring on which each client is joined to its ``k / 2`` nearest
positions on either side, the clients placed on the ring by a permutation
derived from the seed (Bell et al., CCS 2020). Then:

* costs are ``O(k)`` per client and ``O(n D + n_dropped k D)`` at the server,
  so ``k ~ 2 ceil(log2 n)`` makes large ``n`` affordable;
* ``t`` counts within the closed neighbourhood (``1 <= t <= k + 1``);
  privacy of ``x_u`` now relies on fewer than ``t`` of the ``k + 1`` clients
  in ``N[u]`` colluding with the server (not fewer than ``t`` of ``n``);
  a random graph with ``k = O(log n)`` keeps that likely for a bounded
  fraction of corrupt clients, but the guarantee is statistical, and the
  graph must not be chosen by the adversary (here it is derived from the
  seed; in deployment from public randomness fixed before the round);
* dropout tolerance is local: every survivor needs ``t`` surviving members
  of ``N[u]``, and every dropped client with a surviving neighbour needs
  ``t`` surviving neighbours. A neighbourhood losing more than ``k + 1 - t``
  members makes the whole round fail even when few clients dropped overall;
* if the survivors' graph falls apart into several connected components,
  the server learns the partial sum of each component rather than only the
  total (masks only cancel within a component). For ``k = O(log n)`` and
  moderate dropout this is unlikely, but it is a weaker guarantee than the
  complete graph, where only the total is ever revealed.

Costs
-----
Per client uploaded bytes are ``4 D + 112`` (masked vector) plus
``140`` (keys) ``+ 96 |N(u)|`` (share ciphertexts) ``+ 84 + 36 |N[u]|``
(revealed shares); downloaded bytes are ``236 |N(u)| + 20 + 4 |N[u]|``.
For ``D`` in the hundreds of thousands this is within a fraction of a
percent of the ``4 D`` bytes of a plain float32 upload.

Per round the clients expand ``(k / 2 + 1) n`` keystreams of ``4 D`` bytes (each pair
mask once, shared by its endpoints in the simulation, plus the self masks) and hash
their uploads; the server hashes every upload and expands the n self masks again.
:func:`secure_sum` plays the clients' masking round on ``workers`` threads when vectors
are long (``driver.PARALLEL_MIN_DIM``): the AES-CTR keystream, BLAKE3 and numpy, the bulk
of such a round, run with the GIL released. The key rounds hold the GIL (X25519, Ed25519,
Shamir, Python) and run on the calling thread, where they are faster than on threads.

Randomness
----------
Each client derives all its secrets (identity key, round keys, ``b_u``, Shamir
coefficients) from one 32-byte ``secret_seed`` with HKDF and AES-256-CTR. The
simulation driver :func:`secure_sum` gives each client
``secrets.token_bytes(32)`` from the operating system's CSPRNG by default
(``secrets="os"``). With ``secrets="reproducible"`` it derives them from its
integer ``seed`` instead (:func:`client_secret_seed`: identical uploads for
identical seeds), a simulation mode for tests and exact replays in which anyone
who knows the seed can strip every mask. The ``seed`` also places clients on
the SecAgg+ ring; that graph is public by design.

Layout
------
The package is split by role, as Flower splits SecAgg+: :mod:`.primitives` (key
derivation, the PRG, commitments, signatures), :mod:`.params` (the public round
parameters and neighbourhood graph), :mod:`.messages` (the wire messages),
:mod:`.client` and :mod:`.server` (the two roles; the server never imports the
client) and :mod:`.driver` (:func:`secure_sum`, one simulated round, used by the
``masking`` backend and the tests). The names below are re-exported here and
load their module on first use, so importing one role does not load the other.
"""

from __future__ import annotations

from gfmfr_secure.secagg.exports import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "EncryptedShare": "messages",
    "KeyAdvert": "messages",
    "MaskedUpload": "messages",
    "SecAggTranscript": "messages",
    "ShareReveal": "messages",
    "UnmaskRequest": "messages",
    "NeighbourGraph": "params",
    "SecAggConfig": "params",
    "neighbourhood_graph": "params",
    "SecAggError": "primitives",
    "client_secret_seed": "primitives",
    "prg_mask": "primitives",
    "SecAggClient": "client",
    "SecAggServer": "server",
    "SecAggCosts": "driver",
    "SecAggRecording": "driver",
    "SecureSumResult": "driver",
    "secure_sum": "driver",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
