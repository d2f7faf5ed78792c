"""Tests for the group fusion module, its operators and its training (gfmfr_secure.server)."""

from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pytest
import torch

from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.server.fusion import GroupFusion
from gfmfr_secure.server.fusion_training import (
    PlainSGD,
    compiled_supported,
    kernel_supported,
    train_fusion,
)
from gfmfr_secure.server.operators import (
    FUSION_OPERATORS,
    OperatorOptions,
    get_fusion_operator,
    register_fusion_operator,
)

OPERATORS = ["sum", "mlp", "gate", "attention", "moe"]
MODALITIES = {"text+image": (5, 11), "text": (5, None), "image": (None, 11), "none": (None, None)}
G, I, D, E = 3, 7, 8, 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread avoids thread start-up and contention costs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def features(seed: int = 0, n_items: int = I, text_dim: int | None = 5, image_dim: int | None = 11):
    g = gen(seed)
    text = None if text_dim is None else torch.randn(n_items, text_dim, generator=g)
    image = None if image_dim is None else torch.randn(n_items, image_dim, generator=g)
    return text, image


def build(operator: str, modality: str, seed: int = 0, **kwargs) -> GroupFusion:
    text_dim, image_dim = MODALITIES[modality]
    text, image = features(100, text_dim=text_dim, image_dim=image_dim)
    module = GroupFusion(
        G,
        D,
        embedding_dim=E,
        text_dim=text_dim,
        image_dim=image_dim,
        n_items=I,
        operator=operator,
        generator=gen(seed),
        **kwargs,
    )
    module.set_item_features(text=text, image=image)
    return module


def all_pairs(n_groups: int, n_items: int):
    return (
        torch.arange(n_groups).repeat_interleave(n_items),
        torch.arange(n_items).repeat(n_groups),
    )


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("operator, modality", list(itertools.product(OPERATORS, MODALITIES)))
def test_forward_backward_all_configurations(operator, modality):
    module = build(operator, modality)
    expected_k = {"text+image": 3}.get(modality, 2)
    assert len(module.modalities) == expected_k
    g_idx = torch.tensor([0, 2, 1, 2])
    i_idx = torch.tensor([6, 0, 3, 3])
    out = module(g_idx, i_idx)
    assert out.shape == (4, D)
    out.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all()
    assert any(float(p.grad.abs().sum()) > 0 for p in module.parameters())


@pytest.mark.parametrize("operator, modality", list(itertools.product(OPERATORS, MODALITIES)))
def test_forward_all_equals_pairwise_forward(operator, modality):
    module = build(operator, modality)
    with torch.no_grad():
        grid = module.forward_all()
        pairs = module(*all_pairs(G, I)).reshape(G, I, D)
    assert grid.shape == (G, I, D)
    torch.testing.assert_close(grid, pairs, rtol=1e-5, atol=1e-6)
    # a sub-grid in arbitrary order matches too
    g_idx, i_idx = torch.tensor([2, 0]), torch.tensor([4, 1, 6])
    with torch.no_grad():
        sub = module.forward_grid(g_idx, i_idx)
    torch.testing.assert_close(sub, grid[g_idx][:, i_idx], rtol=1e-5, atol=1e-6)


def _raw_rows(module: GroupFusion, items: torch.Tensor) -> list[torch.Tensor]:
    return [module._item_source(name).index_select(0, items) for name in module.modalities[1:]]


