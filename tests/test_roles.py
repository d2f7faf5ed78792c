"""Client and server as separate roles: messages, partition invariance, the server's imports."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out, make_synthetic, sample_training
from gfmfr_secure.roles.client import ClientNode
from gfmfr_secure.roles.inprocess import InProcessClients
from gfmfr_secure.roles.messages import Broadcast, EvalReply, MessageError, SumReply, Upload, merge_uploads
from gfmfr_secure.roles.server import FederatedServer, ServerData
from gfmfr_secure.roles.transport import Clients
from gfmfr_secure.rng import numpy_rng
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.types import LocalHyper

HYPER = LocalHyper(0.05, 0.5, 1e-4, 0.1, 0.01, 0.3, 0.9, 10.0, 32, 2, 12345, scorer="dot", lr_user=0.2)


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return type(a) is type(b) and (a == b or (isinstance(a, float) and np.isnan(a) and np.isnan(b)))


def _floats(dtype: str, shape: st.SearchStrategy) -> st.SearchStrategy:
    return hnp.arrays(dtype, shape, elements=st.floats(allow_nan=True, allow_infinity=True, width=32 if dtype == "float32" else 64))


@st.composite
def uploads(draw: st.DrawFn, ids: st.SearchStrategy | None = None) -> Upload:
    clients = draw(ids or hnp.arrays("int64", st.integers(0, 6), elements=st.integers(0, 10**6), unique=True))
    n = clients.size
    counts = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=np.int64)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    r, d, h = int(row_ptr[-1]), draw(st.integers(1, 3)), draw(st.integers(0, 4))
    head = draw(st.booleans())
    return Upload(
        clients=clients, n_samples=draw(hnp.arrays("int64", n, elements=st.integers(0, 1000))), row_ptr=row_ptr,
        row_items=draw(hnp.arrays("int64", r, elements=st.integers(0, 50))), item_delta=draw(_floats("float32", (r, d))),
        head_delta=draw(_floats("float32", (n, h))) if head else None, head_after=None,
        group=draw(hnp.arrays("int64", n, elements=st.integers(-1, 4))), loss=draw(_floats("float64", n)),
        dpsgd=draw(_floats("float64", (n, 3))) if draw(st.booleans()) else None, refused=draw(st.integers(0, 5)), round=draw(st.integers(0, 99)),
    )


@settings(max_examples=60, deadline=None)
@given(uploads())
def test_an_upload_round_trips_through_bytes_exactly(up: Upload) -> None:
    assert _same(Upload.from_bytes(up.to_bytes()), up)
    arrays, config = up.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values()) and all(isinstance(v, int | float | str | bool) for v in config.values())
    assert _same(Upload.from_arrays(arrays, config), up)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 10**6), hnp.arrays("int64", st.integers(0, 5), elements=st.integers(0, 999), unique=True),
    _floats("float32", (3, 2)), st.booleans(), st.floats(allow_nan=False), st.text(max_size=5),
)
def test_broadcast_and_sum_reply_round_trip(round_idx: int, cohort: np.ndarray, table: np.ndarray, teacher: bool, clip: float, cost: str) -> None:
    msg = Broadcast(round_idx, np.sort(cohort), table, table[0], table if teacher else None, None, cohort if teacher else None, HYPER, clip, 1.5, 7)
    assert _same(Broadcast.from_bytes(msg.to_bytes()), msg)
    reply = SumReply(round_idx, "sums", cost, 3, clip, table, None, table[:, 0], None, None, table if teacher else None, 0.5, cost)
    assert _same(SumReply.from_bytes(reply.to_bytes()), reply)


def test_a_message_of_another_kind_or_dtype_is_refused() -> None:
    up = Upload.empty(2, 0)
    with pytest.raises(MessageError, match="expected a Broadcast"):
        Broadcast.from_bytes(up.to_bytes())
    arrays, config = up.to_arrays()
    with pytest.raises(MessageError, match="clients must be int64"):
        Upload.from_arrays({**arrays, "clients": arrays["clients"].astype(np.int32)}, config)
    with pytest.raises(MessageError, match="not a EvalReply message"):
        EvalReply.from_bytes(b"not an archive")


@settings(max_examples=60, deadline=None)
@given(uploads(), st.data())
def test_merged_parts_of_an_upload_are_the_upload_in_client_order(up: Upload, data: st.DataObject) -> None:
    """Split an upload between two nodes any way: merging gives the uploads ordered by client id."""
    side = np.array(data.draw(st.lists(st.booleans(), min_size=len(up), max_size=len(up))), dtype=bool)

    def part(mask: np.ndarray) -> Upload:
        idx = np.flatnonzero(mask)
        rows = np.concatenate([np.arange(up.row_ptr[i], up.row_ptr[i + 1]) for i in idx]).astype(np.int64) if idx.size else np.zeros(0, dtype=np.int64)
        sub = lambda a: None if a is None else a[idx]  # noqa: E731
        return Upload(up.clients[idx], up.n_samples[idx], np.concatenate([[0], np.cumsum(np.diff(up.row_ptr)[idx])]).astype(np.int64), up.row_items[rows],
                      up.item_delta[rows], sub(up.head_delta), None, up.group[idx], up.loss[idx], sub(up.dpsgd), 0, up.round)

    merged = merge_uploads([part(side), part(~side)])
    order = np.argsort(up.clients, kind="stable")
    assert _same(merged, merge_uploads([part(np.ones(len(up), dtype=bool)), part(np.zeros(len(up), dtype=bool))]))
    assert np.array_equal(merged.clients, up.clients[order]) and np.array_equal(np.diff(merged.row_ptr), np.diff(up.row_ptr)[order])
    for j, i in enumerate(order):
        a, b = merged.row_ptr[j], merged.row_ptr[j + 1]
        assert np.array_equal(merged.row_items[a:b], up.row_items[up.row_ptr[i] : up.row_ptr[i + 1]])
        assert merged.item_delta[a:b].tobytes() == up.item_delta[up.row_ptr[i] : up.row_ptr[i + 1]].tobytes()


@pytest.fixture(scope="module")
def split():
    return leave_one_out(make_synthetic(40, 30, n_groups=3, mean_interactions=10, seed=5))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 4), st.booleans(), st.data())
def test_negatives_of_a_subset_of_users_are_their_rows_of_all(split, seed: int, n_neg: int, heldout: bool, data: st.DataObject) -> None:
    users = np.flatnonzero(split.train_counts() > 0)
    subset = np.array(sorted(data.draw(st.sets(st.sampled_from(users.tolist()), max_size=12))), dtype=np.int64)
    everyone = sample_training(split, n_neg, numpy_rng(seed, "negatives", 3), users=users, exclude_heldout=heldout)
    some = sample_training(split, n_neg, numpy_rng(seed, "negatives", 3), users=subset, exclude_heldout=heldout)
    for u in subset:
        a, b = everyone.indptr[u], everyone.indptr[u + 1]
        c, e = some.indptr[u], some.indptr[u + 1]
        assert np.array_equal(everyone.items[a:b], some.items[c:e]) and np.array_equal(everyone.labels[a:b], some.labels[c:e])


SMALL = [
    "train.rounds=3", "train.local_epochs=1", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=1", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "eval.ks=[5,10]", "train.patience=0", "secrets=reproducible", "train.client_fraction=0.8",
]


def _two_nodes(cfg, split) -> tuple[Clients, list[ClientNode]]:
    users = np.arange(split.n_users, dtype=np.int64)
    nodes = [ClientNode(cfg, split, users[users % 2 == 0]), ClientNode(cfg, split, users[users % 2 == 1])]
    return InProcessClients(cfg, nodes), nodes


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("gfmfr", []),
        ("mm-fedrap", ["grouping.method=none"]),
        ("gfmfr", ["grouping.method=oblivious", "grouping.min_group_size=3", "privacy.mechanism=distributed", "privacy.noise_multiplier=0.8", "privacy.clip=1.0", "privacy.delta=1e-3"]),
        ("mm-fedrap", ["grouping.method=none", "aggregation.backend=masking", "privacy.mechanism=distributed", "privacy.noise_multiplier=0.8", "privacy.clip=1.0", "privacy.delta=1e-3", "privacy.adaptive_clip=true"]),
        ("gfmfr", ["grouping.method=oblivious", "train.rounds=2", "privacy.mechanism=dpsgd", "privacy.dpsgd_noise_multiplier=1.0", "privacy.dpsgd_batch_size=8", "privacy.delta=1e-3"]),
    ],
)
def test_two_nodes_each_hosting_half_the_users_match_the_in_process_engine(tiny_synthetic, method: str, extra: list[str]) -> None:
    split = leave_one_out(tiny_synthetic)
    cfg = with_overrides(config_from_dict({"method": method}), SMALL + extra)
    reference = run_federated(cfg, tiny_synthetic, split, progress=False)
    clients, nodes = _two_nodes(cfg, split)
    assert isinstance(clients, Clients)
    server = FederatedServer(cfg, ServerData.of(tiny_synthetic, split.n_users, split.n_items))
    server.run(clients, progress=False)
    metrics = server.finish(clients)
    for part in ("val", "test"):
        for k, v in reference.metrics[part].items():
            assert metrics[part][k] == pytest.approx(v, abs=1e-6), (part, k)
    assert metrics["privacy"].get("epsilon_if_covered") == pytest.approx(reference.metrics["privacy"].get("epsilon_if_covered"))
    assert [r.get("val") for r in server.history] == [r.get("val") for r in reference.history]
    # each node touched only its own users' state
    for node in nodes:
        others = np.setdiff1d(np.arange(split.n_users), node.users)
        assert not np.isin(others, np.flatnonzero(node.store.group >= 0)).any()


def test_the_server_side_imports_no_client_state() -> None:
    """Importing the server role (and its transport interface) loads no module that holds client state or data."""
    code = "import sys, gfmfr_secure.roles.server, gfmfr_secure.roles.transport; print('\\n'.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    forbidden = {
        "gfmfr_secure.client.state", "gfmfr_secure.client.cohort", "gfmfr_secure.client.kernel", "gfmfr_secure.client.dpsgd",
        "gfmfr_secure.client.local", "gfmfr_secure.data.negatives", "gfmfr_secure.data.split", "gfmfr_secure.data",
        "gfmfr_secure.roles.client", "gfmfr_secure.roles.inprocess", "gfmfr_secure.simulation.checkpoint", "gfmfr_secure.simulation.scoring",
    }
    assert "gfmfr_secure.roles.server" in loaded
    assert not loaded & forbidden, sorted(loaded & forbidden)


def test_a_node_state_dict_round_trips(tiny_synthetic) -> None:
    split = leave_one_out(tiny_synthetic)
    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), [*SMALL, "grouping.method=oblivious"])
    node = ClientNode(cfg, split, np.arange(split.n_users))
    server = FederatedServer(cfg, ServerData.of(tiny_synthetic, split.n_users, split.n_items))
    clients = InProcessClients(cfg, node)
    server.meet(clients)
    server.round(clients, 0)
    state = node.state_dict()
    other = ClientNode(cfg, split, np.arange(split.n_users))
    other.load_state_dict(state)
    again = other.state_dict()
    assert state.keys() == again.keys() and all(bool((state[k] == again[k]).all()) or bool(state[k].isnan().all()) for k in state)
