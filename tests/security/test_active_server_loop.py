"""The active-server attacks played through ``run_federated``, with the clients' checks wired in and bypassed.

1. an inconsistent broadcast (the target alone gets another model): the target refuses;
2. lying group counts after the count phase (masking and ckks): every client refuses the round;
4. a cohort of 2 without oblivious grouping: the floor releases nothing, and a server that
   ignores the floor meets the clients' round-parameter check.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from attacks.active.grouping import lying_counts
from gfmfr_secure.aggregation.base import Aggregator
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.roles import inprocess as transport
from gfmfr_secure.roles import server as server_role
from gfmfr_secure.roles.active import ActiveServer
from gfmfr_secure.simulation import loop
from gfmfr_secure.simulation.group_floor import count_phase

SMALL = [
    "train.rounds=2", "train.local_epochs=1", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=1", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "eval.ks=[5,10]", "train.patience=0", "train.selection=last", "aggregation.neighbours=8",
]
TARGET = 5


def _cfg(method: str, *extra: str):
    return with_overrides(config_from_dict({"method": method}), SMALL + list(extra))


@pytest.fixture(scope="module")
def split(tiny_synthetic):
    return leave_one_out(tiny_synthetic)


def _server_rounds(views) -> list[int]:
    return [v.round for v in views if v.observer == "server"]


# --------------------------------------------------------------------------- 1. inconsistent broadcast


def _crafted_for_target(real):
    """A server that sends the target (in round 1) a different item table from everyone else's."""

    def deliver(msg, cohort):
        sent, received = real(msg, cohort)
        if TARGET not in cohort:
            return sent, received
        crafted = dict(sent[0], item_table=sent[0]["item_table"] * 100.0)
        received = received.copy()
        received[np.flatnonzero(cohort == TARGET)] = 1
        return [sent[0], crafted], received

    return deliver


@pytest.mark.parametrize("backend", ["masking", "ckks"])
def test_target_refuses_an_inconsistent_broadcast_in_the_loop(tiny_synthetic, split, backend: str) -> None:
    """The target alone received another broadcast: no neighbour attests it, so the target neither trains
    nor uploads; with the check bypassed it takes part in every round."""
    cfg = _cfg("mm-fedrap", f"aggregation.backend={backend}", "grouping.method=none", "train.rounds=1")
    views = []
    with mock.patch.object(transport, "deliver_broadcast", _crafted_for_target(transport.deliver_broadcast)):
        run = loop.run_federated(cfg, tiny_synthetic, split, progress=False, callbacks=[views.append])
    assert run.history[0]["broadcast_refusals"] == 1 and run.metrics["privacy"]["client_checks"]["broadcast_refusals"] == 1
    server_view = next(v for v in views if v.observer == "server")
    assert TARGET not in server_view.truth["clients"] and server_view.meta["n_clients"] == len(server_view.truth["clients"])
    views.clear()
    with mock.patch.object(transport, "deliver_broadcast", _crafted_for_target(transport.deliver_broadcast)), mock.patch.object(
        transport, "broadcast_refusals", lambda received, graph, min_matching: np.zeros(len(received), dtype=bool)
    ):
        bypassed = loop.run_federated(cfg, tiny_synthetic, split, progress=False, callbacks=[views.append])
    assert "broadcast_refusals" not in bypassed.history[0]
    assert TARGET in next(v for v in views if v.observer == "server").truth["clients"]


def test_honest_broadcast_is_never_refused(tiny_synthetic, split) -> None:
    run = loop.run_federated(_cfg("gfmfr", "aggregation.backend=masking", "grouping.method=oblivious"), tiny_synthetic, split, progress=False)
    assert run.metrics["privacy"]["client_checks"] == {"refused_rounds": 0, "broadcast_refusals": 0}
    assert all("refused" not in rec and "broadcast_refusals" not in rec for rec in run.history)


# --------------------------------------------------------------------------- 2. lying counts


def _lying_count_phase(floor: int):
    """A server that reports every group's count as at least the floor, so that no group is merged."""
    def lie(*args, **kwargs):
        counts, cost = count_phase(*args, **kwargs)
        for g in range(counts.size):
            counts = lying_counts(counts, g, floor)
        return counts, cost

    return lie


