"""Every claim about the paper's Lemma 1, Lemma 2 and its gradient formulas, with a verdict and its evidence.

``all_verdicts(seed)`` runs every check (seconds on one core) and returns a list of ``Verdict`` rows;
``all_findings(seed)`` returns the exploratory ``Finding`` rows (measurements that are no claim of the paper).
The ``refmoe lemmas`` command prints both, apart, and each row names the test in ``tests/`` that pins it.
Row ids: L1 Lemma 1, Aux L_aux, L2 Lemma 2, G gradient formulas, T1 the arithmetic of Table 1's headlines,
F2 / F3 the arithmetic of the numbers printed with Figs. 2 and 3.
The verdict words are defined once, in ``LEGEND``. Dimension letters as in the modules it calls: N tokens
(rows of S), n or E experts, k or K top-k, D output width.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from . import audit, lemma1, lemma1_losses, lemma1_opt, lemma1_supports, lemma2, table1
from .rows import ERRORS, LEGEND, Finding, Verdict

__all__ = ["ERRORS", "LEGEND", "Finding", "Verdict", "all_findings", "all_verdicts"]


def _lemma1(rng):
    rows = []
    ws = [lemma1.witness(N, n, k) for N, n, k in ((5, 4, 2), (7, 5, 3), (12, 8, 6), (9, 3, 2))]
    ok = all(lemma1.check_witness(w) for w in ws)
    w = ws[0]
    rows.append(Verdict("L1.witness", "Lemma 1 construction: a cycle of the balanced support, +/- delta around it, "
                        "keeps row sums, column sums and support and raises row variance",
                        "HOLDS" if ok else "FAILS",
                        f"exact (Fraction), round-robin support, (N,n,k) in (5,4,2),(7,5,3),(12,8,6),(9,3,2); e.g. "
                        f"(5,4,2): cycle {w.cycle}, gain 2 delta^2/k = {w.variance_gain[w.rows_on_cycle[0]]} on rows "
                        f"{w.rows_on_cycle}, 0 on the others",
                        "tests/test_lemma1.py::test_witness_exact"))
    ends = [lemma1.paper_delta_endpoint(*c) for c in ((5, 4, 2), (7, 5, 3))]
    lost = all(e.row_sums_kept and e.col_sums_kept and not e.support_kept for e in ends)
    nz = [[sum(1 for v in e.state[i] if v) for i in e.rows_on_cycle] for e in ends]
    gains = [lemma1.nonzero_variances(e)[e.rows_on_cycle[0]] for e in ends]
    promised = [2 * e.delta ** 2 / e.k for e in ends]
    rows.append(Verdict("L1.delta", "The proof's step size 0 < delta <= 1/k keeps k non-zeros per row and gives "
                        "each row on the cycle variance 2 delta^2 / k",
                        "HOLDS-IF" if lost and gains != promised else "HOLDS",
                        f"only for delta < 1/k. At delta = 1/k (exact) row and column sums are kept but the -delta "
                        f"entries reach 0: non-zeros of the rows on the cycle {nz[0]} for (5,4,2), {nz[1]} for "
                        f"(7,5,3), so the state leaves the lemma's class; and the variance of the non-zero entries "
                        f"(the lemma's definition) is {gains[0]} for k = 2 and {gains[1]} for k = 3, not 2 delta^2/k "
                        f"= {promised[0]}, {promised[1]}",
                        "tests/test_lemma1.py::test_delta_endpoint_loses_support"))
    cases = ((3, 4, 2), (4, 6, 2), (5, 4, 2), (5, 8, 2), (2, 4, 2))
    ar = {c: lemma1_supports.all_rows_state(*c) for c in cases}
    S3, cols3, var3 = lemma1_supports.three_rows_example()
    exact3 = all(c == Fraction(3, 4) for c in cols3) and all(v == Fraction(1, 16) for v in var3)
    feas = [c for c in cases if ar[c]["feasible"]]
    ok_rows = exact3 and feas == list(cases[:3]) and all(ar[c]["min_row_variance"] > 1e-6
                                                        and ar[c]["col_deviation"] < 1e-12 for c in feas)
    rows.append(Verdict("L1.all_rows", "Every row gains variance (statement (2) says 'each row') at exact column "
                        "balance N/n, on a support of our choice", "HOLDS-IF" if ok_rows else "FAILS",
                        "search over all supports (MILP, scipy milp) then an LP on the support found: (3,4,2), "
                        "(4,6,2), (5,4,2) have every column sum N/n (dev. "
                        f"{max(ar[c]['col_deviation'] for c in feas):.0e}) and every row's variance >= "
                        f"{min(ar[c]['min_row_variance'] for c in feas):.4f}; exact for (3,4,2): rows (1/4, 3/4) on "
                        "{0,1}, {0,2}, {0,3}, column sums 3/4, row variance 1/16. Infeasible on every support: "
                        "(5,8,2) (exact balance itself: >= 6 columns hold one entry 5/8, a row takes at most one, "
                        "5 rows) and (2,4,2) (balance forces (1/2, 1/2), see L1.exact_balance)",
                        "tests/test_lemma1.py::test_every_row_gains"))
    w1 = lemma1.witness(6, 4, 1)
    rows.append(Verdict("L1.k1", "Lemma 1 with k = 1", "FAILS" if w1.cycle is None else "HOLDS",
                        "a row with one non-zero has variance identically 0, and on every support the rows are "
                        f"leaves, so the graph is a forest: cycle-space dim {lemma1.cycle_space_dim(w1.support, 4)} "
                        "for (6,4,1)", "tests/test_lemma1.py::test_k1_no_cycle_no_variance"))
    scan = lemma1_supports.support_scan(8, 8)
    agree = all(r["searched"] == r["rule"] for r in scan)
    none_k2 = [(r["N"], r["n"], r["k"]) for r in scan if r["k"] >= 2 and not r["searched"]]
    rr_only = [(r["N"], r["n"], r["k"]) for r in scan if r["round_robin_dim"] == 0 and r["searched"]]
    rows.append(Verdict("L1.cycle", "A support with column degrees floor/ceil(Nk/n) and a cycle exists (the proof "
                        "assumes one)", "HOLDS-IF" if agree else "FAILS",
                        f"exhaustive search over such supports, all {len(scan)} (N,n,k) with N, n <= 8: a cyclic one "
                        f"exists iff N >= 2, k >= 2 and N k >= n + 2. {len(none_k2)} cases with k >= 2 have none "
                        f"(e.g. (2,4,2), (3,6,2), any N = 1); the round-robin support is a forest in "
                        f"{len(rr_only)} more, {', '.join(map(str, rr_only))}, where the search finds one, e.g. "
                        f"{lemma1_supports.cyclic_support(4, 5, 2)} for (4,5,2)",
                        "tests/test_lemma1.py::test_cycle_exists_iff"))
    N, n, k, state, dim = lemma1.forced_state_counterexample()
    forced = dim == 0 and all(lemma1.row_variance([v for v in row if v]) == 0 for row in state)
    rows.append(Verdict("L1.exact_balance", "Lemma 1 with exactly balanced columns, (N,n,k) = (2,4,2)",
                        "FAILS" if forced else "HOLDS",
                        "on every support: four columns each need a positive sum and there are four entries, so "
                        "the only state with every column sum N/n = 1/2 is rows (1/2,1/2) on disjoint columns: row "
                        "variance 0", "tests/test_lemma1.py::test_forced_state"))
    survey = lemma1_opt.balance_cost_survey(rng, n_instances=24, n_vertices=24)
    div = [r for r in survey if r["divisible"]]
    ndiv = [r for r in survey if not r["divisible"] and r["ratio"] is not None]
    infeas = sum(1 for r in survey if r["ratio"] is None)
    div_ok = all(abs(r["ratio"] - 1) < 1e-9 for r in div)
    worst = min((r["ratio"] for r in ndiv), default=float("nan"))
    strict = all(r["ratio"] < 1 - 1e-6 for r in ndiv)
    rows.append(Verdict("L1.opt", "Max row variance at exact column balance vs unconstrained max (scipy, 24 random "
                        "(N,n,k), round-robin support)", "HOLDS-IF" if div_ok and strict else "FAILS",
                        f"n | N: ratio 1 in {len(div)}/{len(div)} (balance costs nothing in the supremum); "
                        f"n not dividing N: ratio in [{worst:.3f}, {max((r['ratio'] for r in ndiv), default=1):.3f}] "
                        f"({len(ndiv)} cases), exact balance infeasible on that support in {infeas}",
                        "tests/test_lemma1.py::test_optimisation_survey"))
    return rows


def _lemma1_losses(rng):
    rows = []
    tab = lemma1_losses.joint_table()
    joint = all(abs(r["balanced_confident:aux_gap"]) < 1e-9 and abs(r["balanced_confident:var_gap"]) < 1e-9
                for r in tab)
    rows.append(Verdict("L1.loss_joint", "L_aux (paper_eq2, switch, deepseek_batch) at its balanced value and L_v "
                        "(paper, code, row_topk) at its infimum in one router state (N=8, E=4, K=2)",
                        "HOLDS" if joint else "FAILS",
                        "a confident balanced state reaches every L_aux balanced value and every L_v infimum "
                        "within 1e-9 (all 9 pairs); the balanced value is not L_aux's minimum (Aux.min)",
                        "tests/test_lemma1.py::test_loss_level_joint_optimum"))
    paper = [r for r in tab if r["var"] == "paper"][0]
    code = [r for r in tab if r["var"] == "code"][0]
    ident = lemma1_losses.paper_identity_check(rng)
    hidden = ident < 1e-12 and paper["collapsed_confident:var_gap"] > 1.0
    rows.append(Verdict("L1.hidden_balance", "L_v (paper Eq. 7) contains a balancing term",
                        "CONFIRMED" if hidden else "REFUTED",
                        f"identity L_v = -(1/n) sum s^2 + (N/n) sum sbar^2 to {ident:.1e}; a confident collapsed "
                        f"state is {paper['collapsed_confident:var_gap']:.2f} above the infimum for 'paper' but "
                        f"{code['collapsed_confident:var_gap']:.1e} for 'code' and 'row_topk' (neutral to balance)",
                        "tests/test_lemma1.py::test_paper_form_hides_balancing"))
    c = lemma1_losses.conflict_example()
    rows.append(Verdict("L1.loss_conflict", "L_aux (switch) and L_v (code) jointly minimisable when E does not "
                        "divide N (N=6, E=4, K=1)", "FAILS" if c["floor"] > 1 + 1e-9 else "HOLDS",
                        f"every confident state (L_v code at its infimum {c['var_code_infimum']}) has L_switch >= "
                        f"{c['floor']:.4f} > 1; the balanced value 1 needs near-uniform P (L_v code "
                        f"{c['uniform_var_code']:.1e})", "tests/test_lemma1.py::test_loss_level_conflict"))
    m = lemma1_losses.aux_minimum_not_balanced()
    below = all(m[f"aux:{a}"] < m[f"balanced:{a}"] - 1e-6 for a in lemma1_losses.LOSS_AUX)
    rows.append(Verdict("Aux.min", "Minimising L_aux means balanced loads (a property of L_aux, whose counts f carry "
                        "no gradient; no claim of Lemma 1)", "HOLDS" if not below else "FAILS",
                        f"K=2, N=8, E=4, every second choice on expert 0 (MaxVio {m['maxvio']}): switch "
                        f"{m['aux:switch']:.4f} < 2, deepseek_batch {m['aux:deepseek_batch']:.4f} < 1, paper_eq2 "
                        f"{m['aux:paper_eq2']:.3f} < 4, below their balanced values, with L_v code/row_topk at their "
                        f"infima (L_v paper {m['var_gap:paper']:.4f} above); K=1, uniform P, all tokens on one expert "
                        f"(MaxVio {m['k1_uniform_maxvio']}): switch = {m['k1_uniform_switch']:.6f}, its balanced value",
                        "tests/test_lemma1.py::test_aux_minimum_is_not_balance"))
    return rows


def _findings(rng):
    runs = [r for a in lemma1_losses.LOSS_AUX for v in lemma1_losses.LOSS_VAR
            for r in lemma1_losses.descent_search(a, v, rng)]
    fooled = sum(1 for r in runs if r["aux_gap"] <= 1e-3 and r["maxvio"] > 0)
    sens = lemma1_losses.descent_sensitivity(rng)
    txt = ", ".join(f"lr {s['lr']:g} / start x{s['init_scale']:g}: {s['balanced']}/{s['runs']}" for s in sens)
    return [Finding("L1.loss_descent", "Where does plain gradient descent on L_aux/balanced + L_v/|inf| end "
                    "(logits of N=8, E=4, K=2; lr 2, 600 steps, standard normal starts)?",
                    f"9 form pairs x 4 starts: {sum(1 for r in runs if r['maxvio'] == 0)}/{len(runs)} end balanced, "
                    f"{fooled} with L_aux at or below its balanced value while MaxVio > 0 (up to "
                    f"{max(r['maxvio'] for r in runs)}); {sum(1 for r in runs if r['end'] < r['start'])}/{len(runs)} "
                    f"lower their objective. It depends on the optimiser: switch + L_v code ends balanced in {txt} "
                    "starts (8 each)", "tests/test_lemma1.py::test_descent_search")]


def _lemma2(rng):
    rows = []
    ce = lemma2.printed_statement_counterexample()
    sc = lemma2.printed_statement_scan()
    parity = all(r["split"] == (r["inter"] % 2 == 0) for r in sc)
    rows.append(Verdict("L2.printed", "Lemma 2 as printed (A, B of equal size: A u B can be partitioned with "
                        "A n B = {} and |A| = |B|)",
                        "FAILS" if ce["literal_false"] and ce["split_impossible"] and parity else "HOLDS",
                        "read of the given A, B: false whenever they meet (A = B = {(0,0)}). Read as 'A u B splits "
                        "into two disjoint halves of equal size': false exactly when |A n B| is odd, since |A u B| "
                        f"= 2|A| - |A n B| (brute force over all {len(sc)} pairs of equal-size subsets of a 6-point "
                        "set, sizes 0-4); A = B = {(0,0)} is such a case",
                        "tests/test_lemma2.py::test_printed_statement_false"))
    ic = lemma2.intended_claim_check()
    rd = lemma2.random_data_construction(rng)
    ok = (ic["ortho_pairwise"] == 0.0 and ic["ortho_span"] == 0.0 and len(set(ic["loads"])) == 1
          and rd["ortho_pairwise"] == 0.0 and len(set(rd["loads"])) == 1)
    rows.append(Verdict("L2.intended", "Intended Lemma 2: orthogonal expert outputs (L_o = 0) with exactly equal loads",
                        "HOLDS-IF" if ok else "FAILS",
                        f"constructed in refmoe's layer with D >= E (private output coordinate per expert) and "
                        f"varied tokens: L_o pairwise = span = 0.0 exactly, loads {ic['loads']}, L_aux deepseek_batch "
                        f"{ic['deepseek_batch']:.12f} (balanced 1); also with Gaussian tokens (N={rd['N']} <= "
                        f"D={rd['D']}) and a router solved from them: loads {rd['loads']}, "
                        f"L_o = {rd['ortho_pairwise']}",
                        "tests/test_lemma2.py::test_intended_claim"))
    it = lemma2.identical_tokens_check()
    rows.append(Verdict("L2.identical", "Intended claim with identical tokens (K < E)",
                        "FAILS" if it["maxvio"] > 0 else "HOLDS",
                        f"one top-k set for every token: loads {it['loads']}, MaxVio {it['maxvio']} = E/K - 1",
                        "tests/test_lemma2.py::test_identical_tokens"))
    mv = [lemma2.best_maxvio_with_m_types(8, 2, m) for m in (1, 2, 3, 4)]
    rows.append(Verdict("L2.types", "Loads with m distinct token types (E=8, K=2)",
                        "HOLDS-IF" if mv[-1] == 0 and min(mv[:-1]) > 0 else "FAILS",
                        f"least MaxVio for m = 1..4: {[round(v, 3) for v in mv]}; 0 needs (m K) divisible by E",
                        "tests/test_lemma2.py::test_distinct_types"))
    b = lemma2.min_pairwise_unit(3, 2, rng)
    rows.append(Verdict("L2.D_lt_K", "Orthogonal outputs when D < K", "FAILS" if b > 1e-6 else "HOLDS",
                        f"K=3 unit outputs in D=2: least pairwise L_o {b:.6f} = K(K-D)/D = "
                        f"{lemma2.frame_bound(3, 2)} per token (> 0)", "tests/test_lemma2.py::test_d_less_than_k"))
    t = lemma2.tradeoff_odd_cycle(rng)
    lin = lemma2.tradeoff_linear_experts(rng)
    fixed_bound = t["balanced_min_ortho"] > 0.9
    free = lin["optimised_cos2"] < 1e-8 and lin["constructed_ortho"] < 1e-20 and lin["maxvio"] == 0
    rows.append(Verdict("L2.tradeoff", "Intended claim with few output dimensions (E=5, D=2, K=2, balanced cyclic "
                        "sets {i, i+1})", "HOLDS-IF" if fixed_bound and free else "FAILS",
                        f"holds if the outputs may depend on the token: the paper's linear experts x~_ij = theta_j x_i "
                        f"on 5 distinct tokens in R^2 reach a normalised overlap (sum of cos^2) of "
                        f"{lin['optimised_cos2']:.0e} by BFGS, and theta_j [x_j, x_(j-1)] = [e_1, e_2] gives L_o = "
                        f"{lin['constructed_ortho']:.0e} with unit outputs, MaxVio {lin['maxvio']}. Fails with one "
                        f"output direction per expert for all tokens: the odd cycle forces L_o >= "
                        f"{t['balanced_min_ortho']:.4f} (= 10 sin^2(pi/10)); one rerouted token (MaxVio "
                        f"{t['rerouted_maxvio']}) allows {t['rerouted_min_ortho']:.0e}",
                        "tests/test_lemma2.py::test_odd_cycle_tradeoff"))
    return rows


def _audit(rng):
    rows = []
    e9 = audit.audit_eq9(rng)
    rows.append(Verdict("G.eq9_10", "Eqs. 9, 10, 33: dL_v/ds_ij = -gamma 2(N-1)/(nN)(s_ij - sbar_j)",
                        "REFUTED" if e9["fd_error_paper"] > 1e-6 else "CONFIRMED",
                        f"paper/exact = {e9['ratio_min']:.6f} on every entry = (N-1)/N (N=7); exact -(2/n)(s-sbar) "
                        f"matches FD to rel. error {e9['fd_error_exact']:.0e}; the paper's form is off by plain error "
                        f"{e9['plain_error_paper']:.3f} = 1/N (rel. error {e9['fd_error_paper']:.3f})",
                        "tests/test_audit.py::test_eq9_ratio"))
    e8s = [audit.audit_eq8(rng, N=5, K=K, D=4) for K in (2, 3, 3, 4, 4)]
    e28 = audit.audit_eq27_28(rng)

    def span(key):
        return f"{min(e[key] for e in e8s):.2f}-{max(e[key] for e in e8s):.2f}"

    rows.append(Verdict("G.eq8", "Eqs. 8, 28: dL_o/dx~_ij = beta sum_k x~_k x~_k^T x~_j/(<x~_k,x~_k>+eps)",
                        "REFUTED" if min(e["fd_error_paper"] for e in e8s) > 1e-6 and e28["eq28_ortho"] > 1e-6
                        else "CONFIRMED",
                        f"5 random instances (K = 2..4): exact backward matches FD to rel. error "
                        f"{max(e['fd_error_exact'] for e in e8s):.0e}; Eq. 8 plain error {span('plain_error_paper')}, "
                        f"cosine {span('cosine')}, least-squares scale {span('best_scale')} (not a multiple: "
                        "missing factor 2 and the terms where x~_ij is the base of the projection); inside "
                        "Eq. 28's expert gradient: L_o term "
                        f"rel. error {e28['eq28_ortho']:.2f} vs FD, cosine {e28['eq28_ortho_cos']:.2f}",
                        "tests/test_audit.py::test_eq8_discrepancy"))
    e2 = audit.audit_eq20_23(rng)
    rows.append(Verdict("G.eq3_20", "Eqs. 3 = 20: dL/dtheta_Ej = dL_h/dtheta_Ej + alpha * 0 = sum_i x_i s_ij",
                        "REFUTED" if e2["eq20_sq"] > 1e-6 else "CONFIRMED",
                        f"linear scalar experts (the paper's model): the L_aux part is exactly "
                        f"{e2['aux_expert_block']}; the sum equals the exact gradient only when g_yi = dL_h/dy_i = 1 "
                        f"(L_h = sum_i y_i: rel. error {e2['eq20_sum']:.0e}); squared error: rel. error "
                        f"{e2['eq20_sq']:.2f}, cosine {e2['eq20_cos_sq']:.2f}. The factor g_yi is missing (Eq. 28 "
                        f"has it)", "tests/test_audit.py::test_eq20_23"))
    rows.append(Verdict("G.eq4_23", "Eqs. 4 = 23: dL/dtheta_R = sum_ij (x_i theta_Ej + alpha f_j) ds_ij/dtheta_R",
                        "REFUTED" if e2["eq23_sq"] > 1e-6 else "CONFIRMED",
                        f"the alpha f_j term is the exact L_aux (paper_eq2) router gradient (rel. error "
                        f"{e2['aux_router_term']:.0e}); the task term drops g_yi: exact for L_h = sum_i y_i "
                        f"({e2['eq23_sum']:.0e}), rel. error {e2['eq23_sq']:.2f} for a squared error; with vector "
                        "experts x_i theta_Ej is a vector where a number is needed (Eq. 9 prints the same term)",
                        "tests/test_audit.py::test_eq20_23"))
    e24 = audit.audit_eq24(rng)
    e24p = audit.audit_eq24(rng, alpha=1e-3)
    holds = e24[(True, 0.0)]["eq24_miss"] < 1e-12 and e24[(False, 0.0)]["eq24_miss"] > 0.1
    rows.append(Verdict("G.eq24", "Eq. 24: as experts become alike, dL/dtheta_R -> alpha sum_j f_j sum_i "
                        "ds_ij/dtheta_R", "HOLDS-IF" if holds else "FAILS",
                        f"only in the limit and with renormalised top-k gates (Eq. 1): identical experts give "
                        f"dL_h/dW_r = {e24[(True, 0.0)]['task_router']:.0e} (rows of S sum to 1), growing linearly "
                        f"with the spread ({e24[(True, 1e-3)]['task_router']:.1e} at 1e-3, "
                        f"{e24[(True, 1e-2)]['task_router']:.1e} at 1e-2). Miss of Eq. 24 on the total router "
                        f"gradient (||total - Eq. 24|| / ||total||) at spread 1e-3: "
                        f"{e24[(True, 1e-3)]['eq24_miss']:.1%} at alpha = 1, {e24p[(True, 1e-3)]['eq24_miss']:.0%} at "
                        f"the paper's alpha = 1e-3. With raw gates (DeepSeek-MoE-16B, V2-Lite) dL_h/dW_r stays "
                        f"{e24[(False, 0.0)]['task_router']:.2f} at spread 0 and the miss is "
                        f"{e24[(False, 0.0)]['eq24_miss']:.0%} (alpha = 1), {e24p[(False, 0.0)]['eq24_miss']:.0%} "
                        "(alpha = 1e-3)", "tests/test_audit.py::test_eq24_identical_experts"))
    rows.append(Verdict("G.eq27", "Eq. 27: dL/dtheta_Ej = sum_i 1{s_ij>0} (g_yi s_ij + beta dL_o/dx~_ij) "
                        "dx~_ij/dtheta_Ej", "CONFIRMED" if e28["eq27"] < 1e-7 else "REFUTED",
                        f"the chain rule, with the exact dL_o/dx~: matches FD to {e28['eq27']:.0e} (linear experts, "
                        f"K = 3); its task term alone (Eq. 28 at beta = 0) to {e28['eq28_task']:.0e}",
                        "tests/test_audit.py::test_eq27_28"))
    e33 = audit.audit_eq33(rng)
    rows.append(Verdict("G.eq10_34", "Eqs. 10, 33, 34: dL_h/ds_ij = g_yi^T x~_ij and alpha dL_aux/ds_ij = alpha f_j",
                        "CONFIRMED" if e33["gamma=0"] < 1e-12 else "REFUTED",
                        f"Eq. 33 at gamma = 0, pushed through ds_ij/dtheta_R, equals the exact router gradient "
                        f"(rel. error {e33['gamma=0']:.0e}); with gamma = 1 it is off by {e33['gamma=1']:.3f}, and "
                        f"by {e33['gamma=1,exact_v']:.0e} once its L_v term is replaced by the exact -(2/n)(s - sbar) "
                        "(G.eq9_10)", "tests/test_audit.py::test_eq33_terms"))
    blocks = audit.jacobian_blocks(rng)
    zero = all((r["experts"] == 0.0) if r["loss"] != "ortho" else (r["router"] == 0.0) for r in blocks)
    rows.append(Verdict("G.disjoint", "Sec. 3.2, within a layer (Sec. 2.1: 'for any given MoE layer'): 'L_aux and "
                        "L_v do not directly contribute gradients to the expert parameter matrix', 'L_o does not "
                        "affect the gradient with respect to routing parameters'", "CONFIRMED" if zero else "REFUTED",
                        "exact zero blocks (max |grad| = 0.0) for 3 L_aux, 3 L_v, 2 L_o forms; every form has a "
                        "non-zero gradient on x", "tests/test_audit.py::test_within_layer_zero_blocks"))
    ortho_router = max(r["router"] for r in blocks if r["loss"] == "ortho")
    rows.append(Verdict("G.lo_router", "L_o acts on theta_R through 'beta dL_o/ds_ij' (Sec. 3.2, after Eq. 10)",
                        "REFUTED" if ortho_router == 0.0 else "CONFIRMED",
                        f"dL_o/dW_r = {ortho_router} exactly (pairwise and span): L_o sees S only through the top-k "
                        "indicator. The paper also says the opposite (Sec. 3.2: 'L_o does not affect the gradient "
                        "with respect to routing parameters', Eqs. 31-32); "
                        "App. C.2 re-reads the sentence as an indirect effect through g^T x~",
                        "tests/test_audit.py::test_within_layer_zero_blocks"))
    leak = [audit.two_layer_leakage(rng, l, v) for l, v in (("ortho", "pairwise"), ("aux", "switch"))]
    leaks = leak[0]["layer1_router"] > 0 and leak[1]["layer1_experts"] > 0
    rows.append(Verdict("G.cross_layer", "The same separation across layers (the paper states it per layer, Sec. "
                        "2.1: 'for any given MoE layer')", "SCOPE" if leaks and zero else "CONFIRMED",
                        f"two residual layers (refmoe.stack): layer-2 L_o reaches layer-1 router (max "
                        f"{leak[0]['layer1_router']:.2e}); layer-2 L_aux reaches layer-1 experts (max "
                        f"{leak[1]['layer1_experts']:.2e}); FD rel. error {max(r['fd_error'] for r in leak):.0e}. "
                        "Through x every loss reaches every parameter upstream: the separation is per layer, as "
                        "stated, and no more", "tests/test_audit.py::test_cross_layer_leakage"))
    return rows


def all_verdicts(seed: int = 0) -> list[Verdict]:
    rng = np.random.default_rng(seed)
    return (_lemma1(rng) + _lemma1_losses(rng) + _lemma2(rng) + _audit(rng) + table1.table1_verdicts()
            + table1.load_number_verdicts())


def all_findings(seed: int = 0) -> list[Finding]:
    return _findings(np.random.default_rng(seed))
