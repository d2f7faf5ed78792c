"""The ``masking`` backend and distributed DP over the Flower apps (LocalGrid: the apps in one process).

Every cohort member with an upload is its own SecAgg+ party on the node hosting it; the
ServerApp's transport plays the SecAgg server and relays the protocol's messages between
the nodes (:mod:`gfmfr_secure.flower.relay`, :mod:`gfmfr_secure.roles.secagg_party`). The
sums are exact fixed-point sums, so the metrics equal the in-process engine's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flower_recording import RecordingGrid  # noqa: E402

from gfmfr_secure.flower.localgrid import LocalGrid, task_identity  # noqa: E402
from gfmfr_secure.flower.records import get_message  # noqa: E402
from gfmfr_secure.flower.runconfig import experiment_config  # noqa: E402
from gfmfr_secure.flower.serverapp import run_server  # noqa: E402
from gfmfr_secure.roles.messages import SecAggStep  # noqa: E402
from gfmfr_secure.secagg.fixedpoint import centre  # noqa: E402
from gfmfr_secure.secagg.masking import SecAggClient, SecAggError, SecAggServer, neighbourhood_graph, secure_sum  # noqa: E402
from gfmfr_secure.secagg.masking.params import SecAggConfig  # noqa: E402

#: FedRAP under masking on a 10% cohort, 2 rounds; every pair of parties shares a mask (complete graph)
_MASKING = "train.rounds=2 train.client_fraction=0.1 seed=3 aggregation.backend=masking train.weighting=uniform aggregation.neighbours=0 secrets=reproducible"
#: GFMFR with oblivious grouping made small (d=16, one fusion epoch, 30% cohorts, 2 rounds) under masking
_GFMFR = (
    "train.rounds=2 model.latent_dim=16 fusion.server_epochs=1 train.client_fraction=0.3 seed=5 grouping.method=oblivious "
    "aggregation.backend=masking train.weighting=uniform secrets=reproducible"
)
#: plus distributed DP with a fixed noise multiplier (no calibration in every ClientApp call)
_DISTRIBUTED = " privacy.mechanism=distributed privacy.noise_multiplier=1.0 privacy.clip=0.05"


def _nodes(n: int, data: Path) -> list[dict[str, Any]]:
    return [{"partition-id": p, "num-partitions": n, "data": str(data)} for p in range(n)]


def _run(
    ml100k_dir: Path, tmp_path: Path, name: str, overrides: str, grid_cls: type[LocalGrid] = LocalGrid, config: str = "configs/fedrap.yaml", **grid: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]], LocalGrid]:
    rc = {"config": config, "overrides": overrides, "data": str(ml100k_dir), "out": str(tmp_path), "name": name, "min-nodes": 3}
    local = grid_cls(rc, _nodes(3, ml100k_dir), tmp_path / f"state-{name}", **grid)
    with task_identity():
        metrics, folder = run_server(local, rc)
    return metrics, json.loads((Path(folder) / "history.json").read_text(encoding="utf-8")), local


def _worst(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


def test_a_party_resumed_from_its_exported_state_at_every_step_gives_the_driver_sum() -> None:
    """Every SecAggClient leaves and re-enters between the protocol's steps (a process per message): the sum is unchanged."""
    n, dim, seed = 6, 5, 11
    x = np.random.default_rng(0).uniform(-1, 1, size=(n, dim)).astype(np.float32)
    config = SecAggConfig.create(n, dim, threshold=4, value_bound=8.0, round_id=2)
    graph = neighbourhood_graph(n, None, seed)

    def again(c: SecAggClient) -> SecAggClient:
        return SecAggClient.resume(config, graph, c.export_state())

    clients = [SecAggClient(u, config, graph, bytes([u + 1]) * 32) for u in range(n)]
    server = SecAggServer(config, graph, {u: c.identity_public_key for u, c in enumerate(clients)})
    routed = server.collect_adverts([c.advertise_keys() for c in clients])
    clients = [again(c) for c in clients]
    pki = {u: c.identity_public_key for u, c in enumerate(clients)}
    routed = server.route_shares([m for u, c in enumerate(clients) for m in c.share_keys(routed[u], pki)])
    clients = [again(c) for c in clients]
    for u in range(n - 1):  # the last party drops after sharing its keys
        clients[u].receive_shares(routed[u])
        server.receive_upload(clients[u].masked_upload(x[u]))
    clients = [again(c) for c in clients]
    requests = server.unmask_requests()
    reveals = [clients[v].reveal_shares(r) for v, r in requests.items()]
    with pytest.raises(SecAggError, match="refuses to reveal the mask-key share"):  # what a party revealed is kept too
        again(clients[0]).reveal_shares(_flipped(requests[0]))
    expected = secure_sum(x, value_bound=8.0, threshold=4, neighbours=None, seed=seed, dropped=[n - 1], round_id=2)
    assert np.array_equal(centre(server.finish(reveals)), expected.fixed_total)


