"""The recommender module's contract, per backbone and scorer: predict agrees with
full_sort_predict, calculate_loss's gradient equals hand-derived gradients, errors are loud."""

from __future__ import annotations

import pytest
import torch

from gfmfr_secure.errors import ConfigError
from gfmfr_secure.models import get_backbone
from gfmfr_secure.models.params import flatten_heads, unflatten_heads
from gfmfr_secure.models.recommender import LossWeights, RecBatch, Recommender

BACKBONES = ["fedrap", "fedncf", "pfedrec"]
SCORERS = ["dot", "mlp"]
D, R, U = 4, 6, 3


def _tensors(seed: int, scorer: str):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(R, D, generator=g)
    users = torch.randn(U, D, generator=g)
    head = [torch.randn(D, D, generator=g), torch.randn(D, D, generator=g), torch.randn(D, generator=g), torch.randn(D, generator=g), torch.randn(1, generator=g)]
    if scorer == "dot":
        head[0].zero_(), head[1].zero_(), head[2].zero_()
    return g, table, users, tuple(head)


def _model(backbone: str, scorer: str, *, n_users: int = U, seed: int = 0, weights: LossWeights = LossWeights(), all_personal: bool = False) -> Recommender:
    spec = get_backbone(backbone)
    g, table, users, head = _tensors(seed, scorer)
    users = users[:n_users] if spec.user_embedding else torch.zeros(n_users, D)
    personal = None
    if spec.personal_items:
        keys = torch.arange(n_users * R) if all_personal else torch.tensor([0, 3, 5, R + 1, 2 * R + 2, 2 * R + 5])
        keys = keys[keys < n_users * R]
        personal = (keys, torch.randn(keys.numel(), D, generator=g))
    return Recommender(spec, scorer, table, users, head, personal=personal, weights=weights)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_predict_agrees_with_full_sort_predict(backbone: str, scorer: str) -> None:
    """Every (user, item) pair's predict equals its entry of full_sort_predict, personal rows
    stored or not, users in any order; and both equal the formula written out."""
    model = _model(backbone, scorer)
    users = torch.tensor([2, 0, 1])
    full = model.full_sort_predict(users)  # [B, R]
    assert full.shape == (3, R)
    for row, u in enumerate(users.tolist()):
        pairs_u = torch.full((R,), u)
        torch.testing.assert_close(model.predict(pairs_u, torch.arange(R)), full[row], atol=1e-5, rtol=1e-5)
        e = model.user_embedding.weight[u]
        p = torch.stack([model._personal_rows(torch.tensor([u]), torch.tensor([i]))[0] for i in range(R)]) if model.personal_embedding is not None else 0
        x = model.item_embedding.weight + p
        w2, b2 = model.output_layer.weight[0], model.output_layer.bias
        if scorer == "dot":
            expected = x @ (e + w2) + b2
        else:
            expected = torch.relu(x @ model.item_layer.weight.T + model.user_layer.weight @ e + model.item_layer.bias) @ w2 + b2
        torch.testing.assert_close(full[row], expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scorer", SCORERS)
def test_full_sort_predict_with_stacked_private_heads(scorer: str) -> None:
    """Scoring many users, each with its own head, equals scoring each with a module holding that head."""
    spec = get_backbone("fedrap")
    g, table, users, head = _tensors(1, scorer)
    heads = flatten_heads(*(t[None] for t in head[:4]), head[4]).repeat(U, 1) + 0.1 * torch.randn(U, 2 * D * D + 2 * D + 1, generator=g)
    if scorer == "dot":
        heads[:, : 2 * D * D + D] = 0
    keys = torch.tensor([1, R + 4, 2 * R])
    values = torch.randn(3, D, generator=g)
    batch = Recommender(spec, scorer, table, users, head, personal=(keys, values))
    got = batch.full_sort_predict(torch.arange(U), unflatten_heads(heads, D))
    for u in range(U):
        own = tuple(t[0] for t in unflatten_heads(heads[u : u + 1], D))
        mine = keys[(keys // R) == u] % R
        alone = Recommender(spec, scorer, table, users[u : u + 1], own, personal=(mine, values[(keys // R) == u]))
        torch.testing.assert_close(got[u], alone.full_sort_predict(torch.tensor([0]))[0], atol=1e-5, rtol=1e-5)


def _hand_gradients(model: Recommender, batch: RecBatch, lam: float) -> dict[str, torch.Tensor]:
    """dloss/dparameter of ``mean_j (base_j + lam kl_j)``, derived by hand (one user)."""
    dot = model.scorer == "dot"
    C = model.item_embedding.weight.detach().double()
    e = model.user_embedding.weight.detach().double()[0]
    W1u, W1i = model.user_layer.weight.detach().double(), model.item_layer.weight.detach().double()
    b1 = model.item_layer.bias.detach().double()
    w2, b2 = model.output_layer.weight.detach().double()[0], model.output_layer.bias.detach().double()
    P = model.personal_embedding.weight.detach().double() if model.personal_embedding is not None else torch.zeros_like(C)
    n, d = batch.items.numel(), C.shape[1]
    grads = {k: torch.zeros_like(v) for k, v in {"C": C, "P": P, "e": e, "W1u": W1u, "W1i": W1i, "b1": b1, "w2": w2, "b2": b2}.items()}
    for j in range(n):
        r = int(batch.items[j])
        x = C[r] + P[r]
        if dot:
            logit = (e + w2) @ x + b2
        else:
            z = W1i @ x + W1u @ e + b1
            a = torch.clamp(z, min=0)
            logit = w2 @ a + b2
        p = torch.sigmoid(logit)
        g = (p - float(batch.labels[j])) + (lam * (p - float(batch.teacher[j])) if batch.teacher is not None else 0.0)
        g = g / n
        grads["b2"] += g
        if dot:
            grads["w2"] += g * x
            grads["e"] += g * x
            gx = g * (e + w2)
        else:
            grads["w2"] += g * a
            m = g * w2 * (z > 0).double()
            grads["b1"] += m
            grads["W1i"] += torch.outer(m, x)
            grads["W1u"] += torch.outer(m, e)
            grads["e"] += W1u.T @ m
            gx = W1i.T @ m
        gc, gp = gx.clone(), gx.clone()
        if model.alpha:  # -alpha mean_d (p - c)^2
            gc += 2 * model.alpha * (P[r] - C[r]) / d / n
            gp -= 2 * model.alpha * (P[r] - C[r]) / d / n
        if model.beta:  # beta mean_d |c|
            gc += model.beta * torch.sign(C[r]) / d / n
        if model.l2:  # 0.5 l2 (|c|^2 + |p|^2)
            gc += model.l2 * C[r] / n
            gp += model.l2 * P[r] / n
        grads["C"][r] += gc
        grads["P"][r] += gp
    return grads


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_calculate_loss_gradient_equals_hand_derivation(backbone: str, scorer: str, distill: bool) -> None:
    """Autograd through calculate_loss gives the hand-derived gradient of every trained
    parameter (an item drawn twice gets both examples' gradients); frozen ones get none."""
    weights = LossWeights(alpha=0.3, beta=0.2, l2=0.05)
    model = _model(backbone, scorer, n_users=1, seed=4, weights=weights, all_personal=True)
    items = torch.tensor([0, 3, 3, 5, 1])
    g = torch.Generator().manual_seed(5)
    batch = RecBatch(torch.zeros_like(items), items, torch.tensor([1.0, 0, 1, 0, 0]), torch.rand(5, generator=g) if distill else None)
    lam = 0.7 if distill else 0.0
    model.calculate_loss(batch, lam).backward()
    hand = _hand_gradients(model, batch, lam)
    got = {
        "C": model.item_embedding.weight.grad,
        "P": model.personal_embedding.weight.grad if model.personal_embedding is not None else None,
        "e": model.user_embedding.weight.grad[0] if model.user_embedding.weight.grad is not None else None,
        "W1u": model.user_layer.weight.grad,
        "W1i": model.item_layer.weight.grad,
        "b1": model.item_layer.bias.grad,
        "w2": model.output_layer.weight.grad[0],
        "b2": model.output_layer.bias.grad,
    }
    spec = get_backbone(backbone)
    frozen = {"W1u", "W1i", "b1"} if scorer == "dot" else set()
    if not spec.user_embedding:
        frozen.add("e")
    if not spec.personal_items:
        frozen.add("P")
    for name, value in got.items():
        if name in frozen:
            assert value is None, name
        else:
            torch.testing.assert_close(value.double(), hand[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("scorer", SCORERS)
def test_loss_terms_add_up_to_the_module_docstring(scorer: str) -> None:
    """base_j and kl_j against the written-out loss of one example (FedRAP, every term on)."""
    model = _model("fedrap", scorer, n_users=1, seed=6, weights=LossWeights(alpha=0.3, beta=0.2, l2=0.05), all_personal=True)
    batch = RecBatch(torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.25]))
    terms = model.loss_terms(batch)
    c, p = model.item_embedding.weight[2], model.personal_embedding.weight[2]
    logit = terms.logits[0]
    base = torch.nn.functional.softplus(-logit) - 0.3 * ((p - c) ** 2).mean() + 0.2 * c.abs().mean()
    if scorer == "dot":
        base = base + 0.025 * ((c**2).sum() + (p**2).sum())
    q, s = 0.25, torch.sigmoid(logit)
    kl = q * torch.log(q / s) + (1 - q) * torch.log((1 - q) / (1 - s))
    torch.testing.assert_close(terms.base[0], base)
    torch.testing.assert_close(terms.kl[0], kl)
    torch.testing.assert_close(model.calculate_loss(batch, 0.5), base + 0.5 * kl)


def test_regularisers_follow_the_backbone() -> None:
    """FedRAP's alpha and beta only act on backbones that declare them; the L2 only under dot."""
    w = LossWeights(alpha=0.3, beta=0.2, l2=0.05)
    assert (_model("fedncf", "dot", weights=w).alpha, _model("fedncf", "dot", weights=w).beta) == (0.0, 0.0)
    assert _model("fedrap", "mlp", weights=w).l2 == 0.0
    assert _model("fedrap", "dot", weights=w).l2 == 0.05


def test_bad_constructions_fail_loudly() -> None:
    spec = get_backbone("fedrap")
    _, table, users, head = _tensors(0, "mlp")
    with pytest.raises(ConfigError, match="unknown scorer 'cos'; known: dot, mlp"):
        Recommender(get_backbone("fedncf"), "cos", table, users, head)
    with pytest.raises(ConfigError, match="needs personal item rows"):
        Recommender(spec, "mlp", table, users, head)
    with pytest.raises(ConfigError, match="has no personal item rows"):
        Recommender(get_backbone("fedncf"), "mlp", table, users, head, personal=(torch.tensor([0]), torch.zeros(1, D)))
    with pytest.raises(ConfigError, match="strictly increasing"):
        Recommender(spec, "mlp", table, users, head, personal=(torch.tensor([3, 1]), torch.zeros(2, D)))
    with pytest.raises(ConfigError, match="user_embedding must be"):
        Recommender(get_backbone("fedncf"), "mlp", table, users[:, :2], head)
    with pytest.raises(ConfigError, match="hidden size = latent size"):
        wide = (torch.zeros(D + 1, D), torch.zeros(D + 1, D), torch.zeros(D + 1), torch.zeros(D + 1), torch.zeros(1))
        Recommender(get_backbone("fedncf"), "dot", table, users, wide)


def test_the_module_trains_copies_unless_told_not_to() -> None:
    spec = get_backbone("fedncf")
    _, table, users, head = _tensors(0, "dot")
    before = table.clone()
    model = Recommender(spec, "dot", table, users, head)
    torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
    model.calculate_loss(RecBatch(torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(table, before)
    alias = Recommender(spec, "dot", table, users, head, copy=False)
    assert alias.item_embedding.weight.data_ptr() == table.data_ptr()
