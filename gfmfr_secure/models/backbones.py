"""Backbones of the client recommender, as declarative specifications.

All backbones share one model, :class:`~gfmfr_secure.models.recommender.Recommender`,
scoring with the user vector (``dot``) or the NCF-style head of FedRAP (``mlp``)::

    dot:  y_hat(u, i) = sigmoid((e_u + w2) . (P_u[i] + C[i]) + b2)
    mlp:  y_hat(u, i) = sigmoid(w2 . relu(W1u e_u + W1i (P_u[i] + C[i]) + b1) + b2)

with ``e_u`` the private user embedding [d], ``P_u`` the private personal item
table [I, d] (FedRAP only; zero otherwise), ``C`` the shared item table [I, d] and
the head ``(W1u, W1i, b1, w2, b2)``. A backbone says which parts exist, which are
shared and whether FedRAP's regularisers apply; the model and the trainers read these
flags instead of branching on names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKBONES", "BackboneSpec", "get_backbone", "register_backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone trains and shares.

    Attributes
    ----------
    name : registry name.
    user_embedding : the client has a private user embedding ``e_u``.
    personal_items : the client has a private personal item table ``P_u`` (FedRAP).
    private_head : the head is kept by the client and never uploaded (PFedRec's
        personalised score function); otherwise it is shared and averaged.
    fedrap_regularisers : the loss includes ``-alpha MSE(P, C) + beta |C|_1``.
    """

    name: str
    user_embedding: bool
    personal_items: bool
    private_head: bool
    fedrap_regularisers: bool

    @property
    def shared_keys(self) -> tuple[str, ...]:
        """Names of the parameters a client uploads."""
        keys = ("item_table",)
        if not self.private_head:
            keys += ("w1_user", "w1_item", "b1", "w2", "b2")
        return keys

    @property
    def private_keys(self) -> tuple[str, ...]:
        """Names of the parameters that never leave the client."""
        keys: tuple[str, ...] = ()
        if self.user_embedding:
            keys += ("user_embedding",)
        if self.personal_items:
            keys += ("personal_items",)
        if self.private_head:
            keys += ("w1_user", "w1_item", "b1", "w2", "b2")
        return keys


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry; a duplicate name raises."""
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    BACKBONES[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by name; unknown names raise listing the known ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


register_backbone(BackboneSpec("fedrap", user_embedding=True, personal_items=True, private_head=False, fedrap_regularisers=True))
register_backbone(BackboneSpec("fedncf", user_embedding=True, personal_items=False, private_head=False, fedrap_regularisers=False))
register_backbone(BackboneSpec("pfedrec", user_embedding=False, personal_items=False, private_head=True, fedrap_regularisers=False))

