"""Balancing-loss conventions of other systems: the property tests of docs/spec.md (section 6) and gradient checks."""
import numpy as np
import pytest

from refmoe import ops
from refmoe.gradcheck import check_vjp
from refmoe.losses import AUX_VARIANTS, aux_loss_backward, aux_loss_forward
from refmoe.losses import aux_conventions as conv
from helpers import assert_all_below, host, on, softmax_rows

E, K = 5, 2


def cyclic_scores(n_rows, n_experts, rng, shift=0):
    """Rows are cyclic shifts of one NON-uniform descending vector: every expert is chosen equally often
    (any K) and every column mean is exactly 1/E, yet no row is uniform."""
    v = softmax_rows(np.sort(rng.standard_normal(n_experts) * 1.5)[::-1][None, :])[0]
    return np.stack([np.roll(v, (t + shift) % n_experts) for t in range(n_rows)])


def routed(scores, k=K):
    return ops.topk_indices(scores, k)


def random_layer(rng, n, e=E, k=K):
    s = softmax_rows(rng.standard_normal((n, e)) * 1.3)
    return s, routed(s, k)


def single(name, scores, idx, **kw):
    """Single-layer value and d_scores for any convention (multi-layer ones on one layer)."""
    if name == "gshard_first_choice":
        loss, c = aux_loss_forward(scores, idx, "gshard_first_choice", valid_mask=kw.get("valid_mask"))
        return loss, aux_loss_backward(1.0, c)
    if name == "hf_mixtral":
        loss, c = conv.hf_mixtral_forward([(scores, idx)], valid_mask=kw.get("valid_mask"))
        return loss, conv.layers_backward(1.0, c)[0]
    if name.startswith("megatron_"):
        scope = name[len("megatron_"):]
        if scope == "seq":
            loss, c = aux_loss_forward(scores, idx, "megatron_seq", **kw)
            return loss, aux_loss_backward(1.0, c)
        loss, c = conv.megatron_forward([(scores, idx)], scope, **kw)
        return loss, conv.layers_backward(1.0, c)[0]
    raise AssertionError(name)


BATCH_FORMS = ["gshard_first_choice", "hf_mixtral", "megatron_micro_batch", "megatron_global"]
BALANCED = {"gshard_first_choice": 1.0, "hf_mixtral": float(K), "megatron_micro_batch": 1.0,
            "megatron_global": 1.0, "megatron_seq": 1.0}


# ----------------------------------------------------------------------------------------------
# registration and single-layer identities
# ----------------------------------------------------------------------------------------------

def test_megatron_seq_is_registered():
    assert "megatron_seq" in AUX_VARIANTS and AUX_VARIANTS["megatron_seq"].needs_batch_shape
    assert conv.balanced_value("hf_mixtral", 8, 2) == 2.0 and conv.balanced_value("megatron", 8, 2, 3) == 3.0


def test_single_layer_identities(rng):
    s, idx = random_layer(rng, 9)
    sw, _ = aux_loss_forward(s, idx, "switch")
    db, _ = aux_loss_forward(s, idx, "deepseek_batch")
    g1, _ = aux_loss_forward(s, idx[:, :1], "switch")
    assert float(single("hf_mixtral", s, idx)[0]) == pytest.approx(float(sw), rel=1e-14)
    assert float(single("megatron_micro_batch", s, idx)[0]) == pytest.approx(float(db), rel=1e-14)
    assert float(single("megatron_global", s, idx)[0]) == pytest.approx(float(db), rel=1e-14)
    assert float(single("gshard_first_choice", s, idx)[0]) == pytest.approx(float(g1), rel=1e-14)
    # and they are different numbers: xK normalisation, first choice only
    assert abs(float(sw) - float(db)) > 0.5 and abs(float(g1) - float(db)) > 1e-3


