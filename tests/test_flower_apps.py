"""The ClientApp and ServerApp in one process: a Grid that calls the ClientApp directly.

Each message builds the node from its ``Context`` as a fresh ``flwr-clientapp`` process
would (state only through ``Context.state``), so these tests check the apps' logic, the
records and the state kept between messages without starting Flower's processes (the
loopback deployment test does that).
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Message, RecordDict  # noqa: E402

from gfmfr_secure.errors import ConfigError  # noqa: E402
from gfmfr_secure.flower.localgrid import LocalGrid, task_identity  # noqa: E402
from gfmfr_secure.flower.records import get_message, partition_users, put_message  # noqa: E402
from gfmfr_secure.flower.runconfig import RunSettings, check_supported, experiment_config  # noqa: E402
from gfmfr_secure.flower.serverapp import run_server  # noqa: E402
from gfmfr_secure.roles.messages import Hello  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _nodes(n: int, data: Path) -> list[dict[str, Any]]:
    return [{"partition-id": p, "num-partitions": n, "data": str(data)} for p in range(n)]


def test_partition_users_is_user_id_mod_partitions() -> None:
    parts = [partition_users(10, p, 3) for p in range(3)]
    assert [p.tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    for bad in ((0, 0), (3, 3), (-1, 2)):
        with pytest.raises(ConfigError):
            partition_users(10, *bad)


def test_messages_round_trip_through_records() -> None:
    hello = Hello(np.arange(3), np.arange(2), np.array([1], dtype=np.int64), np.zeros(0, dtype=np.int64))
    back = get_message(put_message(RecordDict(), "reply", hello), "reply", Hello)
    for key in ("hosted", "trainable", "val_users", "test_users"):
        assert np.array_equal(getattr(back, key), getattr(hello, key)) and getattr(back, key).dtype == np.int64


def test_run_config_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="'config' is empty"):
        RunSettings.of({"config": ""})
    with pytest.raises(ConfigError, match="round-timeout"):
        RunSettings.of({"config": "configs/fedrap.yaml", "round-timeout": 0.0})
    with pytest.raises(ConfigError, match="overrides"):
        RunSettings.of({"config": "configs/fedrap.yaml", "overrides": "seed='1"})
    with pytest.raises(ConfigError, match="does not exist"):
        experiment_config({"config": "configs/no-such.yaml"}, data=str(REPO))


@pytest.mark.parametrize(
    ("config", "overrides", "match"),
    [
        ("configs/fedrap.yaml", "aggregation.backend=ckks aggregation.custody=shared-clients train.weighting=uniform", "custody=authority"),
        ("configs/fedrap.yaml", "aggregation.backend=masking train.weighting=uniform aggregation.dropout=0.1", "aggregation.dropout=0"),
    ],
    ids=["ckks-shared-clients", "masking-simulated-dropout"],
)
def test_secure_settings_flower_does_not_carry_are_refused_by_name(ml100k_dir: Path, config: str, overrides: str, match: str) -> None:
    cfg = experiment_config({"config": config, "overrides": overrides}, data=str(ml100k_dir))
    with pytest.raises(ConfigError, match=match):
        check_supported(cfg)
    for backend in ("masking", "ckks"):
        check_supported(experiment_config({"config": "configs/fedrap.yaml", "overrides": f"aggregation.backend={backend} train.weighting=uniform"}, data=str(ml100k_dir)))


def _flower_and_in_process(ml100k_dir: Path, tmp_path: Path, config: str, overrides: str, n_nodes: int) -> tuple[dict[str, Any], str, Any, LocalGrid]:
    """The same run over ``n_nodes`` LocalGrid nodes and in process: (Flower metrics, its run folder, the in-process ``FederatedRun``, the grid)."""
    from gfmfr_secure.simulation.loop import run_federated
    from gfmfr_secure.simulation.runner import prepare_data

    rc = {"config": config, "overrides": overrides, "data": str(ml100k_dir), "out": str(tmp_path), "name": "run", "min-nodes": n_nodes}
    grid = LocalGrid(rc, _nodes(n_nodes, ml100k_dir), tmp_path / "state")
    with task_identity():
        metrics, folder = run_server(grid, rc)
    cfg = experiment_config(rc)
    data, split = prepare_data(cfg)
    expected = run_federated(cfg, data, split, progress=False)
    for which in ("val", "test"):
        assert set(metrics[which]) == set(expected.metrics[which])
        worst = max(abs(metrics[which][k] - expected.metrics[which][k]) for k in expected.metrics[which])
        assert worst <= 1e-6, (which, worst)
    return metrics, folder, expected, grid


#: GFMFR made small for speed (d=16, one fusion epoch, 30% cohorts, 2 rounds)
_SMALL_GFMFR = "train.rounds=2 model.latent_dim=16 fusion.server_epochs=1 train.client_fraction=0.3 seed=5"
#: a fixed noise multiplier (no calibration in every ClientApp call) and noise that follows from the seed
_SMALL_DP = _SMALL_GFMFR + " secrets=reproducible privacy.noise_multiplier=1.0"


@pytest.mark.slow
@pytest.mark.dataset
@pytest.mark.parametrize(
    ("config", "overrides", "nodes_sum"),
    [
        ("configs/gfmfr.yaml", _SMALL_GFMFR + " grouping.method=oblivious", True),  # the count phase goes to the nodes
        ("configs/gfmfr.yaml", _SMALL_GFMFR, False),  # the paper's spectral grouping by the server
        ("configs/privacy/eps-8.yaml", _SMALL_DP, False),  # central DP, oblivious: count phase and sums released by the server
        ("configs/privacy/eps-8.yaml", _SMALL_DP + " grouping.method=spectral", False),  # central DP noised by the server
        ("configs/privacy/eps-8.yaml", _SMALL_DP + " privacy.mechanism=local", True),  # the clients' shares are summed on the nodes
        ("configs/privacy/eps-8.yaml", _SMALL_DP + " privacy.mechanism=local grouping.method=spectral", True),  # shares placed in the server's groups
        ("configs/privacy/eps-8.yaml", _SMALL_DP + " privacy.mechanism=distributed", True),  # shares sized for every node's uploads
    ],
    ids=["gfmfr-oblivious", "gfmfr-spectral", "central-oblivious", "central-spectral", "local-oblivious", "local-spectral", "distributed-oblivious"],
)
def test_gfmfr_and_user_level_dp_give_the_in_process_metrics(ml100k_dir: Path, tmp_path: Path, config: str, overrides: str, nodes_sum: bool) -> None:
    """GFMFR and the central, local and distributed DP mechanisms over 3 partitions: val and test metrics of ``run_federated`` within 1e-6."""
    *_, grid = _flower_and_in_process(ml100k_dir, tmp_path, config, overrides, 3)
    assert ("query.aggregate" in {kind for _, kind, _ in grid.calls}) == nodes_sum


@pytest.mark.slow
@pytest.mark.dataset
def test_dpsgd_gives_the_in_process_metrics_and_epsilon_and_each_node_keeps_its_clients_events(ml100k_dir: Path, tmp_path: Path) -> None:
    """Record-level DP-SGD over 2 nodes: metrics within 1e-6 and the per-client epsilons of ``run_federated`` exactly; each
    node's state file holds every round's accountant event of its clients, whose composed epsilons give the reported ones."""
    from gfmfr_secure.client.dpsgd import compose_client_epsilon
    from gfmfr_secure.flower.clientapp import DPSGD, read_records, state_path

    overrides = "train.rounds=2 model.latent_dim=8 train.client_fraction=0.04 seed=5 secrets=reproducible train.weighting=uniform fusion.server_epochs=1 " \
        "privacy.mechanism=dpsgd privacy.dpsgd_noise_multiplier=1.0 privacy.dpsgd_batch_size=64"
    metrics, folder, expected, grid = _flower_and_in_process(ml100k_dir, tmp_path, "configs/privacy/eps-8.yaml", overrides, 2)
    ours, theirs = metrics["privacy"], expected.metrics["privacy"]
    assert ours["mechanism"] == "dpsgd" and ours["epsilon_if_covered"] > 0
    for key in ("epsilon", "epsilon_if_covered", "epsilon_median_client", "rounds"):
        assert ours[key] == theirs[key], key
    history = json.loads((Path(folder) / "history.json").read_text(encoding="utf-8"))
    events: dict[int, list[tuple[float, float, int]]] = {}
    for node, context in grid.contexts.items():
        record = read_records(state_path(context)).array_records[DPSGD]
        for c, (sigma, q, steps) in zip(record["clients"].numpy().tolist(), record["events"].numpy().tolist(), strict=True):
            assert c % 2 == node - 100  # a node keeps its own clients' events only
            events.setdefault(c, []).append((sigma, q, int(steps)))
    assert sum(len(h) for h in events.values()) == sum(h["cohort"] for h in history)
    assert max(len(h) for h in events.values()) == 2  # clients in both rounds' cohorts kept round 0's event on their node
    eps = sorted(compose_client_epsilon(h, float(expected.metrics["privacy"]["delta"]), ours["accountant"]) for h in events.values())
    assert eps[-1] == ours["epsilon_if_covered"] and float(np.median(eps)) == ours["epsilon_median_client"]


@pytest.mark.slow
@pytest.mark.dataset
@pytest.mark.parametrize("grouping", ["oblivious", "spectral"])
def test_central_dp_with_adaptive_clipping_gives_the_in_process_clip_and_ledger(ml100k_dir: Path, tmp_path: Path, grouping: str) -> None:
    """Central DP with adaptive clipping over 3 nodes: the nodes' clipped-count queries reach the server with their uploads,
    and it noises them as in process; every round's clip and epsilon, the ledger and the metrics equal ``run_federated``'s
    (metrics within 1e-6)."""
    overrides = _SMALL_DP + f" train.rounds=3 privacy.adaptive_clip=true privacy.clip_lr=0.5 grouping.method={grouping}"
    metrics, folder, expected, grid = _flower_and_in_process(ml100k_dir, tmp_path, "configs/privacy/eps-8.yaml", overrides, 3)
    history = json.loads((Path(folder) / "history.json").read_text(encoding="utf-8"))
    clips = [h["dp"]["clip"] for h in history]
    assert clips == [h["dp"]["clip"] for h in expected.history]
    assert len(set(clips)) == len(clips)  # the clip moved every round
    assert [h["dp"]["epsilon"] for h in history] == [h["dp"]["epsilon"] for h in expected.history]
    ours, theirs = metrics["privacy"], expected.metrics["privacy"]
    assert ours["adaptive_clip"] and ours["ledger"] == theirs["ledger"]
    for key in ("epsilon", "epsilon_if_covered", "clip_final", "noise_multiplier"):
        assert ours[key] == theirs[key], key
    assert "query.aggregate" not in {kind for _, kind, _ in grid.calls}  # the server released the sums itself


@pytest.mark.slow
@pytest.mark.dataset
def test_three_nodes_give_the_in_process_metrics_and_a_silent_node_is_dropped(ml100k_dir: Path, tmp_path: Path) -> None:
    """3 partitions, state only through Context.state: the in-process run's numbers exactly; then a node that
    stops answering in round 1 is dropped and the run finishes with the other nodes' clients."""
    from gfmfr_secure.simulation.loop import run_federated
    from gfmfr_secure.simulation.runner import prepare_data

    overrides = "train.rounds=2 train.client_fraction=0.2 seed=5"
    rc = {"config": "configs/fedrap.yaml", "overrides": overrides, "data": str(ml100k_dir), "out": str(tmp_path), "name": "three", "min-nodes": 3}
    grid = LocalGrid(rc, _nodes(3, ml100k_dir), tmp_path / "state")
    with task_identity():
        metrics, folder = run_server(grid, rc)
    cfg = experiment_config(rc)
    data, split = prepare_data(cfg)
    expected = run_federated(cfg, data, split, progress=False)
    assert metrics["test"] == expected.metrics["test"]
    assert metrics["val"] == expected.metrics["val"]
    history = json.loads((Path(folder) / "history.json").read_text(encoding="utf-8"))
    assert [h["loss"] for h in history] == [h["loss"] for h in expected.history]
    for name in ("config.yaml", "run.json", "metrics.json", "curve.png"):
        assert (Path(folder) / name).is_file()
    # plain sums are computed from the uploads the server holds: per round a train and a val evaluate, no sum request
    kinds = [kind for _, kind, _ in grid.calls]
    assert "query.aggregate" not in kinds and kinds.count("train") == 3 * 2

    rc = {**rc, "name": "silent"}
    silent = LocalGrid(rc, _nodes(3, ml100k_dir), tmp_path / "state-silent", silent_from={"train-1": 102})
    with task_identity():
        metrics, folder = run_server(silent, rc)
    assert metrics["flower"]["dropped_nodes"] == [102] and metrics["flower"]["nodes_at_end"] == 2
    history = json.loads((Path(folder) / "history.json").read_text(encoding="utf-8"))
    [train] = [e for e in history[1]["flower"] if e["kind"] == "train"]
    assert train["clients_answered"] + train["clients_missing"] == int(expected.history[1]["cohort"])
    assert train["nodes_answered"] == 2 and train["dropped_nodes"] == [102]
    hosted_by_2 = partition_users(split.n_users, 2, 3)
    assert metrics["test"]["users"] == int((split.test_items[np.setdiff1d(np.arange(split.n_users), hosted_by_2)] >= 0).sum())


