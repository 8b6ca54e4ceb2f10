"""The one dispatch from (term, form) to a regulariser of the layer's cache, forward and backward.

Dimension letters: N tokens, D model width, E routed experts, K top-k, B sequences of T tokens.

A term reads the layer's intermediates and puts its gradient back on them:

    term    reads (from ``MoECache``)     injects into ``moe_backward``   forms
    aux     scores [N, E], topk_idx       d_scores [N, E]                 ``AUX_VARIANTS``
    ortho   expert_out [N, K, D]          d_expert_out [N, K, D]          ``ORTHO_VARIANTS``
    var     scores [N, E], topk_idx       d_scores [N, E]                 ``VAR_VARIANTS``
    z       logits [N, E]                 d_logits [N, E]                 ("zloss",): the router z-loss
    sys_aux scores [N, E], topk_idx       d_scores [N, E]                 ``SYSTEM_AUX_FORMS`` (Megatron:
                                                                          ``refmoe.losses.aux_systems``)

``scores`` is ``MoECache.scores`` under every router, rows summing to 1: softmax(z), or under sigmoid scoring the
normalised affinities sigma(z) / sum_j sigma(z)_j, which every aux form and L_v read (docs/spec.md section 1.1).

Every form reads its batch through a few sums over the tokens (``term_totals``: token and expert counts, the
column sums of L_v ``paper``, the sequences of the per-sequence forms); ``term_forward(..., totals=)`` with those
sums taken over a whole data-parallel group gives one rank's share of the term on the concatenated batch.

The objective, the golden writer, ``refmoe gradcheck`` and the gradient audit all go through
:func:`term_forward` / :func:`term_backward`; the composition of several terms with their coefficients is
:func:`refmoe.objective.compose_backward`.
"""
from __future__ import annotations

from typing import NamedTuple

from ..checks import resolve_batch_shape
from .aux import AUX_VARIANTS, aux_loss_backward, aux_loss_forward, aux_loss_totals
from .aux_systems import SYSTEM_AUX_FORMS, system_aux_backward, system_aux_forward, system_aux_totals
from .ortho import ORTHO_VARIANTS, ortho_loss_backward, ortho_loss_forward, ortho_loss_totals
from .variance import VAR_VARIANTS, var_loss_backward, var_loss_forward, var_loss_totals
from .zloss import zloss_backward, zloss_forward, zloss_totals

TERM_FORMS = {"aux": tuple(AUX_VARIANTS), "ortho": tuple(ORTHO_VARIANTS), "var": tuple(VAR_VARIANTS),
              "z": ("zloss",), "sys_aux": tuple(SYSTEM_AUX_FORMS)}


class Injection(NamedTuple):
    """A term's gradient on the layer's intermediates; the one it does not read is None."""
    d_scores: object        # [N, E] or None
    d_expert_out: object    # [N, K, D] or None
    d_logits: object = None  # [N, E] or None (the z-loss)


class TermCache(NamedTuple):
    term: str
    form: str
    loss_cache: object      # the cache of aux_loss_forward / ortho_loss_forward / var_loss_forward


def _check_term(term: str, form: str):
    if term not in TERM_FORMS:
        raise ValueError(f"term={term!r}; expected one of {list(TERM_FORMS)}")
    if form not in TERM_FORMS[term]:
        raise ValueError(f"{term} form {form!r} is not known; expected one of {list(TERM_FORMS[term])}")


def term_totals(term: str, form: str, cache, *, valid_mask=None, batch_shape=None):
    """The sums over the cache's batch that ``term`` in form ``form`` normalises by: a float64 1-D array
    (token counts, expert counts, column sums, sequences; empty for a plain sum such as L_o ``pairwise``).

    Summed over the ranks of a data-parallel group and passed as ``term_forward(..., totals=)``, they make each
    rank's value its share of the term on the concatenated batch. Arguments as for :func:`term_forward`.
    """
    _check_term(term, form)
    if term in ("aux", "sys_aux"):
        totals = aux_loss_totals if term == "aux" else system_aux_totals
        return totals(cache.scores, cache.topk_idx, form, valid_mask=valid_mask,
                      batch_shape=resolve_batch_shape(batch_shape, cache.scores.shape[0]))
    if term == "ortho":
        return ortho_loss_totals(cache.expert_out, form, valid_mask=valid_mask)
    if term == "var":
        return var_loss_totals(cache.scores, cache.topk_idx, form, valid_mask=valid_mask)
    return zloss_totals(cache.logits, valid_mask)


def term_forward(term: str, form: str, cache, *, valid_mask=None, batch_shape=None, eps=None, totals=None):
    """Value of regulariser ``term`` in form ``form`` on a layer cache.  -> (0-d array, TermCache).

    cache        the layer's ``MoECache`` (its ``scores``, ``topk_idx`` and ``expert_out`` are read)
    valid_mask   optional [N] bool, True = real token; the term leaves padding out
    batch_shape  (B, T) layout of the tokens for the per-sequence L_aux / sys_aux forms; None = one sequence (1, N)
    eps          L_o's eps (None: the form's default); only for term "ortho"
    totals       None, or :func:`term_totals` summed over the ranks of a data-parallel group: the value is then
                 this batch's share of the concatenated batch's, its gradient that value's on this batch
    """
    _check_term(term, form)
    if eps is not None and term != "ortho":
        raise ValueError(f"eps is a parameter of L_o only, not of term {term!r}")
    if term == "aux":
        value, c = aux_loss_forward(cache.scores, cache.topk_idx, form, valid_mask=valid_mask,
                                    batch_shape=resolve_batch_shape(batch_shape, cache.scores.shape[0]),
                                    totals=totals)
    elif term == "ortho":
        value, c = ortho_loss_forward(cache.expert_out, form, eps=eps, topk_idx=cache.topk_idx,
                                      valid_mask=valid_mask, totals=totals)
    elif term == "var":
        value, c = var_loss_forward(cache.scores, cache.topk_idx, form, valid_mask=valid_mask, totals=totals)
    elif term == "z":
        value, c = zloss_forward(cache.logits, valid_mask, totals=totals)
    else:
        value, c = system_aux_forward(cache.scores, cache.topk_idx, form, valid_mask=valid_mask,
                                      batch_shape=resolve_batch_shape(batch_shape, cache.scores.shape[0]),
                                      totals=totals)
    return value, TermCache(term, form, c)


def term_backward(dloss, tcache: TermCache) -> Injection:
    """The gradient of ``dloss * term`` on the intermediate the term reads."""
    if tcache.term == "aux":
        return Injection(aux_loss_backward(dloss, tcache.loss_cache), None)
    if tcache.term == "ortho":
        return Injection(None, ortho_loss_backward(dloss, tcache.loss_cache))
    if tcache.term == "var":
        return Injection(var_loss_backward(dloss, tcache.loss_cache), None)
    if tcache.term == "z":
        return Injection(None, None, zloss_backward(dloss, tcache.loss_cache))
    return Injection(system_aux_backward(dloss, tcache.loss_cache), None)
