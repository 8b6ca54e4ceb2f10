"""refmoe reproduce: the specialisation study (broad pre-training, narrow fine-tuning under every loss
combination and both presets, several seeds), written to a report folder with a verdict per paper claim."""
from __future__ import annotations

import sys
import time

HELP = "train MoE blocks on synthetic clustered data and report which of the paper's claims this run supports"

QUICK = dict(d_model=16, d_hidden=16, n_experts=6, top_k=2, n_clusters=6, batch_size=128, pretrain_steps=60, sweep=(0.1,),
             finetune_steps=40, log_every=20, eval_tokens=256, overlap_points=200, seeds=(0, 1))


# flag -> StudyConfig field; these flags default to None = the study default (or the --quick value)
SIZE_FLAGS = {"pretrain_steps": "pretrain_steps", "finetune_steps": "finetune_steps", "log_every": "log_every",
              "batch_size": "batch_size", "d_model": "d_model", "d_hidden": "d_hidden", "experts": "n_experts",
              "top_k": "top_k", "shared": "n_shared", "clusters": "n_clusters", "narrow": "n_narrow",
              "eval_tokens": "eval_tokens"}


def add_arguments(parser):
    from ..study.runner import StudyConfig
    from ..study.train import COMBOS

    d = StudyConfig()
    parser.add_argument("--out", default="reproduce_report", help="report folder (default: %(default)s)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (about 20 s)")
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds 0..S-1 (default {len(d.seeds)})")
    for flag, field in SIZE_FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                            help=f"default {getattr(d, field)}")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--pretrain-alpha", type=float, default=d.pretrain_alpha,
                        help="L_aux coefficient in phase 1 (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=d.alpha,
                        help="L_aux coefficient in phase 2 for both presets (default %(default)s; "
                             "the presets' own value is 1e-3, see report.md)")
    parser.add_argument("--beta", type=float, default=None, help="L_o coefficient (default: the preset's)")
    parser.add_argument("--gamma", type=float, default=None, help="L_v coefficient (default: the preset's)")
    parser.add_argument("--presets", nargs="+", default=list(d.presets), choices=["paper", "authors_code"])
    parser.add_argument("--combos", nargs="+", default=list(d.combos), choices=list(COMBOS))
    parser.add_argument("--sweep", nargs="*", type=float, default=None,
                        help=f"factors on beta and gamma for extra aux+ortho+var runs (default {list(d.sweep)}; "
                             "give none to skip)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")


def study_from_args(args):
    """A StudyConfig from parsed flags: explicit flags win, then --quick sizes, then the study defaults."""
    from ..study.runner import StudyConfig

    base = QUICK if args.quick else {}
    fields = {k: v for k, v in base.items()}
    for flag, field in SIZE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            fields[field] = value
    if args.sweep is not None:
        fields["sweep"] = tuple(args.sweep)
    if args.seeds is not None:
        fields["seeds"] = tuple(range(args.seeds))
    fields.update(backend=args.backend, dtype=args.dtype, lr=args.lr, pretrain_alpha=args.pretrain_alpha,
                  alpha=args.alpha, beta=args.beta, gamma=args.gamma, presets=tuple(args.presets),
                  combos=tuple(args.combos))
    return StudyConfig(**fields)


def run(args) -> int:
    from ..backend import backend_name, get_xp
    from ..study.report import write_report
    from ..study.runner import run_study

    backend_name(args.backend)
    get_xp(args.backend)                        # fails early and clearly when CuPy is unusable
    study = study_from_args(args)
    if study.n_narrow > study.n_clusters:
        print(f"error: --narrow {study.n_narrow} exceeds --clusters {study.n_clusters}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    n_runs = len(study.seeds) * (1 + len(study.presets) * len(study.combos))
    print(f"refmoe reproduce: {len(study.seeds)} seeds x (pre-training + {len(study.presets)} presets x "
          f"{len(study.combos)} combos) = {n_runs} training runs on {study.backend}", flush=True)
    result = run_study(study, status=lambda line: print(line, flush=True))
    paths = write_report(result, args.out, figures=not args.no_figures)
    print(f"\nverdicts (details in {args.out}/report.md):")
    for preset, rows in result.claims.items():
        for r in rows:
            print(f"  [{preset}] {r['id']:<4} {r['verdict']:<14} {r['claim']}")
    print(f"wrote {paths['dir']}/ ({', '.join([paths['markdown'], paths['json']] + paths['figures'])}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
