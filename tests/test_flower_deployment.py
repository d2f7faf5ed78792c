"""Flower deployment on one machine: a SuperLink and SuperNodes on loopback, runs through ``flwr run``.

Every process is started by :class:`gfmfr_secure.flower.loopback.LoopbackDeployment`
inside a fixture whose finalizer ends them all, and every file goes under ``tmp_path``
(``FLWR_HOME``, logs, run config, outputs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from gfmfr_secure.flower.loopback import LoopbackDeployment, flower_commands_found, node_config_arg, stage_app  # noqa: E402

pytestmark = pytest.mark.skipif(not flower_commands_found(), reason="flower-superlink / flower-supernode / flwr not installed")

ECHO_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "echoapp"
version = "0.1.0"
description = "ArrayRecord round trip through a SuperLink"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "gfmfr-tests"

[tool.flwr.app.components]
serverapp = "echo.apps:server"
clientapp = "echo.apps:client"

[tool.flwr.app.config]
out = ""
nodes = 2
"""

ECHO_APPS = '''\
import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def reply(msg: Message, context: Context) -> Message:
    x = msg.content["a"]["x"].numpy()
    calls = int(context.state["c"]["calls"]) + 1 if "c" in context.state else 1
    context.state["c"] = ConfigRecord({"calls": calls})
    pid = int(context.node_config["partition-id"])
    out = RecordDict({"a": ArrayRecord({"y": Array(x * 2 + pid)}), "c": ConfigRecord({"pid": pid, "calls": calls})})
    return Message(out, reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["nodes"])
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    ids = sorted(grid.get_node_ids())
    rounds = []
    for r in range(2):
        x = np.arange(4, dtype=np.float64) + r
        msgs = [Message(RecordDict({"a": ArrayRecord({"x": Array(x)})}), dst_node_id=i, message_type="query",
                        group_id=f"echo-{r}") for i in ids]
        got = []
        for m in grid.send_and_receive(msgs, timeout=60):
            got.append({"pid": m.content["c"]["pid"], "calls": m.content["c"]["calls"],
                        "y": m.content["a"]["y"].numpy().tolist(), "x": x.tolist()})
        rounds.append(sorted(got, key=lambda g: g["pid"]))
    with open(context.run_config["out"], "w", encoding="utf-8") as f:
        json.dump({"nodes": len(ids), "rounds": rounds}, f)
'''


@pytest.fixture
def echo_app(tmp_path: Path) -> Path:
    app = tmp_path / "echoapp"
    (app / "echo").mkdir(parents=True)
    (app / "pyproject.toml").write_text(ECHO_PYPROJECT, encoding="utf-8")
    (app / "echo" / "__init__.py").write_text("", encoding="utf-8")
    (app / "echo" / "apps.py").write_text(ECHO_APPS, encoding="utf-8")
    return app


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[LoopbackDeployment]:
    deployment = LoopbackDeployment(
        tmp_path / "deploy", [{"partition-id": p, "num-partitions": 2} for p in range(2)]
    )
    try:
        yield deployment.start()
    finally:
        deployment.close()


def test_node_config_arg_quotes_strings() -> None:
    assert node_config_arg({"partition-id": 1, "data": "/a b/c", "x": 0.5, "on": True}) == (
        'partition-id=1 data="/a b/c" x=0.5 on=true'
    )


