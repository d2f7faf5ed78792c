"""The ServerApp: the server role of a federated run over the SuperNodes of a Flower deployment.

It reads the run config (:mod:`gfmfr_secure.flower.runconfig`), waits for ``min-nodes``
SuperNodes, runs :class:`~gfmfr_secure.roles.server.FederatedServer` over
:class:`~gfmfr_secure.flower.transport.FlowerClients` and writes a run folder as
``gfmfr-secure train`` does: ``config.yaml``, ``run.json``, ``log.txt``,
``metrics.json``, ``history.json`` and ``curve.png`` (no ``model.pt``: the clients'
state stays on the SuperNodes). ``metrics.json`` and ``run.json`` gain a ``flower``
entry (nodes, dropped nodes, clients that answered each request); each round of
``history.json`` gains the per-request log of that round under ``flower``.

The server loop receives :class:`~gfmfr_secure.roles.server.ServerData` only (sizes and
item features). To build it the ServerApp reads the data folder named by the run config
(the item order and sizes must be those the nodes derive from the same folder); it uses
no interaction beyond that.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from gfmfr_secure.config import config_to_yaml
from gfmfr_secure.flower.loopback import DeploymentError
from gfmfr_secure.flower.runconfig import RunSettings, check_supported, experiment_config
from gfmfr_secure.flower.transport import FlowerClients
from gfmfr_secure.roles.server import FederatedServer, ServerData
from gfmfr_secure.runio import create_run, default_run_name, environment_info, utc_now

__all__ = ["app", "run_server", "server_data"]


def server_data(cfg: Any) -> ServerData:
    """Sizes and item features of ``cfg.data`` as the nodes index them (same loading and filtering)."""
    from gfmfr_secure.data import kcore, load_dataset, to_implicit

    dc = cfg.data
    data = load_dataset(dc.path, fmt=dc.format, text_features=dc.text_features, image_features=dc.image_features, duplicates=dc.duplicates)
    data = to_implicit(data, dc.implicit_threshold)
    if dc.kcore > 1:
        data = kcore(data, dc.kcore)
    return ServerData.of(data, data.n_users, data.n_items)


def wait_for_nodes(grid: Grid, want: int, seconds: float) -> list[int]:
    """The connected node ids once ``want`` are connected.

    Raises
    ------
    DeploymentError
        If fewer than ``want`` are connected after ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        if time.monotonic() > deadline:
            raise DeploymentError(f"{len(nodes)} SuperNodes connected after {seconds:g} s; the run config asks for min-nodes={want}")
        time.sleep(0.5)


def run_server(grid: Grid, run_config: dict[str, Any], run_id: int = 0) -> tuple[dict[str, Any], str]:
    """Run the configured experiment over ``grid``'s SuperNodes; returns (metrics, run folder)."""
    settings = RunSettings.of(run_config)
    cfg = experiment_config(run_config)
    check_supported(cfg)
    data = server_data(cfg)
    name = settings.name or default_run_name(cfg.method, cfg.seed)
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "method": cfg.method,
        "command": ["flwr", "run"],
        "flower": {"run_id": int(run_id), "run_config": {k: v for k, v in run_config.items()}},
        "started_at": utc_now().isoformat(),
        "finished_at": None,
        "environment": environment_info(),
    }
    with create_run(settings.out, name, console=True) as run:
        run.write_text("config.yaml", config_to_yaml(cfg))
        run.write_json("run.json", record)
        log = run.logger
        nodes = wait_for_nodes(grid, settings.min_nodes, settings.wait_nodes)
        log.info("run %s over Flower: %d SuperNodes, method=%s seed=%d", name, len(nodes), cfg.method, cfg.seed)
        clients = FlowerClients(grid, cfg, data.n_items, nodes=nodes, timeout=settings.round_timeout)
        server = FederatedServer(cfg, data, logger=log)
        server.run(clients, progress=False, label=name)
        metrics = server.finish(clients)
        by_round: dict[int, list[dict[str, Any]]] = {}
        for entry in clients.log:
            by_round.setdefault(int(entry["round"]), []).append(entry)
        for rec in server.history:
            rec["flower"] = by_round.get(int(rec["round"]), [])
        dropped = sorted({n for e in clients.log for n in e["dropped_nodes"]})
        metrics["flower"] = {
            "nodes": len(nodes),
            "nodes_at_end": len(clients.nodes),
            "dropped_nodes": dropped,
            "clients_hosted": {str(n): int(h.size) for n, h in sorted(clients.hosted.items())},
            "requests": len(clients.log),
            "seconds_waiting": round(sum(e["seconds"] for e in clients.log), 3),
        }
        for dropped_node in dropped:
            log.warning("SuperNode %d did not answer in time and was dropped; its %d users took no further part", dropped_node, int(clients.hosted[dropped_node].size) if dropped_node in clients.hosted else 0)
        run.write_json("history.json", server.history)
        run.write_json("metrics.json", metrics)
        from gfmfr_secure.curves import plot_learning_curve

        plot_learning_curve(server.history, run.path("curve.png"), best_round=metrics.get("best_round"), title=f"{cfg.method} over Flower, seed {cfg.seed}")
        record["finished_at"] = utc_now().isoformat()
        record["flower"]["nodes"] = metrics["flower"]
        run.write_json("run.json", record)
    return metrics, str(run.final_dir)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment the run config names and write its run folder under the run config's ``out``."""
    run_server(grid, dict(context.run_config), int(context.run_id))
