"""Every metric of refmoe.study.metrics on hand-made cases whose answer is worked out in the comments."""
import math

import numpy as np
import pytest

from refmoe.study import metrics as M

from helpers import host, on


def test_max_vio_batch_and_absolute(xp):
    # loads [4, 2, 1, 1], mean N K / E = 8 / 4 = 2: (4 - 2) / 2 = 1; absolute max |dev| = 2 -> 1
    idx = on(xp, np.array([[0, 1], [0, 2], [0, 1], [3, 0]], dtype=np.int64))
    assert host(M.expert_loads(idx, 4)).tolist() == [4, 2, 1, 1]
    assert M.max_vio(idx, 4) == pytest.approx(1.0, abs=1e-15)
    # loads [3, 3, 0, 2], mean 2: Eq. 36 gives (3 - 2) / 2 = 0.5, the absolute form |0 - 2| / 2 = 1
    idx = on(xp, np.array([[0, 1], [0, 1], [0, 1], [3, 3]], dtype=np.int64))
    assert M.max_vio(idx, 4) == pytest.approx(0.5, abs=1e-15)
    assert M.max_vio(idx, 4, absolute=True) == pytest.approx(1.0, abs=1e-15)
    # perfect balance -> 0
    assert M.max_vio(on(xp, np.array([[0, 1], [2, 3]], dtype=np.int64)), 4) == 0.0


def test_rmse_curves():
    assert M.rmse_curves([0, 0, 0, 0], [1, 1, 1, 1]) == pytest.approx(1.0)
    assert M.rmse_curves([0.0, 3.0], [0.0, 0.0]) == pytest.approx(math.sqrt(4.5))
    with pytest.raises(ValueError, match="equal"):
        M.rmse_curves([1, 2], [1, 2, 3])


def test_routing_variance_two_notions(xp):
    E = 4
    uniform = on(xp, np.full((5, E), 1.0 / E))
    assert M.routing_variance_eq42(uniform) == pytest.approx(0.0, abs=1e-18)
    assert M.routing_variance_per_token(uniform) == pytest.approx(0.0, abs=1e-18)
    onehot = on(xp, np.tile([1.0, 0.0, 0.0, 0.0], (3, 1)))
    # Eq. 42: mean score [1, 0, 0, 0]; ((3/4)^2 + 3 (1/4)^2) / 4 = 3/16 = (E - 1) / E^2, its maximum
    assert M.routing_variance_eq42(onehot) == pytest.approx(3 / 16)
    # per token: deviations 3/4, -1/4 x3; squares sum to 3/4; / (E - 1) = 1/4; ddof 0: 3/16
    assert M.routing_variance_per_token(onehot) == pytest.approx(0.25)
    assert M.routing_variance_per_token(onehot, ddof=0) == pytest.approx(3 / 16)
    # confident but balanced routing: Eq. 42 says 0, the per-token variance says 1/4 (they are different notions)
    perm = on(xp, np.eye(E))
    assert M.routing_variance_eq42(perm) == pytest.approx(0.0, abs=1e-18)
    assert M.routing_variance_per_token(perm) == pytest.approx(0.25)


def test_expert_overlap_known_neighbourhoods(xp):
    pts = on(xp, np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]]))
    pure = on(xp, np.array([0, 0, 0, 1, 1, 1]))
    assert M.expert_overlap(pts, pure, k=2) == 0.0
    # k = 10 is clamped to N - 1 = 5: every point has 2 same-label and 3 other-label neighbours
    assert M.expert_overlap(pts, pure, k=10) == pytest.approx(0.6)
    # alternating labels: every nearest neighbour (ties to the lower index) has the other label
    alt = on(xp, np.array([0, 1, 0, 1, 0, 1]))
    assert M.expert_overlap(pts, alt, k=1) == pytest.approx(1.0)
    # k = 2 on the alternating line: the middle point of each triple (1, 4) has both neighbours of the other
    # label; the end points see one of each (e.g. point 2: point 1 differs, point 0 agrees; point 3 is 8 away)
    # -> point-wise fractions [.5, 1, .5, .5, 1, .5], mean 2/3
    assert M.expert_overlap(pts, alt, k=2) == pytest.approx(2 / 3)


