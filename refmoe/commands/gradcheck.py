"""refmoe gradcheck: float64 finite-difference checks of the layer and the losses, on a chosen backend."""
from __future__ import annotations

import json
import time

HELP = "check every hand-derived gradient against float64 central differences and print the errors"


def add_arguments(parser):
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                        help="where to compute (default: $REFMOE_BACKEND, then numpy)")
    parser.add_argument("--tokens", type=int, default=8, help="N (default 8)")
    parser.add_argument("--d-model", type=int, default=5, help="D (default 5)")
    parser.add_argument("--d-hidden", type=int, default=3, help="H (default 3)")
    parser.add_argument("--experts", type=int, default=4, help="E (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="K (default 2)")
    parser.add_argument("--shared", type=int, default=1, help="shared experts (default 1)")
    parser.add_argument("--no-renorm", action="store_true", help="norm_topk_prob=False")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-6, help="pass mark for the relative error (default 1e-6)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from ..backend import BackendUnavailableError, backend_name, get_xp
    from ..cli import UsageError
    from ..config import MoEConfig
    from ..gradcheck import FD_ZERO_RESOLUTION, row_status, run_all_checks

    try:
        cfg = MoEConfig(d_model=args.d_model, d_hidden=args.d_hidden, n_experts=args.experts, top_k=args.top_k,
                        n_shared=args.shared, norm_topk_prob=not args.no_renorm)
        backend = backend_name(args.backend)
        get_xp(backend)
    except (ValueError, TypeError, BackendUnavailableError) as exc:
        raise UsageError(str(exc)) from None
    if args.tokens < 1:
        raise UsageError(f"--tokens {args.tokens}: need at least one token")
    if not args.tol > 0 or args.tol != args.tol or args.tol == float("inf"):
        raise UsageError(f"--tol {args.tol}: need a finite number > 0")
    start = time.perf_counter()
    rows = run_all_checks(cfg, args.tokens, backend=backend, seed=args.seed)
    elapsed = time.perf_counter() - start
    for r in rows:
        r["status"] = row_status(r, args.tol)
    ok = all(r["status"] != "FAIL" for r in rows)
    if args.json:
        print(json.dumps({"config": cfg.__dict__, "backend": backend, "tol": args.tol, "ok": ok,
                          "seconds": elapsed, "checks": rows}, indent=2))
    else:
        print(f"{cfg} on {backend}, N={args.tokens}, float64 central differences (h=1e-6)")
        width = max(len(r["check"]) for r in rows)
        for r in rows:
            if r["status"] == "zero":
                detail = f"zero gradient (differences {r['max_abs_numeric']:.0e} <= {FD_ZERO_RESOLUTION:g})"
            else:
                detail = f"rel. error {r['error']:.1e}  {r['status']}"
            print(f"  {r['check']:<{width}}  {r['wrt']:<14} {detail}")
        print(f"{'all' if ok else 'NOT all'} {len(rows)} checks within {args.tol:g} ({elapsed:.1f} s)")
    return 0 if ok else 1