@pytest.mark.parametrize("operator, modality", list(itertools.product(["sum", "mlp", "gate", "moe"], MODALITIES)))
@pytest.mark.parametrize("group_idx", [None, [2, 0]])
def test_hand_derived_gradients_equal_autograd(operator, modality, group_idx):
    """The manual backward used for training gives autograd's loss and gradient of every parameter."""
    module = build(operator, modality)
    g_idx = None if group_idx is None else torch.tensor(group_idx)
    items = torch.tensor([5, 1, 1, 6, 0])  # a repeated item too
    n_groups = G if g_idx is None else len(group_idx)
    targets = torch.randn(n_groups, items.numel(), D, generator=gen(4))
    loss, grads = module.grid_mse_grads(g_idx, items, _raw_rows(module, items), targets)
    ref = torch.nn.functional.mse_loss(module.forward_grid(g_idx, items), targets)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    assert set(grads) == set(module.parameters())
    for name, param in module.named_parameters():
        torch.testing.assert_close(grads[param], param.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_attention_has_no_hand_derived_backward_and_trains_by_autograd():
    module = build("attention", "text+image")
    items = torch.tensor([0, 3])
    assert module.grid_mse_grads(None, items, _raw_rows(module, items), torch.zeros(G, 2, D)) is None
    losses = train_fusion(module, torch.randn(G, I, D, generator=gen(2)), epochs=3, generator=gen(1))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("operator", OPERATORS)
def test_output_depends_on_item_and_group(operator):
    for modality in MODALITIES:
        with torch.no_grad():
            grid = build(operator, modality).forward_all()
        assert not torch.allclose(grid[0, 0], grid[0, 1]), modality
        assert not torch.allclose(grid[0, 0], grid[1, 0]), modality


@pytest.mark.parametrize("operator", ["attention", "moe"])
def test_pairs_do_not_mix_within_a_batch(operator):
    # attention is over the modalities of one pair and routing is per sample,
    # so a pair's output does not depend on which other pairs share its batch
    module = build(operator, "text+image")
    g_idx, i_idx = all_pairs(G, I)
    with torch.no_grad():
        full = module(g_idx, i_idx)
        part = module(g_idx[5:9], i_idx[5:9])
    torch.testing.assert_close(part, full[5:9], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("n_rows, n_cols", [(1, 3), (2, 2), (3, 1)])
def test_operators_accept_any_number_of_inputs(operator, n_rows, n_cols):
    k, d = n_rows + n_cols, 12
    op = get_fusion_operator(operator)(k, d, OperatorOptions(attention_heads=3, router_hidden=5))
    for p in op.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3, generator=gen(1))
    g = gen(2)
    rows = [torch.randn(4, d, generator=g) for _ in range(n_rows)]
    cols = [torch.randn(5, d, generator=g) for _ in range(n_cols)]
    grid = op.forward_grid(rows, cols)
    assert grid.shape == (4, 5, d)
    r_idx, c_idx = torch.arange(4).repeat_interleave(5), torch.arange(5).repeat(4)
    pairs = op([t[r_idx] for t in rows] + [t[c_idx] for t in cols]).reshape(4, 5, d)
    torch.testing.assert_close(grid, pairs, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- init and determinism


def test_construction_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    build("moe", "text+image")
    build("attention", "none")
    assert torch.equal(state, torch.random.get_rng_state())


def test_initialisation_reproducible_and_seed_dependent():
    a, b, c = (
        build("moe", "text+image", 1),
        build("moe", "text+image", 1),
        build("moe", "text+image", 2),
    )
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    for name, p in a.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    # default generator is a fixed seed, not the global RNG
    d1 = GroupFusion(G, D, embedding_dim=E, text_dim=None, image_dim=None, n_items=I)
    d2 = GroupFusion(G, D, embedding_dim=E, text_dim=None, image_dim=None, n_items=I)
    assert all(torch.equal(v, d2.state_dict()[k]) for k, v in d1.state_dict().items())


def test_state_dict_holds_only_learned_parameters():
    module = build("sum", "text+image")
    keys = set(module.state_dict())
    assert not any("features" in k for k in keys)
    assert keys == {name for name, _ in module.named_parameters()}
    assert module.text_features.shape == (I, 5) and module.image_features.shape == (I, 11)


def test_from_features_infers_dims():
    text, image = features(3, n_items=9, text_dim=4, image_dim=None)
    module = GroupFusion.from_features(
        2, D, text=text, image=image, embedding_dim=E, operator="gate", generator=gen(0)
    )
    assert (module.text_dim, module.image_dim, module.n_items) == (4, None, 9)
    assert module.forward_all().shape == (2, 9, D)
    ids_only = GroupFusion.from_features(2, D, text=None, image=None, n_items=4, embedding_dim=E)
    assert ids_only.modalities == ("group", "item_id")
    with pytest.raises(ConfigError, match="n_items is required"):
        GroupFusion.from_features(2, D, text=None, image=None)


def test_numpy_features_accepted():
    text, image = features(4)
    module = GroupFusion(G, D, embedding_dim=E, text_dim=5, image_dim=11, n_items=I, operator="sum")
    module.set_item_features(text=text.double().numpy(), image=image.numpy())
    assert module.text_features.dtype == torch.float32
    torch.testing.assert_close(module.text_features, text)


# --------------------------------------------------------------------------- training


def linear_targets(text: torch.Tensor, image: torch.Tensor, n_groups: int, dim: int, seed: int):
    """Per-group linear maps of the features: [G, I, d]."""
    g = gen(seed)
    shared_t = torch.randn(text.shape[1], dim, generator=g) / text.shape[1] ** 0.5
    shared_v = torch.randn(image.shape[1], dim, generator=g) / image.shape[1] ** 0.5
    out = []
    for _ in range(n_groups):
        wt = shared_t + 0.3 * torch.randn(shared_t.shape, generator=g) / text.shape[1] ** 0.5
        wv = shared_v + 0.3 * torch.randn(shared_v.shape, generator=g) / image.shape[1] ** 0.5
        offset = 0.5 * torch.randn(dim, generator=g)
        out.append(text @ wt + image @ wv + offset)
    return torch.stack(out)


@pytest.mark.parametrize("operator", OPERATORS)
def test_training_reduces_mse(operator):
    n_groups, n_items, dim = 4, 60, 8
    text, image = features(5, n_items=n_items, text_dim=12, image_dim=20)
    targets = linear_targets(text, image, n_groups, dim, seed=6)
    module = GroupFusion.from_features(
        n_groups, dim, text=text, image=image, embedding_dim=16, operator=operator, generator=gen(7)
    )
    with torch.no_grad():
        before = float(torch.nn.functional.mse_loss(module.forward_all(), targets))
    losses = train_fusion(
        module, targets, epochs=25, batch_size=48, lr=0.02, optimizer="adam", generator=gen(8)
    )
    with torch.no_grad():
        after = float(torch.nn.functional.mse_loss(module.forward_all(), targets))
    assert len(losses) == 25
    assert after < 0.25 * before, (before, after)
    assert losses[-1] < 0.5 * losses[0]


def test_training_with_sgd_default_settings_decreases_loss():
    text, image = features(5, n_items=50, text_dim=12, image_dim=20)
    targets = linear_targets(text, image, 3, D, seed=6)
    module = GroupFusion.from_features(
        3, D, text=text, image=image, embedding_dim=16, operator="sum", generator=gen(7)
    )
    losses = train_fusion(module, targets, epochs=30, lr=0.05, generator=gen(8))
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("operator", ["moe", "attention"])
def test_training_deterministic_for_identical_generators(operator):
    targets = torch.randn(G, I, D, generator=gen(9))
    runs = []
    for _ in range(2):
        module = build(operator, "text+image", seed=3)
        losses = train_fusion(module, targets, epochs=3, batch_size=6, generator=gen(4))
        runs.append((losses, module.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    other = build(operator, "text+image", seed=3)
    assert train_fusion(other, targets, epochs=3, batch_size=6, generator=gen(5)) != runs[0][0]


def test_group_mask_ignores_inactive_groups():
    base = torch.randn(G, I, D, generator=gen(1))
    other = base.clone()
    other[1] = 100.0  # group 1 has no members: its targets must not matter
    mask = torch.tensor([True, False, True])
    results = []
    for targets in (base, other):
        module = build("mlp", "text", seed=2)
        results.append(
            train_fusion(module, targets, group_mask=mask, epochs=2, batch_size=5, generator=gen(3))
        )
    assert results[0] == results[1]


def test_batches_cover_all_items_across_active_groups():
    # with lr tiny the epoch loss equals the full MSE over active pairs at init
    module = build("sum", "text+image")
    targets = torch.randn(G, I, D, generator=gen(1))
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(module.forward_all(), targets))
    losses = train_fusion(
        module, targets, epochs=1, batch_size=4, lr=1e-12, weight_decay=0.0, generator=gen(2)
    )
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert train_fusion(module, targets, epochs=0, generator=gen(2)) == []


# --------------------------------------------------------------------------- errors


def test_feature_errors():
    module = GroupFusion(G, D, embedding_dim=E, text_dim=5, image_dim=11, n_items=I, operator="sum")
    text, image = features(0)
    with pytest.raises(DataError, match="item features for modality 'text' are not set"):
        module.forward_all()
    with pytest.raises(DataError, match="text features have 6 rows but n_items=7"):
        module.set_item_features(text=text[:6], image=image)
    with pytest.raises(DataError, match="image features have 10 columns but image_dim=11"):
        module.set_item_features(text=text, image=image[:, :10])
    bad = image.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(
        DataError, match=r"image features have 1 NaN/inf entries \(first item rows: \[3\]\)"
    ):
        module.set_item_features(text=text, image=bad)
    with pytest.raises(DataError, match="built with image_dim=11 but no image features"):
        module.set_item_features(text=text)
    with pytest.raises(DataError, match="2-D"):
        module.set_item_features(text=text[0], image=image)
    text_only = GroupFusion(G, D, embedding_dim=E, text_dim=5, image_dim=None, n_items=I)
    with pytest.raises(
        DataError, match="image features given but the module was built with image_dim=None"
    ):
        text_only.set_item_features(text=text, image=image)


def test_config_errors():
    with pytest.raises(
        ConfigError, match="unknown fusion operator 'concat'; known: attention, gate, .*moe"
    ):
        GroupFusion(G, D, text_dim=None, image_dim=None, n_items=I, operator="concat")
    with pytest.raises(
        ConfigError, match="attention_heads=3 must be >= 1 and divide the latent dim 8"
    ):
        GroupFusion(
            G,
            D,
            text_dim=None,
            image_dim=None,
            n_items=I,
            operator="attention",
            options=OperatorOptions(attention_heads=3),
        )
    with pytest.raises(ConfigError, match="n_groups must be a positive integer"):
        GroupFusion(0, D, text_dim=None, image_dim=None, n_items=I)
    with pytest.raises(ConfigError, match="text_dim must be a positive integer"):
        GroupFusion(G, D, text_dim=0, image_dim=None, n_items=I)
    with pytest.raises(ConfigError, match="already registered"):
        register_fusion_operator("sum")(FUSION_OPERATORS["sum"])


def test_index_errors():
    module = build("sum", "text")
    with pytest.raises(DataError, match="item_idx must lie in 0..6"):
        module(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(DataError, match="group_idx must have dtype torch.long"):
        module(torch.tensor([0.0]), torch.tensor([1]))
    with pytest.raises(DataError, match="group_idx has shape"):
        module(torch.tensor([0, 1]), torch.tensor([1]))


def test_train_fusion_errors():
    module = build("sum", "text")
    targets = torch.zeros(G, I, D)
    with pytest.raises(DataError, match=r"targets must have shape \[G, I, d\] = \[3, 7, 8\]"):
        train_fusion(module, targets[:, :5], generator=gen(0))
    nan = targets.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="targets contain NaN"):
        train_fusion(module, nan, generator=gen(0))
    with pytest.raises(DataError, match="group_mask selects no group"):
        train_fusion(module, targets, group_mask=torch.zeros(G, dtype=torch.bool), generator=gen(0))
    with pytest.raises(DataError, match="group_mask must be a bool tensor of shape"):
        train_fusion(module, targets, group_mask=torch.ones(G), generator=gen(0))
    with pytest.raises(ConfigError, match="unknown optimizer 'rmsprop'; known: adam, sgd"):
        train_fusion(module, targets, optimizer="rmsprop", generator=gen(0))
    with pytest.raises(ConfigError, match="lr must be"):
        train_fusion(module, targets, lr=0.0, generator=gen(0))
    with pytest.raises(ConfigError, match="generator must be a torch.Generator"):
        train_fusion(module, targets, generator=0)  # type: ignore[arg-type]


def test_divergence_fails_loudly():
    module = build("mlp", "text+image")
    targets = 1e3 * torch.randn(G, I, D, generator=gen(0))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train_fusion(module, targets, epochs=20, lr=1e6, generator=gen(1))


def test_plain_sgd_matches_torch_sgd():
    a = build("gate", "text+image", seed=1)
    b = build("gate", "text+image", seed=1)
    opt_a = PlainSGD(list(a.parameters()), lr=0.05, weight_decay=0.01)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, weight_decay=0.01)
    targets = torch.randn(G, I, D, generator=gen(2))
    for _ in range(5):
        for module, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(module.forward_all(), targets).backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


_HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _HAS_COMPILER, reason="torch.compile (inductor) needs a C++ compiler")
@pytest.mark.parametrize("operator, modality", [("moe", "text+image"), ("sum", "none")])
def test_compiled_training_matches_eager_and_is_reproducible(operator, modality):
    # "none" makes the learnable item-ID embedding both a parameter and the item input.
    targets = torch.randn(G, I, D, generator=gen(9))
    runs = {}
    for compiled in (False, True, True):
        module = build(operator, modality, seed=3)
        losses = train_fusion(
            module, targets, epochs=4, batch_size=6, lr=0.05, generator=gen(4), compiled=compiled, kernel=False
        )
        runs.setdefault(compiled, []).append((losses, module.state_dict()))
    (eager_losses, eager_state), = runs[False]
    first, second = runs[True]
    assert first[0] == second[0]  # compiled runs reproduce each other exactly
    assert all(torch.equal(v, second[1][k]) for k, v in first[1].items())
    np.testing.assert_allclose(first[0], eager_losses, rtol=1e-5)
    for name, value in eager_state.items():
        torch.testing.assert_close(first[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert eager_losses[-1] < eager_losses[0]


def test_compiled_training_refuses_what_it_cannot_compile():
    targets = torch.zeros(G, I, D)
    with pytest.raises(ConfigError, match="compiled fusion training needs optimizer='sgd'"):
        train_fusion(build("attention", "text"), targets, generator=gen(0), compiled=True)
    with pytest.raises(ConfigError, match="optimizer='adam', operator='moe'"):
        train_fusion(build("moe", "text"), targets, optimizer="adam", generator=gen(0), compiled=True)
    assert compiled_supported("moe", "sgd") and not compiled_supported("attention", "sgd")


def test_compiled_training_with_an_empty_group_runs_eagerly():
    # A round where some group has no members takes the eager path: identical results.
    targets = torch.randn(G, I, D, generator=gen(1))
    mask = torch.tensor([True, False, True])
    results = []
    for compiled in (False, True):
        module = build("gate", "text", seed=2)
        results.append(
            train_fusion(module, targets, group_mask=mask, epochs=2, batch_size=5, generator=gen(3), compiled=compiled)
        )
    assert results[0] == results[1]


def test_compilation_failure_names_the_setting(monkeypatch):
    from torch._inductor.exc import InductorError

    from gfmfr_secure.server import fusion_training

    def broken(*args, **kwargs):
        raise InductorError(RuntimeError("InvalidCxxCompiler: no working C++ compiler"), None)

    monkeypatch.setattr(fusion_training, "_compiled_step", lambda: broken)
    with pytest.raises(ConfigError, match=r"fusion\.compile=true needs a working C\+\+ compiler.*InvalidCxxCompiler"):
        train_fusion(build("gate", "text"), torch.zeros(G, I, D), generator=gen(0), compiled=True)


# --------------------------------------------------------------------------- Numba loop (moe + SGD)


@pytest.mark.parametrize("modality", ["text", "image", "text+image"])
@pytest.mark.parametrize("mask", [None, [True, False, True]])
@pytest.mark.parametrize("router_hidden", [None, 3])
def test_numba_loop_matches_the_eager_steps(modality, mask, router_hidden):
    """The compiled loop trains moe exactly like the eager hand-derived steps: the same
    epoch losses and parameters up to float rounding, inactive groups included."""
    targets = torch.randn(G, I, D, generator=gen(4))
    group_mask = None if mask is None else torch.tensor(mask)
    opts = OperatorOptions(router_hidden=router_hidden)
    eager, loop = build("moe", modality, seed=5, options=opts), build("moe", modality, seed=5, options=opts)
    assert kernel_supported(loop, "sgd")
    kw = {"group_mask": group_mask, "epochs": 3, "batch_size": 7, "lr": 0.05, "weight_decay": 1e-2}
    ref = train_fusion(eager, targets, generator=gen(6), kernel=False, **kw)
    got = train_fusion(loop, targets, generator=gen(6), **kw)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), loop.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_numba_loop_is_reproducible_and_fails_loudly():
    targets = torch.randn(G, I, D, generator=gen(4))
    a, b = build("moe", "text+image", seed=1), build("moe", "text+image", seed=1)
    assert train_fusion(a, targets, epochs=2, generator=gen(2)) == train_fusion(b, targets, epochs=2, generator=gen(2))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train_fusion(build("moe", "text"), 1e3 * targets, epochs=20, lr=1e6, generator=gen(1))


def test_numba_loop_only_where_it_applies():
    assert not kernel_supported(build("moe", "none"), "sgd")  # learnable item-ID tokens
    assert not kernel_supported(build("moe", "text"), "adam")
    assert not kernel_supported(build("mlp", "text"), "sgd")