def test_megatron_seq_uses_sequence_major_order(rng):
    B, T = 2, 4
    s, idx = random_layer(rng, B * T)
    mseq, _ = aux_loss_forward(s, idx, "megatron_seq", batch_shape=(B, T))
    dseq, _ = aux_loss_forward(s, idx, "deepseek_seq", batch_shape=(B, T))
    # reorder tokens from t*B + b to b*T + t: the two agree exactly
    perm = np.arange(B * T).reshape(T, B).T.reshape(-1)
    dperm, _ = aux_loss_forward(s[perm], idx[perm], "deepseek_seq", batch_shape=(B, T))
    assert float(mseq) == pytest.approx(float(dperm), rel=1e-14)
    assert abs(float(mseq) - float(dseq)) > 1e-3


# ----------------------------------------------------------------------------------------------
# balanced value with NON-uniform P (and padding that must not disturb it)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BATCH_FORMS)
def test_balanced_value_nonuniform(xp, rng, name):
    s = cyclic_scores(2 * E, E, rng)
    assert np.ptp(s, axis=1).min() > 0.05                         # rows are far from uniform
    pad = softmax_rows(rng.standard_normal((3, E)) * 3)             # padding routed anywhere
    s_all = np.concatenate([s, pad])
    mask = np.r_[np.ones(2 * E, bool), np.zeros(3, bool)]
    loss, _ = single(name, on(xp, s_all), on(xp, routed(s_all)), valid_mask=on(xp, mask))
    assert float(loss) == pytest.approx(BALANCED[name], rel=1e-12)
    unmasked, _ = single(name, on(xp, s_all), on(xp, routed(s_all)))
    assert abs(float(unmasked) - BALANCED[name]) > 1e-3            # counting the padding breaks it


@pytest.mark.parametrize("scope", ["seq_registered", "megatron_seq_scope"])
def test_balanced_value_sequence_major(rng, scope):
    B, T = 3, E
    seqs = np.stack([cyclic_scores(T, E, rng, shift=b) for b in range(B)])   # [B, T, E]
    s = seqs.transpose(1, 0, 2).reshape(T * B, E)                            # token i = t*B + b
    idx = routed(s)
    if scope == "seq_registered":
        loss, _ = aux_loss_forward(s, idx, "megatron_seq", batch_shape=(B, T))
        assert float(loss) == pytest.approx(1.0, rel=1e-12)
    else:
        loss, _ = conv.megatron_forward([(s, idx), (s, idx)], "seq", batch_shape=(B, T))
        assert float(loss) == pytest.approx(2.0, rel=1e-12)            # 1 per layer, summed


