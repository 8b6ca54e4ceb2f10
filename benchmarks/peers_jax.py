"""The JAX peer of ``bench_peers.py``: ``jax.jit(jax.value_and_grad(total))`` of the same objective.

Benchmark-only code. Dimension letters: N tokens, D model, H expert hidden, E experts, K top-k,
A = N*K assignments, C rows per expert (static capacity), B sequences of T tokens.

The layer is the padded plan with a static C (closed over, so XLA sees fixed shapes): router softmax,
``jax.lax.top_k``, every assignment scattered by index into an [E, C, D] buffer, three batched products
per projection, the outputs gathered back token-major [N, K, D]. The losses are written from the formulas
of docs/spec.md, section 2 (the same ones ``torch_moe`` implements), the ``span`` L_o as the released
Gram-Schmidt loop (v / (||v|| + eps)), unrolled by the tracer. float64 needs
``jax.config.update("jax_enable_x64", True)`` before the first array is made (``bench_peers`` does it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------------------------
# the layer (padded plan, static capacity)
# ----------------------------------------------------------------------------------------------

def padded_rows(topk_idx, E: int, C: int):
    """slot [A]: row e*C + rank of every flat assignment (rank within expert e in token order)."""
    A = topk_idx.size
    flat = topk_idx.reshape(-1)                                        # [A]
    order = jnp.argsort(flat, stable=True)                             # [A]
    counts = jnp.bincount(flat, length=E)                              # [E]
    start = jnp.cumsum(counts) - counts                                # [E]
    expert_sorted = flat[order]                                        # [A]
    rank = jnp.arange(A) - start[expert_sorted]                        # [A]
    return jnp.zeros_like(order).at[order].set(expert_sorted * C + rank, unique_indices=True)


def swiglu(x, w_gate, w_up, w_down):
    """(silu(x Wg) * (x Wu)) Wd; a leading expert axis batches the products."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def layer_forward(params, x, cfg, C: int):
    """-> (y [N, D], scores [N, E], topk_idx [N, K], expert_out [N, K, D])."""
    N, D = x.shape
    E, K = cfg.n_experts, cfg.top_k
    scores = jax.nn.softmax(x @ params["w_router"].T, axis=-1)         # [N, E]
    sel, topk_idx = jax.lax.top_k(scores, K)                           # [N, K]
    gates = sel / sel.sum(axis=-1, keepdims=True) if cfg.norm_topk_prob else sel
    slot = padded_rows(topk_idx, E, C)                                 # [A]
    x_rep = jnp.broadcast_to(x[:, None, :], (N, K, D)).reshape(N * K, D)
    x_pad = jnp.zeros((E * C, D), x.dtype).at[slot].set(x_rep, unique_indices=True)   # zero rows: padding
    out_pad = swiglu(x_pad.reshape(E, C, D), params["w_gate"], params["w_up"], params["w_down"])   # [E, C, D]
    expert_out = out_pad.reshape(E * C, D)[slot].reshape(N, K, D)      # [N, K, D]
    y = jnp.einsum("nk,nkd->nd", gates, expert_out)
    if cfg.n_shared:
        y = y + swiglu(x, params["shared_w_gate"], params["shared_w_up"], params["shared_w_down"])
    return y, scores, topk_idx, expert_out


# ----------------------------------------------------------------------------------------------
# the losses
# ----------------------------------------------------------------------------------------------

def topk_scores(scores, topk_idx):
    """S [N, E]: the selected scores renormalised per row, zero elsewhere."""
    sel = jnp.take_along_axis(scores, topk_idx, axis=1)
    rows = jnp.arange(scores.shape[0])[:, None]
    return jnp.zeros_like(scores).at[rows, topk_idx].set(sel / sel.sum(axis=1, keepdims=True))


def aux_loss(scores, topk_idx, variant, batch_shape):
    N, E = scores.shape
    K = topk_idx.shape[1]
    if variant == "switch":                                            # E sum_j f_j mean_i P_ij, f = c_j / N
        counts = jnp.bincount(topk_idx.reshape(-1), length=E).astype(scores.dtype)
        return E * ((counts / N) * scores.mean(axis=0)).sum()
    if variant == "deepseek_seq":                                      # per sequence, mean over B
        B, T = batch_shape
        counts = jax.vmap(lambda t: jnp.bincount(t, length=E))(topk_idx.reshape(B, T * K)).astype(scores.dtype)
        f = counts / (T * K / E)                                       # [B, E]
        return (f * scores.reshape(B, T, E).mean(axis=1)).sum(axis=1).mean()
    raise ValueError(f"aux variant {variant!r} is not in the JAX peer")