@pytest.mark.slow
def test_echo_arrays_through_loopback_superlink(two_nodes: LoopbackDeployment, echo_app: Path, tmp_path: Path) -> None:
    """A ServerApp sends an ArrayRecord to 2 SuperNodes twice; each ClientApp replies 2x + partition id.

    Also shows that ``Context.state`` survives between the ``flwr-clientapp`` processes of
    one node (the call counter reaches 2) and that the node config reaches the ClientApp.
    """
    out = tmp_path / "echo.json"
    run_id = two_nodes.submit(echo_app, {"out": str(out)})
    assert two_nodes.wait(run_id, timeout=90) == "finished:completed", two_nodes.log_text("superlink")[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["nodes"] == 2
    for r, replies in enumerate(result["rounds"]):
        assert [g["pid"] for g in replies] == [0, 1]
        assert [g["calls"] for g in replies] == [r + 1, r + 1]
        for g in replies:
            assert g["y"] == [2 * v + g["pid"] for v in g["x"]]
    assert list((tmp_path / "deploy" / "flwr-home" / "apps").iterdir()), "the FAB is unpacked under tmp_path"


# --------------------------------------------------------------------------- FedRAP under masking over loopback

REPO = Path(__file__).resolve().parent.parent
#: a slice of ML-100K-mm: 1 round of a 10% Poisson cohort (109 clients with seed 0: 62 on node 0, 47 on node 1), one
#: SecAgg round over the complete graph with t = ceil(0.55 * 109) = 60, so the 62 clients of node 0 can unmask alone
OVERRIDES = (
    "train.rounds=1 train.client_fraction=0.1 seed=0 aggregation.backend=masking train.weighting=uniform "
    "aggregation.neighbours=0 aggregation.threshold_fraction=0.55"
)


def _wait_for_line(deployment: LoopbackDeployment, log: str, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while needle not in deployment.log_text(log):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in {log}'s log after {timeout:.0f} s")
        time.sleep(0.2)


def _close(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.dataset
def test_masking_over_loopback_superlink_recovers_from_a_supernode_killed_mid_round(ml100k_dir: Path, tmp_path: Path) -> None:
    """FedRAP under ``aggregation.backend=masking`` through flower-superlink and 2 flower-supernode processes (users u % 2).

    Every cohort member is a SecAgg party on its node; the ServerApp relays the protocol.
    SuperNode 1 is SIGKILLed once it has received the request for its parties' masked
    uploads (after the key rounds). The round completes through dropout recovery: node 0's
    parties reveal the shares of node 1's parties' mask keys and the sum of node 0's
    uploads is released. The metrics equal, within 1e-6, the same apps in one process
    (LocalGrid) with node 1 silent from that step on; the record counts the parties, the
    survivors (node 0's cohort members) and the recovered parties (node 1's). The plain
    backend's equality with the in-process engine is checked over LocalGrid
    (tests/test_flower_apps.py), so this test runs one round.
    """
    from gfmfr_secure.config import load_config, resolve_data_path
    from gfmfr_secure.flower.localgrid import LocalGrid, task_identity
    from gfmfr_secure.flower.serverapp import run_server
    from gfmfr_secure.roles.server import sample_cohort
    from gfmfr_secure.simulation.runner import prepare_data

    app = stage_app(REPO, tmp_path / "app")
    nodes = [{"partition-id": p, "num-partitions": 2, "data": str(ml100k_dir)} for p in range(2)]
    run_config = {"config": "configs/fedrap.yaml", "overrides": OVERRIDES, "data": str(ml100k_dir), "out": str(tmp_path / "runs"),
                  "name": "flower", "min-nodes": 2, "wait-nodes": 60.0, "round-timeout": 40.0}
    deployment = LoopbackDeployment(tmp_path / "deploy", nodes)
    t0 = time.monotonic()
    try:
        deployment.start()
        run_id = deployment.submit(app, run_config)
        _wait_for_line(deployment, "supernode-1", f"[RUN {run_id}, ROUND sums-upload-0]", timeout=150)
        deployment.kill_node(1)
        # while the ServerApp waits out node 1's round-timeout: the reference, in this process
        cfg = resolve_data_path(load_config(REPO / "configs" / "fedrap.yaml", OVERRIDES.split()), str(ml100k_dir))
        _, split = prepare_data(cfg)
        local_config = {**run_config, "out": str(tmp_path / "local"), "name": "local"}
        with task_identity():
            local, local_dir = run_server(LocalGrid(local_config, nodes, tmp_path / "local-state", silent_from={"sums-upload-0": 101}), local_config)
        status = deployment.wait(run_id, timeout=120)
        assert status == "finished:completed", deployment.run_log(run_id)[-4000:]
    finally:
        deployment.close()
    print(f"loopback masking run with a killed SuperNode: {time.monotonic() - t0:.1f} s")
    got = json.loads((tmp_path / "runs" / "flower" / "metrics.json").read_text(encoding="utf-8"))
    history = json.loads((tmp_path / "runs" / "flower" / "history.json").read_text(encoding="utf-8"))
    local_history = json.loads((Path(local_dir) / "history.json").read_text(encoding="utf-8"))

    for mine, theirs in zip(history, local_history, strict=True):
        _close(mine["val"], theirs["val"])
    _close(got["test"], local["test"])

    # the record: node 1 dropped at the masked-upload step; its parties recovered, node 0's summed
    flower = got["flower"]
    assert flower["nodes"] == 2 and flower["nodes_at_end"] == 1 and len(flower["dropped_nodes"]) == 1
    members = sample_cohort(np.flatnonzero(split.train_counts() > 0), cfg.train.client_fraction, cfg.seed, 0)
    kept, lost = int((members % 2 == 0).sum()), int((members % 2 == 1).sum())
    steps = {e["kind"]: e for e in history[0]["flower"]}
    assert history[0]["cohort"] == members.size == steps["sums-share"]["clients_answered"]
    assert (steps["sums-upload"]["nodes_asked"], steps["sums-upload"]["nodes_answered"]) == (2, 1)
    assert (steps["sums-upload"]["clients_answered"], steps["sums-upload"]["clients_missing"]) == (kept, lost)
    reveal = steps["sums-reveal"]
    assert (reveal["parties"], reveal["survivors"], reveal["recovered"]) == (members.size, kept, lost)
    assert history[0]["cost"]["dropped"] == lost
    # the test ranks node 0's users only
    assert got["test"]["users"] == int(((split.test_items >= 0) & (np.arange(split.n_users) % 2 == 0)).sum())
