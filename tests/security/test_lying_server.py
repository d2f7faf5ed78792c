"""The lying server: it claims a client dropped to half the holders and survived to the other half.

From the first half it collects shares of the client's mask key s_u^SK (as if u had dropped),
from the second shares of its self-mask seed b_u (as if it had survived). With both secrets it
strips every mask from u's upload. Honest clients never reveal both kinds for one client, so
the two halves are disjoint; with t > |N[u]| / 2 neither half reaches t.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.secagg.masking import primitives as masking
from gfmfr_secure.secagg.fixedpoint import decode_sum
from gfmfr_secure.secagg.masking import (
    KeyAdvert,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    ShareReveal,
    UnmaskRequest,
    neighbourhood_graph,
)
from gfmfr_secure.secagg.shamir import Share, int_to_secret, reconstruct_secret

HEADER = 16 + 32
N, DIM, VICTIM = 6, 64, 0


def _round(threshold: int):
    """Key rounds and masked uploads of N honest clients (OS secrets); what the server holds."""
    config = SecAggConfig.create(N, DIM, threshold=threshold, value_bound=1.0)
    graph = neighbourhood_graph(N, None, seed=0)
    clients = [SecAggClient(u, config, graph, secrets.token_bytes(32)) for u in range(N)]
    pki = {u: c.identity_public_key for u, c in enumerate(clients)}
    server = SecAggServer(config, graph, pki)
    adverts = [c.advertise_keys() for c in clients]
    routed = server.collect_adverts(adverts)
    shares = server.route_shares([m for u, c in enumerate(clients) for m in c.share_keys(routed[u], pki)])
    for u, c in enumerate(clients):
        c.receive_shares(shares.get(u, []))
    x = np.random.default_rng(1).uniform(-1, 1, size=(N, DIM)).astype(np.float32)
    uploads = [c.masked_upload(x[u]) for u, c in enumerate(clients)]
    for up in uploads:
        server.receive_upload(up)
    return config, clients, uploads, {KeyAdvert.from_bytes(a).client: KeyAdvert.from_bytes(a) for a in adverts}, x


def _lying_server_attack(config, clients, uploads, adverts, b_half, s_half):
    """Ask ``b_half`` for the victim's self-mask share and ``s_half`` for its mask-key share.

    Returns the recovered input of the victim, or raises what the clients / Shamir raise.
    """
    survivors = tuple(range(N))
    b_shares, s_shares = [], []
    for v in b_half:  # "the victim survived"
        reveal = ShareReveal.from_bytes(clients[v].reveal_shares(UnmaskRequest(config.round_id, v, survivors, ()).to_bytes()))
        b_shares += [Share(v + 1, y) for owner, y in reveal.self_mask_shares if owner == VICTIM]
    for v in s_half:  # "the victim dropped"
        others = tuple(w for w in survivors if w != VICTIM)
        reveal = ShareReveal.from_bytes(clients[v].reveal_shares(UnmaskRequest(config.round_id, v, others, (VICTIM,)).to_bytes()))
        s_shares += [Share(v + 1, y) for owner, y in reveal.mask_key_shares if owner == VICTIM]
    t = config.threshold
    seed_b = int_to_secret(reconstruct_secret(b_shares, t))
    mask_key = X25519PrivateKey.from_private_bytes(int_to_secret(reconstruct_secret(s_shares, t)))
    y = np.frombuffer(uploads[VICTIM], dtype="<u4", count=DIM, offset=HEADER).copy()
    y -= masking.prg_mask(seed_b, DIM)
    for v in range(N):
        if v == VICTIM:
            continue
        pair = masking.derive_pair_seed(mask_key, X25519PublicKey.from_public_bytes(adverts[v].mask_public), config.round_id, VICTIM, v)
        mask = masking.prg_mask(pair, DIM)
        y = y - mask if v > VICTIM else y + mask
    return decode_sum(y, frac_bits=config.frac_bits)


def test_attack_unmasks_a_client_when_t_is_half(monkeypatch) -> None:
    """The insecure setting (t = n/2, accepted before) falls to the attack: it is not vacuous."""

    def without_majority(self, graph):  # the check as it was: only t <= |N[u]|
        if self.threshold > graph.neighbourhood_size:
            raise ValueError("threshold too large")

    monkeypatch.setattr(SecAggConfig, "check_graph", without_majority)
    config, clients, uploads, adverts, x = _round(threshold=N // 2)
    recovered = _lying_server_attack(config, clients, uploads, adverts, b_half=(0, 1, 2), s_half=(3, 4, 5))
    assert np.abs(recovered - x[VICTIM]).max() <= 2.0 ** -config.frac_bits


def test_attack_fails_with_a_strict_majority() -> None:
    config, clients, uploads, adverts, _ = _round(threshold=N // 2 + 1)
    # Any split of the holders leaves one half below t = 4: Shamir refuses with 3 shares.
    with pytest.raises(ValueError, match="3 shares available, 4 required"):
        _lying_server_attack(config, clients, uploads, adverts, b_half=(0, 1, 2), s_half=(3, 4, 5))


def test_honest_clients_never_reveal_both_kinds_for_one_client() -> None:
    """Asking the same holder for the other kind of share afterwards is refused, in either order."""
    config, clients, _, _, _ = _round(threshold=N // 2 + 1)
    everyone = tuple(range(N))
    others = tuple(w for w in everyone if w != VICTIM)
    clients[1].reveal_shares(UnmaskRequest(config.round_id, 1, everyone, ()).to_bytes())
    with pytest.raises(SecAggError, match=f"refuses to reveal the mask-key share of client {VICTIM}"):
        clients[1].reveal_shares(UnmaskRequest(config.round_id, 1, others, (VICTIM,)).to_bytes())
    clients[2].reveal_shares(UnmaskRequest(config.round_id, 2, others, (VICTIM,)).to_bytes())
    with pytest.raises(SecAggError, match=f"refuses to reveal the self-mask share of client {VICTIM}"):
        clients[2].reveal_shares(UnmaskRequest(config.round_id, 2, everyone, ()).to_bytes())
    with pytest.raises(SecAggError, match="listed both as survivors and as dropped"):
        clients[3].reveal_shares(UnmaskRequest(config.round_id, 3, everyone, (VICTIM,)).to_bytes())


def test_minority_thresholds_are_refused_everywhere() -> None:
    graph = neighbourhood_graph(N, None, seed=0)
    config = SecAggConfig.create(N, DIM, threshold=N // 2, value_bound=1.0)
    with pytest.raises(ValueError, match="not a strict majority"):
        SecAggClient(0, config, graph, bytes(32))  # an honest client will not take part
    with pytest.raises(ValueError, match="not a strict majority"):
        SecAggServer(config, graph, {})
    k_graph = neighbourhood_graph(30, 6, seed=0)  # SecAgg+: |N[u]| = 7, so t >= 4
    with pytest.raises(ValueError, match="use t >= 4"):
        SecAggConfig.create(30, DIM, threshold=3, value_bound=1.0).check_graph(k_graph)
    with pytest.raises(ConfigError, match=r"aggregation.threshold_fraction: must be in \(0.5, 1\], a strict majority"):
        with_overrides(config_from_dict({}), ["aggregation.threshold_fraction=0.5"])
    with_overrides(config_from_dict({}), ["aggregation.threshold_fraction=0.51"])
