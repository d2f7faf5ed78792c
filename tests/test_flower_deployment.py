"""Flower deployment on one machine: a SuperLink and SuperNodes on loopback, runs through ``flwr run``.

Every process is started by :class:`gfmfr_secure.flower.loopback.LoopbackDeployment`
inside a fixture whose finalizer ends them all, and every file goes under ``tmp_path``
(``FLWR_HOME``, logs, run config, outputs).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from gfmfr_secure.flower.loopback import LoopbackDeployment, flower_commands_found, node_config_arg  # noqa: E402

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