def test_hf_mixtral_balanced_over_layers_not_per_layer(rng):
    """Concatenation: two layers each unbalanced but mirror images are balanced together (value K)."""
    s = cyclic_scores(E, E, rng)
    idx = routed(s)
    lay1 = (s[[0, 1, 0, 1, 0]], idx[[0, 1, 0, 1, 0]])
    lay2 = (s[[2, 3, 4, 2, 3]], idx[[2, 3, 4, 2, 3]])
    per_layer = [float(conv.hf_mixtral_forward([lay])[0]) for lay in (lay1, lay2)]
    together = float(conv.hf_mixtral_forward([lay1, lay2])[0])
    assert min(abs(v - K) for v in per_layer) > 1e-2
    assert together != pytest.approx(np.mean(per_layer), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# masked batch == truncated batch, values and gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BATCH_FORMS)
def test_masked_equals_truncated(xp, rng, name):
    s, idx = random_layer(rng, 11)
    mask = np.ones(11, bool)
    mask[[2, 7, 10]] = False
    lm, dm = single(name, on(xp, s), on(xp, idx), valid_mask=on(xp, mask))
    lt, dt = single(name, on(xp, s[mask]), on(xp, idx[mask]))
    assert float(lm) == pytest.approx(float(lt), rel=1e-13)
    np.testing.assert_allclose(host(dm)[mask], host(dt), rtol=1e-13, atol=1e-15)
    assert np.all(host(dm)[~mask] == 0)


def test_megatron_seq_masked_equals_truncated_sequences(rng):
    B, T = 3, 4
    s, idx = random_layer(rng, B * T)
    mask = np.ones((T, B), bool)
    mask[3, 0] = mask[2, 0] = mask[3, 2] = False                   # sequence-major [T, B]
    lm, _ = aux_loss_forward(s, idx, "megatron_seq", valid_mask=mask.reshape(-1), batch_shape=(B, T))
    dm = aux_loss_backward(1.0, _)
    rows = np.arange(B * T).reshape(T, B)
    parts = []
    for b in range(B):
        r = rows[mask[:, b], b]
        lb, cb = aux_loss_forward(s[r], idx[r], "megatron_seq", batch_shape=(1, len(r)))
        parts.append(float(lb))
        np.testing.assert_allclose(dm[r], aux_loss_backward(1.0, cb) / B, rtol=1e-13, atol=1e-16)
    assert float(lm) == pytest.approx(np.mean(parts), rel=1e-13)
    assert np.all(dm[~mask.reshape(-1)] == 0)


def test_hf_mixtral_masked_equals_truncated_multilayer(rng):
    layers = [random_layer(rng, 8) for _ in range(3)]
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 0], bool)
    lm, cm = conv.hf_mixtral_forward(layers, valid_mask=mask)
    lt, ct = conv.hf_mixtral_forward([(s[mask], i[mask]) for s, i in layers])
    assert float(lm) == pytest.approx(float(lt), rel=1e-13)
    for dm, dt in zip(conv.layers_backward(1.0, cm), conv.layers_backward(1.0, ct)):
        np.testing.assert_allclose(dm[mask], dt, rtol=1e-13, atol=1e-16)


# ----------------------------------------------------------------------------------------------
# seq == batch for one sequence; probabilities instead of logits; lower bounds
# ----------------------------------------------------------------------------------------------

def test_seq_equals_batch_for_one_sequence(rng):
    s, idx = random_layer(rng, 7)
    ls, cs = conv.megatron_forward([(s, idx)], "seq", batch_shape=(1, 7))
    lb, cb = conv.megatron_forward([(s, idx)], "micro_batch")
    assert float(ls) == pytest.approx(float(lb), rel=1e-14)
    np.testing.assert_allclose(conv.layers_backward(1.0, cs)[0], conv.layers_backward(1.0, cb)[0], rtol=1e-14)


@pytest.mark.parametrize("name", BATCH_FORMS + ["megatron_seq"])
def test_probabilities_instead_of_logits_changes_the_answer(rng, name):
    s, idx = random_layer(rng, 10)
    kw = {"batch_shape": (2, 5)} if name == "megatron_seq" else {}
    right, _ = single(name, s, idx, **kw)
    twice = softmax_rows(s)                                         # softmax applied to probabilities
    assert np.array_equal(routed(twice), idx)                       # same routing: only P moves
    wrong, _ = single(name, twice, idx, **kw)
    assert abs(float(wrong) - float(right)) > 1e-2 * abs(float(right))


@pytest.mark.parametrize("name", BATCH_FORMS)
def test_balanced_counts_or_k_equal_e_give_the_balanced_value(rng, name):
    """Where 'never below balanced' holds for any normalised scores: equal counts, or K = E."""
    s = softmax_rows(rng.standard_normal((2 * E, E)) * 2)
    idx = np.stack([(np.arange(K) + t) % E for t in range(2 * E)]).astype(np.int64)   # balanced counts
    assert float(single(name, s, idx)[0]) == pytest.approx(BALANCED[name], rel=1e-12)
    full = routed(s, E)
    value = float(single(name, s, full)[0])
    expected = {"hf_mixtral": float(E)}.get(name, 1.0 if name != "gshard_first_choice" else None)
    if expected is not None:
        assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["gshard_first_choice", "megatron_micro_batch", "hf_mixtral"])