def ortho_pairwise(A, eps):
    """sum_i sum_{j != k} G_jk^2 G_kk / (G_kk + eps)^2."""
    G = jnp.einsum("njd,nkd->njk", A, A)                               # [N, K, K]
    d = jnp.diagonal(G, axis1=1, axis2=2)                              # [N, K]
    off = 1.0 - jnp.eye(A.shape[1], dtype=A.dtype)
    return (G * G * (d / (d + eps) ** 2)[:, None, :] * off).sum()


def ortho_span(A, eps):
    """The released compute_ortho_loss: per slot, Gram-Schmidt of the other K-1 slots, squared projection."""
    N, K, _ = A.shape
    total = 0.0
    for a in range(K):
        us = []
        for b in [b for b in range(K) if b != a]:
            v = A[:, b]
            for u in us:
                v = v - (u * v).sum(axis=-1, keepdims=True) * u
            us.append(v / (jnp.sqrt((v * v).sum(axis=-1, keepdims=True)) + eps))
        for u in us:
            p = (u * A[:, a]).sum(axis=-1)                             # [N]
            total = total + (p * p * (u * u).sum(axis=-1)).sum()
    return total / (K * N)


def var_loss(scores, topk_idx, variant):
    E = scores.shape[1]
    if variant == "paper":                                             # -(1/E) sum_ij (s_ij - sbar_j)^2
        S = topk_scores(scores, topk_idx)
        return -((S - S.mean(axis=0, keepdims=True)) ** 2).sum() / E
    if variant == "code":                                              # -mean_i var_unbiased(P_i)
        return -jnp.var(scores, axis=-1, ddof=1).mean()
    raise ValueError(f"var variant {variant!r} is not in the JAX peer")


def ortho_loss(A, variant, eps):
    if variant == "pairwise":
        return ortho_pairwise(A, eps)
    if variant == "span":
        return ortho_span(A, eps)
    raise ValueError(f"ortho variant {variant!r} is not in the JAX peer")


# ----------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------

class JaxPeer:
    """``step()`` -> (y, grads {name, 'x'}, losses (aux, ortho, var)), all computed by one jitted call."""

    def __init__(self, xh, host_params, cfg, dyh, preset, batch_shape, device, capacity):
        self.device, self.cfg, self.capacity = device, cfg, capacity
        put = lambda a: jax.device_put(jnp.asarray(a), device)          # noqa: E731
        self.x, self.dy = put(xh), put(dyh)
        self.p = {k: put(v) for k, v in host_params.items()}
        pr = preset

        def total(params, x, dy):
            y, scores, idx, eo = layer_forward(params, x, cfg, capacity)
            l_aux = aux_loss(scores, idx, pr.aux, batch_shape)
            l_o = ortho_loss(eo, pr.ortho, pr.ortho_eps)
            l_v = var_loss(scores, idx, pr.var)
            value = (y * dy).sum() + pr.alpha * l_aux + pr.beta * l_o + pr.gamma * l_v
            return value, (y, (l_aux, l_o, l_v))

        self.fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
        self.compiled = None                                           # compiled once, on the first step

    def step(self):
        if self.compiled is None:
            self.compiled = self.fn.lower(self.p, self.x, self.dy).compile()
        (_, (y, losses)), (dp, dx) = self.compiled(self.p, self.x, self.dy)
        grads = dict(dp, x=dx)
        jax.block_until_ready((y, grads, losses))
        return y, grads, losses

    def memory_analysis(self):
        """XLA's buffer plan of the compiled step (bytes): arguments, outputs, temporaries."""
        if self.compiled is None:
            self.compiled = self.fn.lower(self.p, self.x, self.dy).compile()
        m = self.compiled.memory_analysis()
        if m is None:
            return None
        return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
                "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}

    def resident_bytes(self):
        return sum(int(a.nbytes) for a in [self.x, self.dy, *self.p.values()])

    def sync(self):
        pass
