"""refmoe reproduce: the specialisation study (broad pre-training, narrow fine-tuning under every loss
combination and both presets, several seeds), written to a report folder with a verdict per paper claim.

Every flag is checked before any work starts (one ``error:`` line, exit status 2). The report is written into a
temporary folder next to ``--out`` and moved into place at the end, so an interrupted run leaves the previous
report as it was, never a mix of new figures and a stale results.json; other files in ``--out`` are kept.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time

HELP = "train MoE blocks on synthetic clustered data and report which of the paper's claims this run supports"

QUICK = dict(d_model=16, d_hidden=16, n_experts=6, top_k=2, n_clusters=6, batch_size=128, pretrain_steps=60, sweep=(0.1,),
             finetune_steps=40, log_every=20, eval_tokens=256, overlap_points=200, seeds=(0, 1))


# flag -> StudyConfig field; these flags default to None = the study default (or the --quick value)
SIZE_FLAGS = {"pretrain_steps": "pretrain_steps", "finetune_steps": "finetune_steps", "log_every": "log_every",
              "batch_size": "batch_size", "d_model": "d_model", "d_hidden": "d_hidden", "experts": "n_experts",
              "top_k": "top_k", "shared": "n_shared", "clusters": "n_clusters", "narrow": "n_narrow",
              "eval_tokens": "eval_tokens"}
# StudyConfig field -> smallest value that makes sense
MINIMUM = {"pretrain_steps": 1, "finetune_steps": 1, "log_every": 1, "batch_size": 2, "d_model": 1, "d_hidden": 1,
           "n_experts": 2, "top_k": 1, "n_shared": 0, "n_clusters": 1, "n_narrow": 1, "eval_tokens": 2}
# the files a report consists of (refmoe.study.report and refmoe.study.figures); other files in --out are kept
REPORT_FILES = ("report.md", "results.json")


def add_arguments(parser):
    from ..study.runner import StudyConfig
    from ..study.train import COMBOS

    d = StudyConfig()
    parser.add_argument("--out", default="reproduce_report", help="report folder (default: %(default)s)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that train in parallel, one BLAS thread each (default: the CPU count, at "
                             "most 2 with numpy, at most 4 with cupy, where they share the GPU)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (about 20 s)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"number of seeds 0..S-1, at least 2 (default {len(d.seeds)})")
    for flag, field in SIZE_FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                            help=f"default {getattr(d, field)}")
    parser.add_argument("--data-parallel", action="store_true",
                        help="under mpiexec -n R: split every batch over the R ranks (MPI, numpy), the same numbers "
                             "as one process to round-off; rank 0 prints and writes the report")
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
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_true", help="print only errors and the final summary")
    talk.add_argument("--verbose", action="store_true", help="also print the losses at every logging step")


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
                  combos=tuple(dict.fromkeys(args.combos)))
    return StudyConfig(**fields)


# ----------------------------------------------------------------------------------------------
# checks before any work
# ----------------------------------------------------------------------------------------------

def _flag(field: str) -> str:
    name = next((f for f, v in SIZE_FLAGS.items() if v == field), field)
    return "--" + name.replace("_", "-")


def check_study(study) -> str | None:
    """What is wrong with the study's settings, in one line, or None."""
    if len(study.seeds) < 2:
        return f"--seeds {len(study.seeds)}: need at least 2 seeds: a verdict needs a spread over seeds"
    for field, low in MINIMUM.items():
        value = getattr(study, field)
        if value < low:
            return f"{_flag(field)} {value}: must be at least {low}"
    if study.top_k > study.n_experts:
        return f"--top-k {study.top_k} exceeds --experts {study.n_experts}"
    if study.n_narrow > study.n_clusters:
        return f"--narrow {study.n_narrow} exceeds --clusters {study.n_clusters}"
    if not (math.isfinite(study.lr) and study.lr > 0):
        return f"--lr {study.lr}: must be a finite number > 0"
    for flag, value in (("--pretrain-alpha", study.pretrain_alpha), ("--alpha", study.alpha),
                        ("--beta", study.beta), ("--gamma", study.gamma)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            return f"{flag} {value}: must be a finite number >= 0"
    for f in study.sweep:
        if not (math.isfinite(f) and f > 0):
            return f"--sweep {f}: every factor must be a finite number > 0"
    return None


def check_backend(backend: str) -> str | None:
    if backend != "cupy":
        return None
    from ..backend import cupy_status

    ok, why = cupy_status()
    return None if ok else (f"--backend cupy: CuPy cannot run here ({why}); use --backend numpy, or a machine "
                            "with a CUDA GPU and refmoe[cuda12] / refmoe[cuda13] installed")


def check_out(out: str) -> str | None:
    """--out must be a folder or not exist yet."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: exists and is not a folder"
    return None


def _staging_dir(out: str) -> str:
    """A new temporary folder next to --out (so the final move stays on one file system); OSError if it cannot."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)


def _report_files() -> set:
    from ..study.figures import FILE_NAMES

    return set(REPORT_FILES) | set(FILE_NAMES)


def _move_into_place(staging: str, out: str):
    """Put the finished report of ``staging`` at ``out``. A new folder, or one that holds nothing but a previous
    report, is swapped whole (old set aside, new renamed in, old removed). A folder that also holds other files
    (a README, a run log) keeps them: each report file is renamed over its old version, and report files this
    run did not write (a sweep figure from an earlier run) are removed."""
    out = os.path.abspath(out)
    report = _report_files()
    os.chmod(staging, 0o777 & ~_umask())            # mkdtemp made it private
    if not os.path.exists(out) or set(os.listdir(out)) <= report:
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
            os.rmdir(old)
            os.rename(out, old)
        os.rename(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    new = set(os.listdir(staging))
    for name in sorted(new):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    for name in sorted((report & set(os.listdir(out))) - new):
        os.remove(os.path.join(out, name))
    os.rmdir(staging)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# what MPI launchers put in each rank's environment: the group size
LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
LAUNCHER_RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _launcher(names) -> int | None:
    for name in names:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return None


def check_data_parallel(args, workers: int, backend: str) -> str | None:
    """What is wrong with how the command was launched for --data-parallel, in one line, or None."""
    ranks = _launcher(LAUNCHER_SIZE)
    if not args.data_parallel:
        if ranks is not None and ranks > 1:
            return (f"launched as one of {ranks} MPI ranks: add --data-parallel to split each batch over them "
                    "(without it every rank would run the whole study)")
        return None
    if backend != "numpy":
        return "--data-parallel: MPI moves host arrays; use --backend numpy"
    if args.workers is not None and workers > 1:
        return f"--workers {workers} with --data-parallel: each MPI rank trains in its own process"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "--data-parallel: mpi4py is not installed (pip install -e \".[mpi]\"), then mpiexec -n R refmoe reproduce ..."
    return None


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------

def run(args) -> int:
    from ..study.parallel import check_workers, default_workers
    from ..study.report import write_report
    from ..study.runner import Progress, count_runs, count_steps, fine_tuning_runs, run_study

    study = study_from_args(args)
    workers = default_workers(study.backend) if args.workers is None else args.workers
    if args.data_parallel and args.workers is None:
        workers = 1
    problem = (check_study(study) or check_workers(workers)
               or check_data_parallel(args, workers, study.backend) or check_backend(study.backend)
               or check_out(args.out))
    if problem:
        return _error(problem) if (_launcher(LAUNCHER_RANK) or 0) == 0 else 2     # one line, from rank 0
    comm = None
    if args.data_parallel:
        from ..distributed import MPICommunicator

        comm = MPICommunicator()
        if comm.rank != 0:                      # the other ranks train their rows and write nothing
            run_study(study, status=lambda line: None, comm=comm)
            return 0
    try:
        staging = _staging_dir(args.out)
    except OSError as exc:
        code = _error(f"--out {args.out}: cannot write there ({exc.strerror or exc})")
        if comm is not None and comm.size > 1:
            comm.mpi_comm.Abort(code)           # the other ranks are already waiting in the first all-reduce
        return code

    try:
        t0 = time.perf_counter()
        n_ft = len(fine_tuning_runs(study))
        n_sweep = n_ft - len(study.combos)
        progress = None
        if not args.quiet:
            sweep = f" + {_n(n_sweep, 'sweep run')}" if n_sweep else ""
            print(f"refmoe reproduce: {_n(len(study.seeds), 'seed')} x (pre-training + "
                  f"{_n(len(study.presets), 'preset')} x ({_n(len(study.combos), 'combo')}{sweep})) = "
                  f"{_n(count_runs(study), 'training run')} on {study.backend}"
                  f"{f', {workers} worker processes' if workers > 1 else ''}"
                  f"{f', data-parallel over {comm.size} MPI ranks' if comm is not None else ''}", flush=True)
            progress = Progress(count_runs(study), count_steps(study))
        status = progress.note if (progress is not None and args.verbose) else (lambda line: None)
        result = run_study(study, status=status, progress=progress, workers=workers, comm=comm)
        paths = write_report(result, staging, figures=not args.no_figures)
        _move_into_place(staging, args.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    print(f"\nverdicts (details in {args.out}/report.md):")
    width = max((len(r["id"]) for rows in result.claims.values() for r in rows), default=4)
    for preset, rows in result.claims.items():
        if len(study.combos) < 2:
            print(f"  [{preset}] only {len(rows)} verdict(s): the other claims compare two loss combinations (for "
                  f"example aux against aux+ortho+var), and --combos gave only {', '.join(study.combos)}")
        for r in rows:
            print(f"  [{preset}] {r['id']:<{width}} {r['verdict']:<14} {r['claim']}")
    print(f"wrote {args.out}/ ({', '.join([paths['markdown'], paths['json']] + paths['figures'])}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