def _flipped(request: bytes) -> bytes:
    """``request`` with one listed survivor (not the recipient) moved to the dropped list: a lying server."""
    from gfmfr_secure.secagg.masking.messages import UnmaskRequest

    honest = UnmaskRequest.from_bytes(request)
    liar = next(w for w in honest.survivors if w != honest.recipient)
    return UnmaskRequest(honest.round_id, honest.recipient, tuple(w for w in honest.survivors if w != liar), (*honest.dropped, liar)).to_bytes()


@pytest.mark.slow
@pytest.mark.dataset
@pytest.mark.parametrize(
    ("config", "overrides", "steps"),
    [
        ("configs/fedrap.yaml", _MASKING, 4),
        ("configs/fedrap.yaml", _MASKING + _DISTRIBUTED, 4),
        ("configs/gfmfr.yaml", _GFMFR, 4 + 5),  # the count phase: 4 steps and the clients' check of the counts
        ("configs/gfmfr.yaml", _GFMFR + _DISTRIBUTED, 4 + 5),
    ],
    ids=["fedrap", "fedrap-distributed-dp", "gfmfr-oblivious", "gfmfr-oblivious-distributed-dp"],
)
def test_masking_over_three_nodes_gives_the_in_process_metrics(ml100k_dir: Path, tmp_path: Path, config: str, overrides: str, steps: int) -> None:
    """One SecAgg+ round per sum among the parties of 3 nodes: val and test metrics of ``run_federated`` within 1e-6.

    The released sums are exact fixed-point sums of the same uploads (with distributed DP: the same
    noise shares, each sized for every party of the round), so the metrics agree to the float. Under
    oblivious grouping the count phase is a SecAgg round as well, and its counts pass the clients' check.
    """
    from gfmfr_secure.simulation.loop import run_federated
    from gfmfr_secure.simulation.runner import prepare_data

    metrics, history, grid = _run(ml100k_dir, tmp_path, "masking", overrides, config=config)
    cfg = experiment_config({"config": config, "overrides": overrides, "data": str(ml100k_dir)})
    data, split = prepare_data(cfg)
    expected = run_federated(cfg, data, split, progress=False)
    for which in ("val", "test"):
        assert _worst(metrics[which], expected.metrics[which]) <= 1e-6, which
    kinds = [kind for _, kind, _ in grid.calls]
    assert "query.aggregate" not in kinds and kinds.count("query.secagg") == 2 * steps * 3  # 2 rounds x steps x 3 nodes
    for rec in history:
        assert "refused" not in rec
        [reveal] = [e for e in rec["flower"] if e["kind"] == "sums-reveal"]
        assert reveal["parties"] == reveal["survivors"] == reveal["clients_answered"] and reveal["recovered"] == 0


@pytest.mark.slow
@pytest.mark.dataset
def test_a_node_silent_after_the_key_rounds_is_recovered_and_the_history_counts_the_survivors(ml100k_dir: Path, tmp_path: Path) -> None:
    """Node 102 shares its parties' keys in round 1, then never uploads: the survivors reveal the shares of its
    parties' mask keys and the sum is released. It is the sum of the survivors' uploads: the metrics equal a run
    in which node 102 stopped before round 1's training (within 1e-6)."""
    metrics, history, _ = _run(ml100k_dir, tmp_path, "recovered", _MASKING, silent_from={"sums-upload-1": 102})
    reference, _, _ = _run(ml100k_dir, tmp_path, "gone", _MASKING, silent_from={"train-1": 102})
    for which in ("val", "test"):
        assert _worst(metrics[which], reference[which]) <= 1e-6, which
    assert metrics["flower"]["dropped_nodes"] == [102] and metrics["flower"]["nodes_at_end"] == 2
    steps = {e["kind"]: e for e in history[1]["flower"]}
    parties = steps["sums-advertise"]["clients_answered"]
    missing = steps["sums-upload"]["clients_missing"]
    assert steps["sums-share"]["clients_answered"] == parties and missing > 0
    assert steps["sums-upload"]["dropped_nodes"] == [102]
    reveal = steps["sums-reveal"]
    assert (reveal["parties"], reveal["survivors"], reveal["recovered"]) == (parties, parties - missing, missing)
    assert history[1]["cost"]["dropped"] == missing


