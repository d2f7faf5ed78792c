"""The ``ckks`` backend over the Flower apps (LocalGrid: the apps in one process).

Every cohort member with an upload encrypts it on the node hosting it, the ServerApp's
transport adds the ciphertexts under the round's public context, and the node with
partition-id 0 is the key holder: it makes each sum's keys, decrypts the sum once, floods it
and adds the central DP draw (:mod:`gfmfr_secure.flower.ckks_relay`,
:mod:`gfmfr_secure.roles.ckks_party`). Kept cheap as the in-process CKKS tests are: d = 8,
5-10% cohorts, one or two rounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("tenseal")

from flwr.app import Message  # noqa: E402

from flower_recording import RecordingGrid  # noqa: E402

from gfmfr_secure.flower.localgrid import LocalGrid, task_identity  # noqa: E402
from gfmfr_secure.flower.records import get_message  # noqa: E402
from gfmfr_secure.flower.runconfig import experiment_config  # noqa: E402
from gfmfr_secure.flower.serverapp import run_server  # noqa: E402
from gfmfr_secure.roles.messages import CKKSStep  # noqa: E402

#: FedRAP under ckks on a 5% cohort (43 clients), 2 rounds
_FEDRAP = "train.rounds=2 train.client_fraction=0.05 seed=3 model.latent_dim=8 aggregation.backend=ckks train.weighting=uniform secrets=reproducible"
#: GFMFR with oblivious grouping under ckks, one round on a 10% cohort: a count phase, the key holder's check of it, the sums
_GFMFR = (
    "train.rounds=1 model.latent_dim=8 fusion.server_epochs=1 train.client_fraction=0.1 seed=5 grouping.method=oblivious "
    "aggregation.backend=ckks train.weighting=uniform secrets=reproducible"
)
_DISTRIBUTED = " privacy.mechanism=distributed privacy.noise_multiplier=1.0 privacy.clip=0.05"
#: the key holder adds the central draw to the count phase and to the sums
_CENTRAL = " privacy.mechanism=central privacy.noise_multiplier=1.0 privacy.clip=0.05"


def _run(
    ml100k_dir: Path, tmp_path: Path, name: str, overrides: str, grid_cls: type[LocalGrid] = LocalGrid, config: str = "configs/fedrap.yaml",
) -> tuple[dict[str, Any], list[dict[str, Any]], LocalGrid]:
    rc = {"config": config, "overrides": overrides, "data": str(ml100k_dir), "out": str(tmp_path), "name": name, "min-nodes": 3}
    nodes = [{"partition-id": p, "num-partitions": 3, "data": str(ml100k_dir)} for p in range(3)]
    local = grid_cls(rc, nodes, tmp_path / f"state-{name}")
    with task_identity():
        metrics, folder = run_server(local, rc)
    return metrics, json.loads((Path(folder) / "history.json").read_text(encoding="utf-8")), local


@pytest.mark.slow
@pytest.mark.dataset
@pytest.mark.parametrize(
    ("config", "overrides", "steps"),
    [
        ("configs/fedrap.yaml", _FEDRAP, ["sums-keys", "sums-encrypt", "sums-decrypt"] * 2),
        ("configs/fedrap.yaml", _FEDRAP + _DISTRIBUTED, ["sums-keys", "sums-encrypt", "sums-decrypt"] * 2),
        ("configs/gfmfr.yaml", _GFMFR, ["count-keys", "count-encrypt", "count-decrypt", "count-check", "sums-keys", "sums-encrypt", "sums-decrypt"]),
        ("configs/gfmfr.yaml", _GFMFR + _CENTRAL, ["count-keys", "count-encrypt", "count-decrypt", "count-check", "sums-keys", "sums-encrypt", "sums-decrypt"]),
    ],
    ids=["fedrap", "fedrap-distributed-dp", "gfmfr-oblivious", "gfmfr-oblivious-central-dp"],
)
def test_ckks_over_three_nodes_gives_the_in_process_metrics(ml100k_dir: Path, tmp_path: Path, config: str, overrides: str, steps: list[str]) -> None:
    """Val and test metrics of ``run_federated`` within 1e-6 (measured: equal).

    Under ``secrets=reproducible`` the key holder derives the flooding key and the central
    draws as the in-process backend does, and the clients their noise shares; what differs is
    the encryption error (SEAL's encryption cannot be seeded), far below the flooding noise.
    The key holder is asked for the keys, the decryption and the count check only; every
    party's upload is in the sum.
    """
    from gfmfr_secure.simulation.loop import run_federated
    from gfmfr_secure.simulation.runner import prepare_data

    metrics, history, grid = _run(ml100k_dir, tmp_path, "ckks", overrides, config=config)
    cfg = experiment_config({"config": config, "overrides": overrides, "data": str(ml100k_dir)})
    data, split = prepare_data(cfg)
    expected = run_federated(cfg, data, split, progress=False)
    for which in ("val", "test"):
        assert metrics[which].keys() == expected.metrics[which].keys()
        assert max(abs(metrics[which][k] - expected.metrics[which][k]) for k in metrics[which]) <= 1e-6, which
    holder = min(grid.contexts)  # LocalGrid numbers the nodes in partition order: partition 0 first
    calls = [(node, group.rsplit("-", 1)[0]) for node, kind, group in grid.calls if kind == "query.ckks"]
    to_holder = [(node, g) for node, g in calls if not g.endswith("encrypt")]
    assert [g for _, g in to_holder] == [g for g in steps if not g.endswith("encrypt")] and {node for node, _ in to_holder} == {holder}
    assert "query.aggregate" not in [kind for _, kind, _ in grid.calls]
    assert [e["kind"] for rec in history for e in rec["flower"] if e["kind"] not in ("train", "evaluate")] == steps
    for rec in history:
        assert "refused" not in rec
        [decrypt] = [e for e in rec["flower"] if e["kind"] == "sums-decrypt"]
        [encrypt] = [e for e in rec["flower"] if e["kind"] == "sums-encrypt"]
        assert decrypt["parties"] == decrypt["survivors"] == encrypt["clients_answered"] > 0
        assert 0 < rec["cost"]["flooding_std"] < 1e-6


class _Recorder(RecordingGrid):
    """LocalGrid that keeps every ckks step the server received."""

    message_type = "query.ckks"
    step_cls = CKKSStep


@pytest.mark.slow
@pytest.mark.dataset
def test_the_server_side_never_holds_the_secret_key(ml100k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets from the OS, oblivious grouping (two sums a round). The secret key of each sum is in no message the
    server received; the contexts it received hold no secret key and cannot decrypt; the ciphertexts it added decrypt
    (with the key holder's key, kept aside by the test) to the release within its flooding noise; and the key holder
    forgets each key after its one decryption."""
    from gfmfr_secure.flower.clientapp import CKKS, read_records, state_path
    from gfmfr_secure.roles.ckks_party import KeyRound
    from gfmfr_secure.secagg.ckks import CKKSAggregator, CKKSError, Decryptor
    from gfmfr_secure.secagg.ckks.keyholder import KeyHolder
    from gfmfr_secure.secagg.ckks.messages import Scratch, load_context

    secrets: list[bytes] = []
    original = KeyHolder.secret_context_bytes

    def kept_aside(self: KeyHolder) -> bytes:
        data = original(self)
        secrets.append(data)
        return data

    monkeypatch.setattr(KeyHolder, "secret_context_bytes", kept_aside)
    _, _, grid = _run(ml100k_dir, tmp_path, "spy", _GFMFR.replace("secrets=reproducible", "secrets=os"), grid_cls=_Recorder, config="configs/gfmfr.yaml")
    received = grid.received
    keys = [s for s in received if s.step == "keys"]
    assert len(keys) == len(secrets) == 2  # fresh keys for the count phase and for the sums
    wire = b"".join(s.blobs.tobytes() + (b"" if s.released is None else s.released.tobytes()) for s in received)
    scratch = Scratch()
    try:
        for secret, step in zip(secrets, keys, strict=True):
            key = scratch.save(load_context(secret, 1, "secret context").secret_key().data)
            assert len(key) > 1000 and key not in wire and key[len(key) // 2 : len(key) // 2 + 64] not in wire
            [[public]] = step.messages().values()
            assert not load_context(public, 1, "public context").is_private()
            with pytest.raises(CKKSError, match="secret key"):
                Decryptor(public, step.ckks_params(), int(step.dim), wire="packed")
            # what the server added: every party's ciphertexts of this sum, as it received them
            uploads = [s for s in received if s.step == "encrypt" and s.phase == step.phase]
            server = CKKSAggregator(public, step.ckks_params(), int(step.dim), wire="packed")
            for s in uploads:
                for _, upload in sorted(s.messages().items()):
                    server.add(upload)
            [release] = [s for s in received if s.step == "decrypt" and s.phase == step.phase]
            exact = Decryptor(secret, step.ckks_params(), int(step.dim), wire="packed").decrypt(server.result())
            server.close()
            assert server.n_added == step.n_parties
            assert np.max(np.abs(exact - release.released)) < 12 * release.flooding_std
    finally:
        scratch.close()
    states = {node: read_records(state_path(context)) for node, context in grid.contexts.items()}
    holder = min(states)
    assert all(f"{CKKS}.config" not in state.config_records for node, state in states.items() if node != holder)
    kept = get_message(states[holder], CKKS, KeyRound)
    assert kept.secret.size == 0 and kept.phase == "sums" and kept.released is not None


@pytest.mark.slow
@pytest.mark.dataset
def test_the_key_holder_refuses_group_counts_its_release_does_not_give(ml100k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server reporting one more client in group 0 than the key holder released: the key holder's node refuses,
    and the round releases nothing (recorded as refused)."""
    from gfmfr_secure.flower import ckks_relay

    honest = ckks_relay.relay_ckks_count_check

    def lying(exchange: Any, msg: Any, out: Any, counts: np.ndarray, holder: int) -> str:
        return honest(exchange, msg, out, counts + np.eye(counts.size)[0], holder)

    monkeypatch.setattr(ckks_relay, "relay_ckks_count_check", lying)
    _, history, grid = _run(ml100k_dir, tmp_path, "liar", _GFMFR, config="configs/gfmfr.yaml")
    [rec] = history
    assert "refusing to upload: the server reported" in rec["refused"] and rec["skipped"] == "clients refused the round"
    assert [g for _, kind, g in grid.calls if kind == "query.ckks"].count("count-check-0") == 1
    assert not any(g.startswith("sums-") for _, _, g in grid.calls)


def test_the_server_side_relay_loads_neither_the_key_holder_nor_the_client_role() -> None:
    """Importing the ServerApp's ckks relay (and its transport) loads no module that could make keys, decrypt or encrypt."""
    import subprocess
    import sys

    forbidden = {"gfmfr_secure.secagg.ckks.keyholder", "gfmfr_secure.secagg.ckks.client", "gfmfr_secure.secagg.ckks.driver", "gfmfr_secure.roles.ckks_party"}
    code = "import sys, gfmfr_secure.flower.ckks_relay, gfmfr_secure.flower.transport; print(sorted(m for m in sys.modules if m.startswith('gfmfr_secure.')))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120).stdout
    assert "'gfmfr_secure.secagg.ckks.server'" in loaded  # the import did reach the aggregator's module
    assert not any(f"'{m}'" in loaded for m in forbidden), loaded


@pytest.mark.slow
@pytest.mark.dataset
def test_the_key_holder_decrypts_once_under_a_key_and_only_it_decrypts(ml100k_dir: Path, tmp_path: Path) -> None:
    """After a round, a server sending one party's ciphertexts as "the sum" to the key holder is refused (the key was used
    for the round's release and forgotten); a decrypt step sent to another node is refused too."""
    from flwr.app import RecordDict

    from gfmfr_secure.flower.records import put_message

    _, _, grid = _run(ml100k_dir, tmp_path, "replay", _FEDRAP.replace("train.rounds=2", "train.rounds=1"), grid_cls=_Recorder)
    encrypt = next(s for s in grid.received if s.step == "encrypt" and s.owners.size)
    party, upload = next(iter(encrypt.messages().items()))
    assert party >= 0 and len(upload) >= 1
    holder, other = sorted(grid.contexts)[:2]
    for node, match in ((holder, "decrypts once under a key"), (other, "not the key holder")):
        content = RecordDict()
        put_message(content, "request", encrypt.answer("decrypt", [0] * len(upload), upload, n_summands=1))
        with task_identity():
            [reply] = grid.send_and_receive([Message(content, dst_node_id=node, message_type="query.ckks", group_id="replay")])
        assert reply.has_error() and match in reply.error.reason, node


@pytest.mark.slow
@pytest.mark.dataset
def test_a_node_silent_before_encrypting_is_left_out_and_a_silent_key_holder_stops_the_run(ml100k_dir: Path, tmp_path: Path) -> None:
    """Node 102 stops answering at round 1's encrypt step: the sum of the other nodes' uploads is released, and the metrics
    equal a run in which node 102 stopped before round 1's training (within 1e-6). The key holder silent at the decrypt
    step: the run stops with a DeploymentError naming it."""
    from gfmfr_secure.flower.loopback import DeploymentError

    metrics, history, _ = _run_silent(ml100k_dir, tmp_path, "dropped", {"sums-encrypt-1": 102})
    reference, _, _ = _run_silent(ml100k_dir, tmp_path, "gone", {"train-1": 102})
    for which in ("val", "test"):
        assert max(abs(metrics[which][k] - reference[which][k]) for k in metrics[which]) <= 1e-6, which
    assert metrics["flower"]["dropped_nodes"] == [102]
    steps = {e["kind"]: e for e in history[1]["flower"]}
    assert steps["sums-encrypt"]["dropped_nodes"] == [102] and steps["sums-encrypt"]["clients_missing"] > 0
    decrypt = steps["sums-decrypt"]
    assert decrypt["parties"] - decrypt["survivors"] == steps["sums-encrypt"]["clients_missing"]
    with pytest.raises(DeploymentError, match="key holder's node 100 did not answer the decrypt step"):
        _run_silent(ml100k_dir, tmp_path, "holder", {"sums-decrypt-0": 100})


@pytest.mark.slow
@pytest.mark.dataset
def test_under_distributed_dp_a_sum_missing_a_nodes_parties_is_not_released(ml100k_dir: Path, tmp_path: Path) -> None:
    """The noise shares were sized for every party: without node 102's the sum would carry less noise than accounted."""
    from gfmfr_secure.errors import ConfigError

    with pytest.raises(ConfigError, match="less noise than accounted"):
        _run_silent(ml100k_dir, tmp_path, "short", {"sums-encrypt-0": 102}, _FEDRAP + _DISTRIBUTED)


def _run_silent(
    ml100k_dir: Path, tmp_path: Path, name: str, silent_from: dict[str, int], overrides: str = _FEDRAP,
) -> tuple[dict[str, Any], list[dict[str, Any]], LocalGrid]:
    """:func:`_run` of FedRAP under ckks (2 rounds) with nodes falling silent (LocalGrid's ``silent_from``)."""

    class Silent(LocalGrid):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args, silent_from=silent_from)

    return _run(ml100k_dir, tmp_path, name, overrides, grid_cls=Silent)
