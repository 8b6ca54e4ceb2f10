"""Bad arguments at the command line: one line on stderr, exit code 2, no traceback and no work done."""
import pytest

from refmoe.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["--bogus"], "unrecognized arguments"),
    (["nope"], "invalid choice"),
    (["gradcheck", "--experts", "0"], "n_experts=0"),
    (["gradcheck", "--top-k", "9"], "top_k=9 exceeds n_experts=4"),
    (["gradcheck", "--tokens", "0"], "--tokens 0"),
    (["gradcheck", "--tol", "nan"], "--tol nan"),
    (["gradcheck", "--tokens", "x"], "invalid int value"),
    (["lemmas", "--seed", "x"], "invalid int value"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(main(argv))
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("refmoe"), err