def test_f_times_p_forms_can_go_below_balanced(name):
    """The f.P forms are NOT bounded below by their balanced value (E = 2, K = 1): 7/8 of it here."""
    s = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    idx = ops.topk_indices(s, 1)                                     # ties: lower expert index wins
    assert idx[:, 0].tolist() == [0, 0, 0, 1]
    assert float(single(name, s, idx)[0]) == pytest.approx(0.875, rel=1e-14)


# ----------------------------------------------------------------------------------------------
# micro-batch splitting
# ----------------------------------------------------------------------------------------------

def test_global_scope_is_invariant_to_micro_batch_splitting(rng):
    layers = [random_layer(rng, 8) for _ in range(2)]
    full, cfull = conv.megatron_forward(layers, "global")
    dfull = conv.layers_backward(1.0, cfull)
    cut = [slice(0, 3), slice(3, 8)]                                 # uneven micro-batches
    micro = [[(s[c], i[c]) for s, i in layers] for c in cut]
    stats = conv.megatron_global_counts(micro)
    total, grads = 0.0, [[], []]
    for mb in micro:
        loss, cache = conv.megatron_forward(mb, "global", global_counts=stats)
        total += float(loss)
        for l, d in enumerate(conv.layers_backward(1.0, cache)):
            grads[l].append(d)
    assert total == pytest.approx(float(full), rel=1e-13)
    for l in range(2):
        np.testing.assert_allclose(np.concatenate(grads[l]), dfull[l], rtol=1e-13)
    # the micro-batch scope is not invariant: each piece uses its own counts and token count
    local = np.mean([float(conv.megatron_forward(mb, "micro_batch")[0]) for mb in micro])
    assert abs(local - float(full)) > 1e-3


def test_seq_scope_is_invariant_to_splitting_whole_sequences(rng):
    B, T = 4, 3
    s, idx = random_layer(rng, B * T)
    full, cfull = conv.megatron_forward([(s, idx)], "seq", batch_shape=(B, T))
    rows = np.arange(B * T).reshape(T, B)
    parts = []
    for bs in ([0, 1], [2, 3]):
        r = rows[:, bs].reshape(-1)                                   # still sequence-major inside
        parts.append(float(conv.megatron_forward([(s[r], idx[r])], "seq", batch_shape=(2, T))[0]))
    assert np.mean(parts) == pytest.approx(float(full), rel=1e-13)


# ----------------------------------------------------------------------------------------------
# gradients (float64 central differences) and dtype
# ----------------------------------------------------------------------------------------------

def test_convention_gradients_fd(rng):
    layers = [random_layer(rng, 6) for _ in range(2)]
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    forms = {
        "hf_mixtral": lambda ls: conv.hf_mixtral_forward(ls, valid_mask=mask),
        "megatron_micro_batch": lambda ls: conv.megatron_forward(ls, "micro_batch", valid_mask=mask),
        "megatron_seq": lambda ls: conv.megatron_forward(ls, "seq", valid_mask=mask, batch_shape=(2, 3)),
        "megatron_global": lambda ls: conv.megatron_forward(ls, "global", valid_mask=mask),
    }
    for name, fwd in forms.items():
        loss, cache = fwd(layers)
        d = conv.layers_backward(1.0, cache)
        f = lambda inp: fwd([(inp["s0"], layers[0][1]), (inp["s1"], layers[1][1])])[0]
        errs = check_vjp(f, {"s0": layers[0][0], "s1": layers[1][0]}, {"s0": d[0], "s1": d[1]})
        assert_all_below(errs)                                       # measured ~1e-10; pass mark 1e-7
    s, idx = layers[0]
    loss, c = aux_loss_forward(s, idx, "gshard_first_choice", valid_mask=mask)
    errs = check_vjp(lambda inp: aux_loss_forward(inp["s"], idx, "gshard_first_choice", valid_mask=mask)[0],
                     {"s": s}, {"s": aux_loss_backward(1.0, c)})
    assert_all_below(errs)


