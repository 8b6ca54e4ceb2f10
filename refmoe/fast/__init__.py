"""Mechanisms that exist only for speed, with the core's signatures, each tested equal to the core
(``tests/test_fast.py``: float64 to 1e-12 relative, float32 at the tolerance each module states).

    moe_forward, moe_backward   the layer with the routed experts batched over a padded [E, C, D] layout
                                (``refmoe.fast.experts``); the backward is the core's, which follows the cache
    ortho_gram                  L_o through the per-token Gram matrix (``ortho_loss_forward`` / ``_backward``)

The reading path (``refmoe.layer``, ``refmoe.experts``, ``refmoe.losses``) never imports this package. Pass
``forward=refmoe.fast.moe_forward`` to ``refmoe.objective_forward_backward`` to run an objective on it.
"""
from ..layer import forward_with, moe_backward
from . import experts, ortho_gram


def moe_forward(x, params: dict, cfg):
    """``refmoe.moe_forward`` with batched experts.  x: [N, D] -> (y [N, D], MoECache)."""
    return forward_with(experts, x, params, cfg)


__all__ = ["moe_forward", "moe_backward", "experts", "ortho_gram"]