class _Recorder(RecordingGrid):
    """LocalGrid that keeps every secure-sum step the server received."""

    message_type = "query.secagg"
    step_cls = SecAggStep


@pytest.mark.slow
@pytest.mark.dataset
def test_the_server_receives_neither_a_plain_upload_nor_a_party_secret(ml100k_dir: Path, tmp_path: Path) -> None:
    """Secrets from the OS: every masked upload the server received differs from the party's fixed-point upload in
    almost every word, and no party secret seed kept on the nodes appears in any message the server received."""
    from gfmfr_secure.aggregation.layout import dense_uploads
    from gfmfr_secure.flower.clientapp import SECAGG, PENDING, read_records, state_path
    from gfmfr_secure.privacy.release import ReleaseLayout
    from gfmfr_secure.roles.messages import Upload
    from gfmfr_secure.roles.secagg_party import PartyRound
    from gfmfr_secure.secagg.fixedpoint import encode
    from gfmfr_secure.secagg.masking.messages import MaskedUpload

    overrides = _MASKING.replace("train.rounds=2", "train.rounds=1").replace("secrets=reproducible", "secrets=os")
    _, _, grid = _run(ml100k_dir, tmp_path, "spy", overrides, grid_cls=_Recorder)
    received = grid.received
    wire = b"".join(s.blobs.tobytes() + s.keys.tobytes() for s in received)
    uploads = {}
    for step in (s for s in received if s.step == "upload"):
        for party, [blob] in step.messages().items():
            uploads[party] = np.frombuffer(MaskedUpload.from_bytes(blob, step.dim).payload, dtype="<u4")
    step = received[0]
    config = SecAggConfig.create(step.n_parties, step.dim, threshold=step.threshold, value_bound=step.value_bound, round_id=step.round_id)
    checked = 0
    for context in grid.contexts.values():
        state = read_records(state_path(context))
        kept, upload = get_message(state, SECAGG, PartyRound), get_message(state, PENDING, Upload).as_update()
        d, head = int(upload.item_delta.shape[1]), 0 if upload.head_delta is None else int(upload.head_delta.shape[1])
        dense = dense_uploads(upload, ReleaseLayout(1, (step.dim - head - 1) // d, d, head, 1.0), None)  # one block [I*d | H | count]
        data = kept.states.tobytes()
        for i, (party, user) in enumerate(zip(kept.parties.tolist(), kept.users.tolist(), strict=True)):
            secret = data[int(kept.offsets[i]) + 25 : int(kept.offsets[i]) + 57]  # the seed follows the 25-byte header
            assert secret not in wire
            plain = encode(dense[int(np.searchsorted(upload.clients, user))], frac_bits=config.frac_bits, value_bound=config.value_bound, client=party)
            assert np.mean(uploads[party] == plain) < 0.01, party
            checked += 1
    assert checked == step.n_parties == len(uploads)


@pytest.mark.slow
@pytest.mark.dataset
def test_the_nodes_refuse_group_counts_their_transcript_does_not_give(ml100k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server reporting one more client in group 0 than the count phase summed: every node's parties replay the
    transcript, refuse, and the round releases nothing (recorded as refused)."""
    from gfmfr_secure.flower import relay

    honest = relay.relay_count_check

    def lying(exchange: Any, msg: Any, out: Any, counts: np.ndarray, nodes: list[int]) -> str:
        return honest(exchange, msg, out, counts + np.eye(counts.size)[0], nodes)

    monkeypatch.setattr(relay, "relay_count_check", lying)
    _, history, grid = _run(ml100k_dir, tmp_path, "liar", _GFMFR.replace("train.rounds=2", "train.rounds=1"), config="configs/gfmfr.yaml")
    [rec] = history
    assert "refusing to upload: the server reported" in rec["refused"] and rec["skipped"] == "clients refused the round"
    assert [g for _, kind, g in grid.calls if kind == "query.secagg"].count("count-check-0") == 3
    assert not any(g.startswith("sums-") for _, _, g in grid.calls)