def test_float32_stays_float32_and_bad_input(rng):
    s, idx = random_layer(rng, 6)
    s32 = s.astype(np.float32)
    loss, c = conv.hf_mixtral_forward([(s32, idx)])
    assert loss.dtype == np.float32 and conv.layers_backward(np.float32(1.0), c)[0].dtype == np.float32
    loss, c = conv.megatron_forward([(s32, idx)], "global")
    assert loss.dtype == np.float32
    with pytest.raises(ValueError, match="scope"):
        conv.megatron_forward([(s, idx)], "token")
    with pytest.raises(ValueError, match="non-empty"):
        conv.hf_mixtral_forward([])
    with pytest.raises(ValueError, match="layer 0"):
        conv.hf_mixtral_forward([(s, idx), (s[:4], idx[:4])])
    with pytest.raises(ValueError, match="logits"):
        aux_loss_forward(np.log(s), idx, "gshard_first_choice")


# ----------------------------------------------------------------------------------------------
# the same properties on random shapes
# ----------------------------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(E_=st.integers(2, 6), data=st.data())
def test_properties_on_random_shapes(E_, data):
    K_ = data.draw(st.integers(1, E_))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # balanced value with non-uniform P, for every convention (cyclic rows, m full cycles)
    m = data.draw(st.integers(1, 3))
    s = cyclic_scores(m * E_, E_, rng)
    idx = routed(s, K_)
    assert float(conv.hf_mixtral_forward([(s, idx), (s, idx)])[0]) == pytest.approx(K_, rel=1e-12)
    assert float(conv.megatron_forward([(s, idx)], "micro_batch")[0]) == pytest.approx(1.0, rel=1e-12)
    assert float(conv.megatron_forward([(s, idx)], "global")[0]) == pytest.approx(1.0, rel=1e-12)
    assert float(aux_loss_forward(s, idx, "gshard_first_choice")[0]) == pytest.approx(1.0, rel=1e-12)
    # masked == truncated for random scores and a random mask
    N = data.draw(st.integers(2, 9))
    s, idx = random_layer(rng, N, E_, K_)
    mask = rng.random(N) < 0.7
    mask[rng.integers(N)] = True
    for name in BATCH_FORMS:
        lm, dm = single(name, s, idx, valid_mask=mask)
        lt, dt = single(name, s[mask], idx[mask])
        assert float(lm) == pytest.approx(float(lt), rel=1e-12), name
        np.testing.assert_allclose(dm[mask], dt, rtol=1e-12, atol=1e-15)
        assert np.all(dm[~mask] == 0)


# ----------------------------------------------------------------------------------------------
# megatron-core 0.16.1 as written: seq_aux_loss with a padding mask, global_aux_loss under accumulation
# ----------------------------------------------------------------------------------------------

def test_seq_valid_over_b_is_seq_without_a_mask_and_shares_one_token_count_with_one(rng):
    B, T = 3, 4
    s, idx = random_layer(rng, B * T)
    plain = float(conv.megatron_forward([(s, idx)], "seq", batch_shape=(B, T))[0])
    assert float(conv.megatron_forward([(s, idx)], "seq_valid_over_b", batch_shape=(B, T))[0]) == \
        pytest.approx(plain, rel=1e-14)
    mask = np.ones(B * T, bool)
    mask[[1 * B + 2, 3 * B + 2, 3 * B + 1]] = False                   # tokens t*B + b: lengths 4, 3, 2
    got = float(conv.megatron_forward([(s, idx)], "seq_valid_over_b", valid_mask=mask, batch_shape=(B, T))[0])
    # by hand: T-bar = 9 / 3 = 3 for every sequence
    v = mask.reshape(T, B).astype(float)
    r = np.zeros((B * T, E)); np.put_along_axis(r, idx, 1.0, axis=1)
    c = (v[:, :, None] * r.reshape(T, B, E)).sum(0)                   # [B, E]
    S = (v[:, :, None] * s.reshape(T, B, E)).sum(0)                   # [B, E]
    assert got == pytest.approx((E / (K * 3.0 ** 2) * (c * S).sum(1)).mean(), rel=1e-13)
    own = float(conv.megatron_forward([(s, idx)], "seq", valid_mask=mask, batch_shape=(B, T))[0])
    assert abs(got - own) > 1e-3                                      # refmoe's own-length form differs
    with pytest.raises(ValueError, match="batch_shape"):
        conv.megatron_forward([(s, idx)], "seq_valid_over_b")