def test_silhouette_hand_computed(xp):
    pts = on(xp, np.array([[0.0], [1.0], [10.0], [11.0]]))
    lab = on(xp, np.array([0, 0, 1, 1]))
    # s = 1 - a/b: point 0: a = 1, b = 10.5; point 1: a = 1, b = 9.5; symmetric for the other pair
    expect = (2 * (1 - 1 / 10.5) + 2 * (1 - 1 / 9.5)) / 4
    assert M.silhouette(pts, lab) == pytest.approx(expect, rel=1e-12)
    # a point alone in its label scores 0: points 0, 1 -> 1 - 1/5, 1 - 1/4; point 2 -> 0
    pts = on(xp, np.array([[0.0], [1.0], [5.0]]))
    assert M.silhouette(pts, on(xp, np.array([0, 0, 1]))) == pytest.approx((0.8 + 0.75) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="two distinct"):
        M.silhouette(pts, on(xp, np.array([1, 1, 1])))


def test_mutual_information(xp):
    a = on(xp, np.array([0, 1, 2, 3] * 5))
    assert M.mutual_information(a, a) == pytest.approx(2.0)              # log2(4) bits
    assert M.mutual_information(a, a, normalized=True) == pytest.approx(1.0)
    u, v = on(xp, np.array([0, 0, 1, 1])), on(xp, np.array([0, 1, 0, 1]))
    assert M.mutual_information(u, v) == pytest.approx(0.0, abs=1e-15)   # independent
    # B a coarsening of A: I = H(B) = 1 bit, normalised by H(A) = 2 bits -> 0.5
    b = on(xp, np.array([0, 0, 1, 1] * 5))
    assert M.mutual_information(a, b) == pytest.approx(1.0)
    assert M.mutual_information(a, b, normalized=True) == pytest.approx(0.5)


def test_normalized_mutual_information(xp):
    # 4 clusters, each sent to its own pair of experts: the expert determines the cluster (first = 1), but
    # H(expert) = 3 bits > H(cluster) = 2 bits, so the symmetric forms are below 1
    cl = xp.asarray(np.repeat(np.arange(4), 2))
    ex = xp.asarray(np.arange(8))
    assert M.normalized_mutual_information(cl, ex) == pytest.approx(1.0)
    assert M.normalized_mutual_information(cl, ex, average="arithmetic") == pytest.approx(2.0 / 2.5)
    assert M.normalized_mutual_information(cl, ex, average="geometric") == pytest.approx(2.0 / math.sqrt(6.0))
    assert M.normalized_mutual_information(cl, ex, average="max") == pytest.approx(2.0 / 3.0)
    assert M.normalized_mutual_information(cl, ex, average="min") == pytest.approx(1.0)
    # a 2 x 2 table with p = [[3, 1], [1, 3]] / 8: I = 1 - H_b(1/4) bits, H(A) = H(B) = 1 bit
    a = xp.asarray(np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    b = xp.asarray(np.array([0, 0, 0, 1, 1, 1, 1, 0]))
    hb = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    for avg in M.NMI_AVERAGES:
        assert M.normalized_mutual_information(a, b, average=avg) == pytest.approx(1.0 - hb)
    assert M.normalized_mutual_information(cl, ex) == pytest.approx(M.mutual_information(cl, ex, normalized=True))
    assert M.normalized_mutual_information(xp.asarray(np.zeros(4, dtype=np.int64)), ex[:4]) == 0.0
    with pytest.raises(ValueError, match="average"):
        M.normalized_mutual_information(cl, ex, average="mean")


def test_expert_output_cosines(xp):
    outs = on(xp, np.array([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]]))        # [N=1, E=3, D=2]
    C = host(M.expert_output_cosine(outs))
    assert np.allclose(C, [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-15)
    sel = on(xp, np.array([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [-2.0, 0.0]]]))   # [N=2, K=2, D=2]
    assert M.selected_output_cosine(sel) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    assert math.isnan(M.safe_cosine(on(xp, np.zeros(3)), on(xp, np.ones(3))))
    assert M.safe_cosine(on(xp, np.array([1.0, 1.0])), on(xp, np.array([-2.0, -2.0]))) == pytest.approx(-1.0)


def test_metric_inputs_checked():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        M.expert_overlap(np.zeros(4), np.zeros(4, dtype=int))
    with pytest.raises(TypeError):
        M.routing_variance_eq42([[0.5, 0.5]])
