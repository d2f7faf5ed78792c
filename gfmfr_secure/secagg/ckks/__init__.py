"""CKKS homomorphic aggregation of float vectors, with explicit key custody.

Every client encrypts its update vector ``x_i`` [D] under one CKKS key; the
aggregator adds the ciphertexts without being able to decrypt them; the key
holder decrypts only the sum (optionally adding Gaussian noise before it
releases it). Only additions are performed: no multiplication, rescaling,
relinearisation or rotation, which is what makes a very short modulus chain
possible.

Roles and data flow
-------------------
``KeyHolder``
    Creates the TenSEAL context (secret key included). Hands out
    :meth:`KeyHolder.public_context_bytes` (no secret key) to the aggregator and
    :meth:`KeyHolder.client_context_bytes` to clients, and builds the
    :class:`Decryptor`.
``Encryptor`` (client)
    Packs ``x`` [D] into ``ceil(D / slots)`` ciphertexts and returns them as a
    list of bytes, one element per ciphertext.
``CKKSAggregator`` (server)
    Built from public context bytes only (it refuses a context that holds a
    secret key). Deserialises and validates every upload, adds it to a running
    encrypted sum and returns the encrypted sum as a list of bytes.
``Decryptor`` (key holder)
    Decrypts the encrypted sum to float64 [D], floods every value with Gaussian
    noise (below: an exact decryption reveals the key) and, through a passed-in
    callable, adds DP noise before release (the hook central DP uses, so that nobody but the
    decryptor ever sees a noiseless sum).

Key custody and what collusion reveals
--------------------------------------
``custody="authority"`` (asymmetric encryption)
    A key authority, separate from the aggregator, holds the secret key and
    decrypts. Clients and the aggregator only get the public key.

    * The aggregator alone sees IND-CPA ciphertexts: nothing but their sizes.
    * The authority alone sees only what it is asked to decrypt. If the aggregator
      is honest that is the sum over the cohort.
    * **Authority + aggregator collusion decrypts individual uploads**: the
      aggregator forwards any single client's ciphertexts. A *malicious*
      aggregator can achieve the same without the authority's knowledge by
      submitting one client's upload as "the sum": nothing here proves that the
      encrypted sum contains every upload. The setting is semi-honest.
    * The authority can decrypt any upload it gets hold of, so uploads must
      reach the aggregator over channels the authority cannot read.
    * Clients colluding with the aggregator learn nothing beyond the released
      aggregate (minus their own inputs), as with any sum.
    * The authority sees the noiseless sum; everyone else gets what it releases.
``custody="shared-clients"`` (symmetric encryption)
    A secret key generated once (by a designated client or a set-up ceremony) is
    shared by all clients; any client can decrypt the sum. There is no separate
    authority to trust, but:

    * **Any single client colluding with the aggregator decrypts every client's
      upload** (and so does any client that can observe uploads on the network
      without transport encryption). With n = 943 clients, one compromised
      client suffices.
    * The aggregator alone still learns nothing.
    * The client that decrypts sees the noiseless sum; the others get what it
      releases and must trust it to add the noise.

Threshold decryption (no single party holding the whole key) would remove the
single decryptor from both modes; TenSEAL does not offer it, so it is not
implemented here.

Parameters and security
-----------------------
:class:`CKKSParams` rejects any ring degree N / total modulus ``log2(q)`` pair
above the HomomorphicEncryption.org standard's 128-bit classical-security
limits for ternary secrets (``HE_STANDARD_MAX_LOG_Q``: 1024:27, 2048:54,
4096:109, 8192:218, 16384:438, 32768:881); SEAL enforces the same table.

Two ways to place values in a ciphertext (``PACKING``):

* **slots** (wire formats ``tenseal``, ``seeded``): CKKS's canonical encoding,
  ``N / 2`` real values per ciphertext. The error of one value is a sum over
  all N coefficients of the error polynomial, ``sqrt(N / 2)`` times larger
  than a coefficient's.
* **coefficients** (wire format ``packed``, the backend's): value ``j`` of a
  chunk is coefficient ``j`` of the plaintext polynomial, ``round(Delta x_j)``:
  N values per ciphertext, every coefficient used. Additions act on
  coefficients, which is all aggregation needs. SEAL's encoder is reused: the
  client evaluates its chunk as a polynomial at SEAL's slot roots
  (:func:`coefficients_to_slots`, one FFT), and encoding those slot values
  gives back the polynomial; the decryptor inverts it after decoding
  (:func:`slots_to_coefficients`).

The backend's parameters (:func:`gfmfr_secure.aggregation.ckks.ckks_params_for`
with ``packing="coefficients"``): ``N = 8192``, data primes of 60 and 20 bits and a
45-bit special prime, 125 bits in all. The HomomorphicEncryption.org table allows
218 bits at N = 8192 for 128-bit security and 152 for 192-bit, so these parameters
meet 192-bit security. The scale is the largest the 80-bit data modulus holds:
``Delta = 2**66`` for 943 summands of ``|x| <= 8``. Then:

* **Bytes**: a fresh ciphertext is sent at the data primes only (the special
  prime lives in the public key): two polynomials of N words per prime, each
  prime's words in the bytes it needs (:mod:`.words`: 8 + 3), 22 bytes per value
  under public-key encryption (5.5x float32; SEAL's zstd-compressed form was 22.9).
  At N = 4096 the standard allows 109
  bits: one 60-bit data prime and a 49-bit special prime send 16.1 bytes per value,
  but hold ``Delta = 2**46`` only, whose flooding noise (below) is a million times
  larger. The slot parameters below send 34 + 34-bit primes for N / 2 values:
  ~40 bytes per value.
* **Capacity**: a sum of n vectors with ``|x| <= B`` has coefficients up to
  ``Delta * n * B``, which must stay below ``q_data / 2`` or the sum wraps
  around (:attr:`CKKSParams.capacity`, checked on construction;
  :class:`CKKSAggregator` refuses more than ``max_summands`` uploads; the
  decryptor checks the flooding noise fits too).
* **Precision**: per value and ciphertext, the public-key error has variance
  ``(1 + ||s||^2) / 12 <= (1 + N) / 12`` (the rounding when the ciphertext
  drops the special prime, ``r0 + r1 s``), the symmetric error SEAL's fresh
  error, variance 10.5; independent ciphertexts add in variance
  (:meth:`CKKSParams.error_std`).

Slot parameters (wire formats ``tenseal`` and ``seeded``; the ``default``
preset): ``N = 4096``, ``(34, 34, 41)``, ``Delta = 2**56``, ``|x| <= 1``, 1000
summands. The public-key error of slot k is ``~N / (6 Delta)``, proportional to
``|s(zeta_k)|`` (the key at that slot's root of unity), so a few slots are ~3x
noisier than average in every ciphertext; symmetric: ``~3.2 sqrt(N / 2) / Delta``.

Releasing decryptions: noise flooding
-------------------------------------
CKKS decryption is approximate: the decrypted phase is ``m + e`` with an error
``e`` that depends on the secret key. Whoever holds the ciphertext and receives
the exact decryption turns it back into ``c0 + c1 s = Delta m + e`` (one value
per coefficient: multiply by Delta and round; slots: re-encode the real parts,
which gives ``p + conj(p)``), a linear system in ``s`` modulo ``q0``: one
``packed`` ciphertext or two slot ciphertexts under one key solve it (Li and
Micciancio, Eurocrypt 2021; ``tests/security/test_ckks_key_recovery.py`` and
``test_ckks_packed_key_recovery.py`` run the attack). Every value
:class:`Decryptor` releases therefore carries Gaussian *flooding* noise of std
``sigma_flood`` (:meth:`CKKSParams.flooding_std`), drawn from a 256-bit secret
key through ChaCha20 in float64:

* Let ``delta`` [D] be the key-dependent part of what is released: the
  lattice error (and, for slots, the floating-point error of decoding). Real
  release: ``m + delta + G``; ideal release, computable without the key:
  ``m + G``, ``G ~ N(0, sigma_flood^2 I_D)``. Their Kullback-Leibler divergence
  is ``||delta||^2 / (2 sigma_flood^2)`` (and at most that for the joint
  distribution with the ciphertexts, by convexity, whatever ``delta`` is).
* With ``sigma_flood >= 2^(lambda / 2) * B_delta / sqrt(2)`` for a bound
  ``||delta||_2 <= B_delta`` the divergence is at most ``2^-lambda``: the
  statistical distance is at most ``2^-(lambda + 1) / 2`` (Pinsker), and a
  search problem such as key recovery keeps ``lambda`` bits of security
  (Micciancio and Walter, Eurocrypt 2018; the same bound as Li, Micciancio,
  Schultz and Sorrell, Crypto 2022). ``lambda = STAT_SECURITY_BITS = 40``.
* Coefficients (``packed``): the decryptor adds the flooding as an integer
  polynomial ``F`` (coefficients ``round(N(0, (sigma_flood Delta)^2))``,
  through a plaintext) to the ciphertext *before* decrypting, so it decrypts
  ``Delta m + e + F`` and everything after (decoding in floating point) is
  post-processing, which cannot increase the divergence; shifting a rounded
  Gaussian by an integer ``e`` is no worse than shifting the Gaussian. Each
  coefficient of ``e`` is a sum over ``n_max = max_summands`` ciphertexts of
  independent terms of variance at most ``v = (1 + N) / 12`` (public key, any
  ternary key: ``||s||^2 <= N``; the fresh error divided by the special prime
  adds ~1e-20) or ``v = 10.5`` (symmetric), so ``E ||e||^2 <= D n_max v``.
  ``e`` is a linear image of independent bounded rounding errors, so by the
  Hanson-Wright inequality ``||e||^2`` exceeds four times that mean with
  probability ``exp(-c t)``, ``t ~ D ||s||^2 / (4 max_k |s(zeta_k)|^2)``, about
  7e3 at the backend's parameters for all but a fraction 1e-6 of keys
  (the key tail of the slot model). Hence ``B_delta = 2 sqrt(D n_max v) / Delta``.
  At the backend's parameters (943 summands, ``Delta = 2**66``, D = 579,850
  values) ``sigma_flood = 1.2e-8`` on each value of a sum; at N = 4096 with one
  60-bit data prime (``Delta = 2**46``) it would be 9.1e-3, enough to move the
  validation NDCG@10 of a default run by 2.1e-3 in two rounds. The noise fits the
  data modulus with room to spare: its ``10 sigma_flood`` is checked against the
  capacity.
* Slots (``tenseal``, ``seeded``; flooded after decoding, in float64):
  ``B_delta = sqrt(D) * (2 * error_std(n_max) + u_fp)``; the squared norm of D
  such values exceeds ``4 D`` times their variance with probability below
  ``exp(-0.8 D / 30)`` even when single slots are 30x noisier than average.
  ``u_fp = (log2 N + 2) 2^-53 n_max B`` bounds the per-value error of
  decoding in double precision (coefficients to double, then an N/2-point
  FFT). At ``(34, 34, 41)``, ``Delta = 2**53``, 1024 summands of ``|x| <= 8``
  and D = 579,850: ``sigma_flood = 9.9e-3``. A single 42-bit prime would need
  ``sigma_flood ~ 1e5``: useless, hence the second data prime there.
* Keys are fresh every round (:mod:`gfmfr_secure.aggregation.ckks`): D is one
  round's vector, and a key broken despite this opens one round only.

Wire formats
------------
``"tenseal"``
    Each ciphertext is a serialised one-ciphertext ``tenseal.CKKSVector``
    (slots). Under ``authority`` custody the clients encrypt with the public
    key; under ``shared-clients`` TenSEAL's symmetric mode is used.
``"seeded"`` (``shared-clients`` only; its default)
    Raw SEAL ciphertexts (slots) from ``Encryptor.encrypt_symmetric``, whose
    second polynomial is replaced by the seed of the PRNG that generated it:
    half the bytes.
``"packed"`` (either custody; the backend's)
    One value per coefficient. Under ``authority``, public-key ciphertexts sent
    as their words (:mod:`.words`): the aggregator checks each word against its
    prime and adds them mod q_i in numpy, without SEAL (0.1 against 0.4 ms per
    ciphertext loaded through SEAL), and the key holder rebuilds SEAL's
    serialisation of the sum and loads it with SEAL's checks. Under
    ``shared-clients``, raw SEAL ciphertexts, seeded symmetric.

The SEAL formats go through ``tenseal.sealapi``, whose ``save`` / ``load`` only
take file paths: the ciphertext bytes (never keys) pass through a private
temporary directory.

Simulating a round (:func:`encrypted_sum`): with ``workers > 1`` the clients are
split over forked processes, each of which also runs the server's ingestion
(validate and add, public context only) of its clients' uploads; the server
merges the partial encrypted sums (:meth:`CKKSAggregator.merge`). Clients encrypt
on their own machines in a deployment, so the per-client encryption time is the
figure that carries over; the simulation's wall time is what a benchmark on one
machine sees.

Options looked at and not used: one large ``CKKSVector`` holding all chunks
(same bytes; prints a warning and makes a malformed chunk impossible to name);
``ckks_tensor`` batching (same bytes, slower decryption); Python threads
(TenSEAL's and SEAL's bindings hold the GIL); a ring of N = 8192 (the same
bytes and time per value); a single data prime without a special prime (the
public-key error grows ~16x, so the flooding noise would too).

Randomness
----------
Encryption randomness comes from SEAL's system PRNG and cannot be seeded:
ciphertexts differ between runs, decrypted sums agree within
:meth:`CKKSParams.release_tolerance`. The flooding noise is drawn from a 32-byte
key: fresh from the operating system unless the caller passes one (the
``reproducible`` simulation mode derives it from the run seed, and then protects
nothing against whoever holds the seed). A ``seed`` drives the DP release noise
of :func:`encrypted_sum` only.

Limitations
-----------
No integrity: a ciphertext made under a different key with the *same*
parameters is indistinguishable from a valid one (it decrypts to garbage), and
nothing stops a client from encrypting values above ``max_abs_value`` with its
own code (the bound is checked by :class:`Encryptor` only); parameter, level,
scale, size and format mismatches are detected.

Layout
------
The package is split by role: :mod:`.primitives` (types, checks, coefficient packing,
noise), :mod:`.params` (:class:`CKKSParams`, the error model and the flooding bound),
:mod:`.messages` (serialised contexts and ciphertexts), :mod:`.client`
(:class:`Encryptor`), :mod:`.server` (:class:`CKKSAggregator`; it imports neither the
client nor the key holder), :mod:`.keyholder` (:class:`KeyHolder`, :class:`Decryptor`)
and :mod:`.driver` (:func:`encrypted_sum`, used by the ``ckks`` backend and the tests).
The names below are re-exported here and load their module on first use.
"""

from __future__ import annotations

from gfmfr_secure.secagg.exports import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "HE_STANDARD_MAX_LOG_Q": "params",
    "PRESETS": "params",
    "STAT_SECURITY_BITS": "params",
    "CKKSParams": "params",
    "PACKING": "primitives",
    "CKKSError": "primitives",
    "Custody": "primitives",
    "WireFormat": "primitives",
    "coefficients_to_slots": "primitives",
    "default_wire": "primitives",
    "flooding_noise": "primitives",
    "gaussian_noise": "primitives",
    "slots_to_coefficients": "primitives",
    "Encryptor": "client",
    "CKKSAggregator": "server",
    "KeyHolder": "keyholder",
    "Decryptor": "keyholder",
    "CKKSCost": "driver",
    "encrypted_sum": "driver",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
