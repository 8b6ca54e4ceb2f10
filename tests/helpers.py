"""Small helpers shared by the tests (not fixtures)."""
import numpy as np

from refmoe.backend import to_numpy

# Pass mark for float64 central differences with h = 1e-6 (see refmoe/gradcheck.py): a correct backward
# gives around 1e-9 to 1e-11, a wrong one around 1e-1 to 1.
FD_TOL = 1e-7


def on(xp, a):
    """A host array moved to the test's backend (an explicit transfer, as the library requires)."""
    return xp.asarray(a) if xp is not np else np.asarray(a)


def softmax_rows(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def assert_all_below(errors: dict, tol: float = FD_TOL):
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


def host(a):
    return to_numpy(a)


def graphed_mode(xp) -> str:
    """The mode a ``refmoe.fast.GraphedStep`` must be in: "graph" on CuPy with the kernels on, else "eager"
    (NumPy, or CuPy under ``REFMOE_FAST_KERNELS=0``, where the references run and nothing is captured)."""
    from refmoe.fast.switch import kernels_on

    return "graph" if kernels_on(xp) else "eager"


def routing_key(cache):
    """What a finite-difference step must not change: the top-k indices, and the capacity keep mask if any."""
    if getattr(cache, "keep", None) is None:
        return cache.topk_idx
    return np.concatenate([to_numpy(cache.topk_idx), to_numpy(cache.keep).astype(np.int64)], axis=1)


def layer_fd_errors(cfg, params, x, phi, grads, *, names=None, forward=None):
    """The one "layer + loss checked by finite differences" of the suite.

    Differentiates phi(y, cache) of forward(x, params, cfg) (a scalar: <dy, y> plus whatever losses of the
    cache) by float64 central differences in x and the parameters, every step checked to keep the routing
    (:func:`routing_key`), and compares with ``grads``, the hand-derived gradients for ``names`` (default:
    x and every parameter). Returns name -> relative error (pass mark FD_TOL).
    """
    from refmoe import gradcheck, moe_forward

    forward = moe_forward if forward is None else forward

    def run(inp):
        return forward(inp["x"], {k: inp.get(k, v) for k, v in params.items()}, cfg)

    return gradcheck.check_vjp(lambda inp: phi(*run(inp)), dict(params, x=x), grads, names=names,
                               guard=lambda inp: routing_key(run(inp)[1]))