@pytest.mark.parametrize("backend", ["masking", "ckks"])
def test_lying_counts_are_refused_in_the_loop(tiny_synthetic, split, backend: str) -> None:
    """A server reports every group's count as the floor of 40 (the cohort of 60 splits into 3 groups, each
    below 40): with the check bypassed no group is merged and sums of fewer than 40 clients are released;
    with the check on, every client refuses and nothing is released."""
    cfg = _cfg("gfmfr", f"aggregation.backend={backend}", "grouping.method=oblivious", "grouping.min_group_size=40", "train.rounds=1")
    honest = loop.run_federated(cfg, tiny_synthetic, split, progress=False)
    assert honest.history[0]["group_sizes"] == [60.0, 0.0, 0.0]  # every group below 40: merged into one
    views = []
    lied = loop.run_federated(
        cfg, tiny_synthetic, split, progress=False, callbacks=[views.append], active_server=ActiveServer(count_phase=_lying_count_phase(40), counts_checked=False)
    )
    counts = next(v for v in views if v.observer == "server").received["group_counts"].double().numpy()
    assert 0.5 < counts[0] < 40 - 0.5  # a group below the floor released: the lie worked
    assert lied.history[0]["group_sizes"][0] == pytest.approx(counts[0], abs=1e-3)
    views.clear()
    checked = loop.run_federated(cfg, tiny_synthetic, split, progress=False, callbacks=[views.append], active_server=ActiveServer(count_phase=_lying_count_phase(40)))
    assert checked.history[0]["skipped"] == "clients refused the round"
    assert "reported 40 clients in group 0" in checked.history[0]["refused"]
    assert _server_rounds(views) == [] and checked.metrics["privacy"]["client_checks"]["refused_rounds"] == 1


def test_a_transcript_without_a_clients_upload_is_refused(tiny_synthetic, split) -> None:
    """The server drops one upload from the count transcript it shows the clients: that client refuses."""
    cfg = _cfg("gfmfr", "aggregation.backend=masking", "grouping.method=oblivious", "train.rounds=1")
    real = transport.verify_count_evidence

    def tampered(evidence):
        sent = evidence.transcript
        return real(type(evidence)(**{**evidence.__dict__, "transcript": type(sent)(sent.adverts, sent.shares, sent.uploads[1:], sent.reveals)}))

    with mock.patch.object(transport, "verify_count_evidence", tampered):
        run = loop.run_federated(cfg, tiny_synthetic, split, progress=False)
    assert run.history[0]["skipped"] == "clients refused the round"
    assert "does not verify" in run.history[0]["refused"] or "own upload is not in the transcript" in run.history[0]["refused"]


# --------------------------------------------------------------------------- 4. cohort of 2


def _two_in_round_1():
    real = server_role.sample_cohort
    return lambda eligible, fraction, seed, t: np.array([TARGET, 6]) if t == 1 else real(eligible, fraction, seed, t)


@pytest.mark.parametrize("backend", ["masking", "ckks"])
def test_a_cohort_of_two_is_not_released_without_oblivious_grouping(tiny_synthetic, split, backend: str) -> None:
    """FedRAP under a secure backend: the floor now covers every secure sum (round 1 releases nothing);
    a server that ignores the floor meets the clients' check_round_parameters; with both bypassed the
    sum of the 2 clients is released."""
    cfg = _cfg("mm-fedrap", f"aggregation.backend={backend}", "grouping.method=none")
    views = []
    with mock.patch.object(server_role, "sample_cohort", _two_in_round_1()):
        run = loop.run_federated(cfg, tiny_synthetic, split, progress=False, callbacks=[views.append])
        assert run.history[1]["skipped"] == "cohort below grouping.min_group_size" and _server_rounds(views) == [0]
        views.clear()
        with mock.patch.object(server_role, "releasable", lambda n, counts, floor: True):  # the server ignores the floor
            run = loop.run_federated(cfg, tiny_synthetic, split, progress=False, callbacks=[views.append])
            assert "round of 2 clients" in run.history[1]["refused"] and _server_rounds(views) == [0]
            views.clear()
            with mock.patch.object(Aggregator, "check_clients_accept", lambda self, *a: None):
                loop.run_federated(cfg, tiny_synthetic, split, progress=False, callbacks=[views.append])
    assert [v.meta["n_clients"] for v in views if v.observer == "server" and v.round == 1] == [2]  # the attack without any check


def test_a_secure_run_with_fewer_eligible_clients_than_the_floor_is_refused(tiny_synthetic, split) -> None:
    cfg = _cfg("mm-fedrap", "aggregation.backend=masking", "grouping.method=none", "grouping.min_group_size=10")
    with pytest.raises(ConfigError, match="min_group_size=10 exceeds the 5 clients.*secure sum"):
        loop.run_federated(cfg, tiny_synthetic, split, progress=False, participants=np.arange(5))