def test_global_accumulated_running_mean(rng):
    layers = [random_layer(rng, 8) for _ in range(2)]
    cut = [slice(0, 3), slice(3, 8)]
    micro = [[(s[c], i[c]) for s, i in layers] for c in cut]
    (l1, _), (l2, _) = conv.megatron_global_accumulated_forward(micro)
    # the first micro-batch sees only its own counts: the micro-batch scope
    assert float(l1) == pytest.approx(float(conv.megatron_forward(micro[0], "micro_batch")[0]), rel=1e-13)
    # the second: mean of both micro-batches' counts, its own 5 tokens
    want = 0.0
    for (s0, i0), (s1, i1) in zip(micro[0], micro[1]):
        cnt = lambda i: np.bincount(i.reshape(-1), minlength=E).astype(float)
        want += E / (K * 5.0 ** 2) * ((cnt(i0) + cnt(i1)) / 2 * s1.sum(0)).sum()
    assert float(l2) == pytest.approx(want, rel=1e-13)
    # unlike the data-parallel "global" pieces, these do not add up to the global-batch loss
    full = float(conv.megatron_forward(layers, "global")[0])
    assert abs(float(l1) + float(l2) - full) > 1e-3
    with pytest.raises(ValueError, match="non-empty"):
        conv.megatron_global_accumulated_forward([])


def test_new_megatron_conventions_gradients_fd(rng):
    layers = [random_layer(rng, 6) for _ in range(2)]
    mask = np.array([1, 1, 0, 1, 1, 0], bool)
    fwd = lambda ls: conv.megatron_forward(ls, "seq_valid_over_b", valid_mask=mask, batch_shape=(2, 3))
    loss, cache = fwd(layers)
    d = conv.layers_backward(1.0, cache)
    f = lambda inp: fwd([(inp["s0"], layers[0][1]), (inp["s1"], layers[1][1])])[0]
    assert_all_below(check_vjp(f, {"s0": layers[0][0], "s1": layers[1][0]}, {"s0": d[0], "s1": d[1]}))
    cut = [slice(0, 2), slice(2, 6)]
    masks = [mask[c] for c in cut]

    def pieces(inp):
        micro = [[(inp[f"s{l}_{m}"], layers[l][1][c]) for l in range(2)] for m, c in enumerate(cut)]
        return conv.megatron_global_accumulated_forward(micro, masks)

    inp = {f"s{l}_{m}": layers[l][0][c] for l in range(2) for m, c in enumerate(cut)}
    grads = {}
    for m, (_, cache) in enumerate(pieces(inp)):
        for l, g in enumerate(conv.layers_backward(1.0, cache)):
            grads[f"s{l}_{m}"] = g
    total = lambda inp: sum(loss for loss, _ in pieces(inp))
    assert_all_below(check_vjp(total, inp, grads))                   # measured ~1e-10; pass mark 1e-7
    s32 = [(s.astype(np.float32), i) for s, i in layers]
    assert fwd(s32)[0].dtype == np.float32
    assert conv.megatron_global_accumulated_forward([s32], [mask])[0][0].dtype == np.float32
