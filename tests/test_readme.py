"""README.md stays true: its API tour runs, and .ci/run calls its test command verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_opens_with_main_job_and_test_commands():
    main_job, tests = (block.strip() for block in bash_blocks()[:2])
    assert "refmoe reproduce" in main_job
    assert "pytest" in tests and ".[test]" in tests
    assert README.index(main_job) < README.index("## A tour of the API")


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = bash_blocks()[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_api_tour_runs(capsys):
    code = re.search(r"## A tour of the API\n\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out.strip().splitlines()
    assert float(out[-1]) < 1e-7  # the gradient check printed by the tour (measured ~3e-10)
    objective_block = re.findall(r"```python\n(.*?)```", README, re.S)[1]
    exec(compile(objective_block, "README.md", "exec"), namespace)  # continues the tour's variables
    res = namespace["res"]
    assert float(res.losses["ortho"]) > 0 and res.grads["total"]["x"].shape == (32, 8)
