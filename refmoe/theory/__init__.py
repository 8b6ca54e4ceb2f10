"""Numerical verification of the paper's Lemma 1 and Lemma 2 and an audit of its stated gradients.

Modules: ``lemma1`` (exact witness, cycle space), ``lemma1_opt`` (variance vs balance by optimisation),
``lemma1_losses`` (the same question with the actual L_aux and L_v forms), ``lemma2`` (counterexample,
construction, boundary), ``audit`` (paper gradients vs exact ones, Jacobian blocks), ``verdicts`` (the table
printed by ``refmoe lemmas``), ``figures`` (the Lemma 1 trade-off plot). Notes: ``theory/lemma1.md``,
``theory/lemma2.md``, ``theory/gradient-audit.md``.
"""