def test_the_serverapp_imports_no_client_state() -> None:
    """Importing the ServerApp and its transport loads no module holding client state or data (nor the ClientApp)."""
    import subprocess
    import sys

    code = "import sys, gfmfr_secure.flower.serverapp, gfmfr_secure.flower.transport; print('\\n'.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    forbidden = {
        "gfmfr_secure.client.state", "gfmfr_secure.client.cohort", "gfmfr_secure.client.kernel", "gfmfr_secure.client.dpsgd",
        "gfmfr_secure.client.local", "gfmfr_secure.data.negatives", "gfmfr_secure.data.split", "gfmfr_secure.data",
        "gfmfr_secure.roles.client", "gfmfr_secure.roles.inprocess", "gfmfr_secure.flower.clientapp",
    }
    assert "gfmfr_secure.flower.serverapp" in loaded
    assert not loaded & forbidden, sorted(loaded & forbidden)


@pytest.mark.slow
@pytest.mark.dataset
def test_a_node_whose_kept_state_was_lost_fails_the_run_by_name(ml100k_dir: Path, tmp_path: Path) -> None:
    """A node left with its state from before a message (the state of that message lost) must not train or score on
    it: the next request's sequence number does not follow the state's, the ClientApp refuses and the run stops."""
    from gfmfr_secure.flower.clientapp import state_path
    from gfmfr_secure.flower.loopback import DeploymentError

    class LosesState(LocalGrid):
        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            messages = list(messages)
            path = state_path(self.contexts[101])
            before = path.read_bytes() if path.is_file() else None
            replies = super().send_and_receive(messages, timeout=timeout)
            if before is not None and any(m.metadata.group_id == "train-0" for m in messages):
                path.write_bytes(before)  # node 101 is left with its state from before round 0's training
            return replies

    rc = {"config": "configs/fedrap.yaml", "overrides": "train.rounds=1 train.client_fraction=0.1", "data": str(ml100k_dir), "out": str(tmp_path), "name": "lost"}
    with task_identity(), pytest.raises(DeploymentError, match="holds the clients' state after request 0, but this is request 2"):
        run_server(LosesState(rc, _nodes(2, ml100k_dir), tmp_path / "state"), rc)
