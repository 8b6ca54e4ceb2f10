"""The study of ``refmoe reproduce`` timed at several worker counts, and its records compared across them.

    python3 benchmarks/bench_study_workers.py --backend cupy --seeds 4 --workers 1 2 4 8 --json OUT.json
    python3 benchmarks/bench_study_workers.py --backend numpy --seeds 2 --workers 1 2 --quick      # CPU smoke

Each worker count runs ``refmoe.study.runner.run_study`` on the default study (or ``--quick``'s sizes) with
seeds 0..S-1, both presets, every combination and the sweep, without the report. The script prints one JSON
line per count (wall seconds of the training and evaluation, and whether every record, the claims and the
summary equal those of the first count bit for bit), then the seconds per seed at each count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def main(argv=None) -> int:
    from refmoe.commands.reproduce import QUICK
    from refmoe.study.runner import StudyConfig, run_study

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="cupy")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--quick", action="store_true", help="the sizes of reproduce --quick")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.seeds < 1 or any(w < 1 for w in args.workers):
        ap.error("--seeds and --workers must be >= 1")

    base = {k: v for k, v in QUICK.items() if k != "seeds"} if args.quick else {}
    study = StudyConfig(**base, seeds=tuple(range(args.seeds)), backend=args.backend)
    rows, first = [], None
    for w in args.workers:
        t0 = time.perf_counter()
        res = run_study(study, status=lambda line: None, workers=w)
        wall = time.perf_counter() - t0
        parts = {p: getattr(res, p) for p in ("per_seed", "claims", "summary", "sweep")}
        first = parts if first is None else first
        row = {"workers": w, "seconds": round(res.seconds, 2), "wall_s": round(wall, 2),
               "per_seed_s": round(res.seconds / args.seeds, 2),
               "same_as_first": all(_same(parts[p], first[p]) for p in parts),
               "gpu": res.environment.get("gpu"), "cpus": res.environment["cpus"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"backend": args.backend, "seeds": args.seeds, "quick": args.quick,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, fh, indent=1)
    return 0 if all(r["same_as_first"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
