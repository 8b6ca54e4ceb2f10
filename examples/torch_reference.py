#!/usr/bin/env python3
"""An independent PyTorch (autograd) implementation of the refmoe layer and its three losses, checked
against refmoe's golden fixtures. It reads the fixtures with NumPy and json only (no refmoe import), so it
shows what any other implementation has to do:

    refmoe golden write golden/                        # the fixtures
    python examples/torch_reference.py golden/ dump/   # recompute every supported case, write dump/<case>.npz
    refmoe golden check golden/ dump/                  # compare, tensor by tensor

``--broken double_softmax`` feeds softmax(scores) to L_aux (a bug real routers shipped) and
``--broken count_padding`` lets padding tokens into every regulariser; `golden check` must reject both and
name the first wrong tensor.

Dimension letters: N tokens, D model width, H expert hidden width, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

AUX_FORMS = ("switch", "paper_eq2", "deepseek_batch", "deepseek_seq", "megatron_seq", "gshard_first_choice")
ORTHO_FORMS = ("pairwise", "span", "span_code_grouping", None)
VAR_FORMS = ("paper", "code", "row_topk", None)
ORTHO_EPS = {"pairwise": 1e-12, "span": 1e-6, "span_code_grouping": 1e-6}
BROKEN = ("double_softmax", "count_padding")


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------

def swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def moe_forward(x, p, cfg):
    """Returns a dict of intermediates; experts run densely on every token, then the K chosen are gathered."""
    N, K = x.shape[0], cfg["top_k"]
    logits = x @ p["w_router"].T                                            # [N, E]
    scores = torch.softmax(logits, dim=-1)                                  # [N, E]
    # tie rule: descending score, equal scores keep ascending expert index (a stable sort)
    idx = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :K]   # [N, K]
    sel = scores.gather(1, idx)                                             # [N, K]
    gates = sel / sel.sum(dim=1, keepdim=True) if cfg["norm_topk_prob"] else sel
    h = F.silu(torch.einsum("nd,edh->enh", x, p["w_gate"])) * torch.einsum("nd,edh->enh", x, p["w_up"])
    every = torch.einsum("enh,ehd->end", h, p["w_down"])                   # [E, N, D]
    expert_out = every[idx, torch.arange(N)[:, None]]                       # [N, K, D] unweighted
    y = torch.einsum("nk,nkd->nd", gates, expert_out)
    out = {"logits": logits, "scores": scores, "topk_idx": idx, "gates": gates, "expert_out": expert_out}
    if cfg["n_shared"]:
        out["shared_out"] = swiglu(x, p["shared_w_gate"], p["shared_w_up"], p["shared_w_down"])
        y = y + out["shared_out"]
    out["y"] = y
    return out


def topk_renormalised(P, idx):
    """S [N, E]: the K selected scores of each row renormalised to sum 1, zero elsewhere (paper Eq. 1)."""
    sel = P.gather(1, idx)
    return torch.zeros_like(P).scatter(1, idx, sel / sel.sum(dim=1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# L_aux
# ----------------------------------------------------------------------------------------------

def _f_dot_p(P, routed, v):
    """(c_j, sum_t v_t P_tj, n) over valid tokens."""
    return (v[:, None] * routed).sum(0), (v[:, None] * P).sum(0), v.sum()


def _per_sequence(P, routed, v, B, T, K):
    E = P.shape[1]
    P, routed, v = P.reshape(B, T, E), routed.reshape(B, T, E), v.reshape(B, T)
    n = v.sum(1)                                                            # [B]
    c = (v[:, :, None] * routed).sum(1)                                     # [B, E]
    psum = (v[:, :, None] * P).sum(1)                                       # [B, E]
    has = n > 0
    n_safe = torch.where(has, n, torch.ones_like(n))
    per_seq = (E * c / (n_safe[:, None] * K) * psum / n_safe[:, None]).sum(1)
    return (per_seq * has).sum() / has.sum()


def aux_loss(P, idx, form, v, batch_shape, double_softmax=False):
    N, E = P.shape
    K = idx.shape[1]
    if double_softmax:
        P = torch.softmax(P, dim=-1)                                        # the bug: probabilities as logits
    routed = torch.zeros_like(P).scatter(1, idx, 1.0)                       # [N, E] 0/1, no gradient
    if form == "gshard_first_choice":
        routed, K, form = torch.zeros_like(P).scatter(1, idx[:, :1], 1.0), 1, "switch"
    if form in ("deepseek_seq", "megatron_seq"):
        B, T = batch_shape
        if form == "megatron_seq":                                         # tokens are t*B + b: go to [B, T]
            perm = torch.arange(N).reshape(T, B).T.reshape(-1)
            P, routed, v = P[perm], routed[perm], v[perm]
        return _per_sequence(P, routed, v, B, T, K)
    c, psum, n = _f_dot_p(P, routed, v)
    if form == "switch":
        return E * (c / n * psum / n).sum()
    if form == "deepseek_batch":
        return (E * c / (n * K) * psum / n).sum()
    if form == "paper_eq2":
        S = topk_renormalised(P, idx)
        return (c / n * (v[:, None] * S).sum(0)).sum()
    raise ValueError(form)


# ----------------------------------------------------------------------------------------------
# L_o and L_v
# ----------------------------------------------------------------------------------------------

def _safe_norm(sq):
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _span_per_token(A, eps):
    """sum over slots of the squared projection on the others, modified Gram-Schmidt with v/(||v|| + eps)."""
    N, K, _ = A.shape
    total = A.new_zeros(N)
    for a in range(K):
        us = []
        for b in [b for b in range(K) if b != a]:
            v = A[:, b]
            for u in us:
                v = v - (u * v).sum(-1, keepdim=True) * u
            us.append(v / (_safe_norm((v * v).sum(-1, keepdim=True)) + eps))
        for u in us:
            total = total + (u * A[:, a]).sum(-1) ** 2 * (u * u).sum(-1)
    return total


def ortho_loss(A, idx, form, eps, v):
    N, K, D = A.shape
    eps = ORTHO_EPS[form] if eps is None else eps
    if form == "pairwise":
        G = torch.einsum("njd,nkd->njk", A, A)                              # [N, K, K]
        nrm = torch.diagonal(G, dim1=1, dim2=2)                             # [N, K]
        den = nrm + eps
        w = nrm / torch.where(den > 0, den, torch.ones_like(den)) ** 2
        off = 1.0 - torch.eye(K, dtype=A.dtype)
        return (v * (G * G * w[:, None, :] * off).sum((1, 2))).sum()
    if form == "span":
        return (v * _span_per_token(A, eps)).sum() / (K * v.sum())
    # span_code_grouping: rows stacked expert-major (token order kept within an expert), regrouped by K
    keep = np.repeat(v.detach().numpy() > 0, K)
    rows = np.nonzero(keep)[0]
    order = rows[np.argsort(idx.reshape(-1).numpy()[rows], kind="stable")]
    grouped = A.reshape(-1, D)[torch.from_numpy(order)].reshape(-1, K, D)
    return _span_per_token(grouped, eps).sum() / (K * grouped.shape[0])


def var_loss(P, idx, form, v):
    N, E = P.shape
    n = v.sum()
    if form == "paper":
        S = topk_renormalised(P, idx)
        dev = v[:, None] * (S - (v[:, None] * S).sum(0) / n)
        return -(dev * dev).sum() / E
    if form == "code":
        var_i = ((P - P.mean(1, keepdim=True)) ** 2).sum(1) / (E - 1)
        return -(v * var_i).sum() / n
    if form == "row_topk":
        sel = P.gather(1, idx)
        s = sel / sel.sum(1, keepdim=True)
        var_i = ((s - s.mean(1, keepdim=True)) ** 2).sum(1) / idx.shape[1]
        return -(v * var_i).sum() / n
    raise ValueError(form)


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# multi-layer balancing-loss conventions (cases of kind "aux_layers": router logits of L layers)
# ----------------------------------------------------------------------------------------------

LAYER_FORMS = ("hf_mixtral", "megatron_micro_batch", "megatron_seq", "megatron_global")


def layers_aux_loss(scores, idx, form, v, batch_shape, micro_batch, double_softmax=False):
    """scores [L, N, E], idx [L, N, K], v [N] -> (loss, per-micro-batch pieces or None)."""
    L, N, E = scores.shape
    if double_softmax:
        scores = torch.softmax(scores, dim=-1)
    if form == "hf_mixtral":                       # concatenate the layers along tokens, then one switch loss
        return aux_loss(scores.reshape(L * N, E), idx.reshape(L * N, -1), "switch", v.repeat(L), None), None
    if form in ("megatron_micro_batch", "megatron_seq"):
        inner = "deepseek_batch" if form == "megatron_micro_batch" else "megatron_seq"
        return sum(aux_loss(scores[l], idx[l], inner, v, batch_shape) for l in range(L)), None
    # global batch: counts and token count over all micro-batches, scores summed per micro-batch
    K = idx.shape[2]
    routed = torch.zeros_like(scores).scatter(2, idx, 1.0)                  # [L, N, E]
    c = (v[None, :, None] * routed).sum(1)                                  # [L, E] global counts
    n = v.sum()
    pieces = []
    for m in range(int(micro_batch.max()) + 1):
        rows = micro_batch == m
        psum = (v[rows][None, :, None] * scores[:, rows]).sum(1)            # [L, E]
        pieces.append((E * c / (K * n * n) * psum).sum())
    return sum(pieces), torch.stack(pieces)


def run_layers_case(arrays: dict, entry: dict, broken: str | None = None) -> dict:
    dtype = {"float64": torch.float64, "float32": torch.float32}[entry["dtype"]]
    logits = torch.tensor(arrays["input/logits"], dtype=dtype, requires_grad=True)
    valid = torch.tensor(arrays["input/valid_mask"])
    v = torch.ones(valid.shape, dtype=dtype) if broken == "count_padding" else valid.to(dtype)
    scores = torch.softmax(logits, dim=-1)                                  # [L, N, E]
    K = entry["config"]["top_k"]
    idx = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :, :K]
    mb = torch.tensor(arrays["input/micro_batch"]) if "input/micro_batch" in arrays else None
    loss, pieces = layers_aux_loss(scores, idx, entry["variants"]["aux"], v, entry["batch_shape"], mb,
                                   double_softmax=broken == "double_softmax")
    (grad,) = torch.autograd.grad(loss, [logits])
    out = {k: arrays[k] for k in arrays if k.startswith("input/")}
    out.update({"inter/scores": scores.detach().numpy(), "inter/topk_idx": idx.numpy().astype(np.int64),
                "loss/aux": loss.detach().numpy(), "grad/aux/logits": grad.numpy()})
    if pieces is not None:
        out["loss/aux_pieces"] = pieces.detach().numpy()
    return out


def supports(entry) -> bool:
    if entry.get("system") is not None:         # sys_<S> cases: routers of other systems, not implemented here
        return False
    if entry.get("world_size") is not None:     # one rank of a data-parallel group: its share needs the others'
        return False                            # counts (all-reduced), which a one-process run does not have
    var = entry["variants"]
    if entry.get("kind", "layer") == "aux_layers":
        return var["aux"] in LAYER_FORMS
    return var["aux"] in AUX_FORMS and var["ortho"] in ORTHO_FORMS and var["var"] in VAR_FORMS


def run_case(arrays: dict, entry: dict, broken: str | None = None) -> dict:
    """Recompute a case from its inputs; returns the dump (same keys as the fixture, NumPy arrays)."""
    dtype = {"float64": torch.float64, "float32": torch.float32}[entry["dtype"]]
    cfg, var, coef = entry["config"], entry["variants"], entry["coefficients"]
    t = lambda a: torch.tensor(a, dtype=dtype, requires_grad=True)
    x = t(arrays["input/x"])
    params = {k[len("param/"):]: t(a) for k, a in arrays.items() if k.startswith("param/")}
    dy = torch.tensor(arrays["input/dy"], dtype=dtype)
    valid = torch.tensor(arrays["input/valid_mask"])
    see_padding = entry["regularisers_see_padding"] or broken == "count_padding"
    v = torch.ones(valid.shape, dtype=dtype) if see_padding else valid.to(dtype)

    inter = moe_forward(x, params, cfg)
    losses = {"task": (dy * inter["y"]).sum()}
    losses["aux"] = aux_loss(inter["scores"], inter["topk_idx"], var["aux"], v, entry["batch_shape"],
                             double_softmax=broken == "double_softmax")
    if var["ortho"] is not None:
        losses["ortho"] = ortho_loss(inter["expert_out"], inter["topk_idx"], var["ortho"], entry["ortho_eps"], v)
    if var["var"] is not None:
        losses["var"] = var_loss(inter["scores"], inter["topk_idx"], var["var"], v)
    weight = {"task": 1.0, "aux": coef["alpha"], "ortho": coef["beta"], "var": coef["gamma"]}
    losses["total"] = sum(weight[k] * losses[k] for k in list(losses))

    inputs = {"x": x, **params}
    out = {f"input/{k}": arrays[f"input/{k}"] for k in ("x", "dy", "valid_mask")}
    out.update({k: a for k, a in arrays.items() if k.startswith("param/")})
    for name, value in inter.items():
        out[f"inter/{name}"] = value.detach().numpy()
    for term, loss in losses.items():
        out[f"loss/{term}"] = loss.detach().numpy()
        scaled = loss if term == "total" else weight[term] * loss      # grad/<term>: its contribution to the total
        grads = torch.autograd.grad(scaled, list(inputs.values()), retain_graph=True, allow_unused=True)
        for name, g in zip(inputs, grads):
            out[f"grad/{term}/{name}"] = (torch.zeros_like(inputs[name]) if g is None else g).detach().numpy()
    out["inter/topk_idx"] = out["inter/topk_idx"].astype(np.int64)
    return out


def run(golden_dir, dump_dir, cases=None, broken: str | None = None) -> list:
    """Recompute every supported case (or ``cases``) of ``golden_dir`` into ``dump_dir``; returns the names."""
    if broken not in (None,) + BROKEN:
        raise ValueError(f"broken={broken!r}; expected one of {BROKEN}")
    with open(os.path.join(golden_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    os.makedirs(dump_dir, exist_ok=True)
    done = []
    for name in cases or sorted(manifest["cases"]):
        entry = manifest["cases"][name]
        if not supports(entry):
            why = ("a rank of a data-parallel group" if entry.get("world_size") is not None
                   else f"variants {entry['variants']} not implemented here")
            print(f"skip {name}: {why}")
            continue
        # the manifest does not choose paths: <case>.npz in each directory, never through a symlink
        source, target = (os.path.join(d, plain_name(name) + ".npz") for d in (golden_dir, dump_dir))
        with np.load(refuse_symlink(source), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        compute = run_layers_case if entry.get("kind", "layer") == "aux_layers" else run_case
        np.savez(refuse_symlink(target), **compute(arrays, entry, broken))
        done.append(name)
    return done


def plain_name(name) -> str:
    """A case name made of letters, digits, '_' and '-' only, so that <name>.npz stays in its directory."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"case name {name!r} is not a plain name (letters, digits, '_' and '-')")
    return name


def refuse_symlink(path: str) -> str:
    if os.path.islink(path):
        raise ValueError(f"{path} is a symlink; refusing to follow it")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("golden", help="directory written by `refmoe golden write`")
    parser.add_argument("dump", help="directory to write <case>.npz into")
    parser.add_argument("--case", action="append", default=None, help="only this case (repeatable)")
    parser.add_argument("--broken", choices=BROKEN, default=None, help="inject a known bug")
    args = parser.parse_args(argv)
    done = run(args.golden, args.dump, args.case, args.broken)
    print(f"wrote {len(done)} case(s) to {args.dump}")


if __name__ == "__main__":
    main()
