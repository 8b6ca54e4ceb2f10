"""refmoe golden: write golden fixtures, or check another implementation's dump against them."""
from __future__ import annotations

import argparse
import sys

HELP = "write golden fixtures (refmoe golden write DIR) or check a dump against them (refmoe golden check DIR DUMP)"


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line, ``refmoe golden: error: ...``, and exit code 2 (no usage block)."""

    def error(self, message):
        raise SystemExit(_error(message))

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if extra:                                 # else the top-level parser reports them with its usage
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace, extra


def add_arguments(parser):
    parser.error = _OneLineParser.error.__get__(parser)     # `refmoe golden nope` too
    sub = parser.add_subparsers(dest="golden_command", metavar="ACTION", parser_class=_OneLineParser)
    w = sub.add_parser("write", help="compute the golden cases and write DIR/<case>.npz and DIR/manifest.json")
    w.add_argument("directory", metavar="DIR")
    w.add_argument("--case", action="append", default=None, metavar="NAME",
                   help="write only this case (repeatable; default: the whole grid, see `refmoe golden list`)")
    w.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                   help="compute on this backend (default numpy; the files are byte-identical only on numpy)")
    c = sub.add_parser("check", help="compare DUMP/<case>.npz with DIR/<case>.npz tensor by tensor")
    c.add_argument("directory", metavar="DIR", help="golden directory written by `refmoe golden write`")
    c.add_argument("dump", metavar="DUMP", help="directory of your implementation's <case>.npz files")
    c.add_argument("--case", action="append", default=None, metavar="NAME", help="check only this case (repeatable)")
    c.add_argument("--rtol", default=None, metavar="X",
                   help="rtol for every case instead of the default of its dtype (finite, >= 0)")
    c.add_argument("--atol", default=None, metavar="X",
                   help="atol for every case instead of the default of its dtype (finite, >= 0)")
    c.add_argument("--require-all", action="store_true", help="fail when the dump lacks a case (default: skip it)")
    c.add_argument("--terms", action="append", default=None, metavar="T[,T...]",
                   help="check only these loss terms (task, aux, ortho, var, z) and the intermediates they need; "
                        "loss/total and grad/total only when every term of a case is chosen (repeatable)")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="print every tensor of every case (default: one line per failing case and a summary)")
    sub.add_parser("list", help="list the cases of the default grid")


def run(args) -> int:
    """0: written, listed, or the dump matches; 1: a mismatch; 2: bad input (one line on stderr)."""
    from ..golden import GoldenFormatError, check_dump, default_cases, write_golden
    from ..golden.checker import check_tolerance

    action = getattr(args, "golden_command", None)
    try:
        if action == "write":
            manifest = write_golden(args.directory, args.case, backend=args.backend)
            print(f"wrote {len(manifest['cases'])} case(s) and manifest.json to {args.directory}")
            return 0
        if action == "check":
            rtol = None if args.rtol is None else check_tolerance(_number(args.rtol), "--rtol")
            atol = None if args.atol is None else check_tolerance(_number(args.atol), "--atol")
            report = check_dump(args.directory, args.dump, cases=args.case, rtol=rtol, atol=atol,
                                require_all=args.require_all, terms=args.terms)
            print(report.format(verbose=args.verbose))
            return 0 if report.ok else 1
        if action == "list":
            for spec in default_cases():
                print(f"{spec.name:<24} {spec.dtype:<8} {spec.description}")
            return 0
    except (GoldenFormatError, ValueError) as exc:
        return _error(exc)
    except OSError as exc:                                   # an unwritable or unreadable path
        where = f"{exc.filename}: " if exc.filename else ""
        return _error(f"{where}{exc.strerror or exc}")
    return _error("no action given; usage: refmoe golden {write,check,list} ... (see refmoe golden --help)")


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text                                          # check_tolerance names it


def _error(message) -> int:
    print(f"refmoe golden: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
