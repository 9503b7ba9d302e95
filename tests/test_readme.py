"""Every command line in the README, read from the README itself, so a command is covered the day it is written.

A command that needs nothing from the network runs with a tiny budget (the README's own flags win over the budget);
one that needs a hub model, a hub data set or a checkpoint from elsewhere (--preset, --model, --init-from, a named
--data) is parsed, which is where a flag that does not exist, or an abbreviation taken for another flag, fails.
Placeholders (ALGO, S, RUN, runs/default, ...) stand for a tiny run of the suite's own.
"""
import re
import shlex
from pathlib import Path

import pytest

import bench
import eval as evaluation
import grad_variance
import plot
import results
import train
from test_train import ALGO_TINY, TINY

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"train.py": train, "eval.py": evaluation, "results.py": results, "bench.py": bench,
           "grad_variance.py": grad_variance, "plot.py": plot}
PLACEHOLDERS = {"ALGO": "dropout_grpo", "S": "0", "R": "0", "DIR": "dir", "HOST:29500": "localhost:29500"}
RUN_DIRS = ("runs/default", "RUN/best", "RUN/init", "RUN/checkpoint", "RUN", "runs/coconut-dgrpo",
            "runs/latent-grpo-llama")


def readme_commands() -> list[tuple[int, str, list[str]]]:
    """(line, script, argv) for every `python SCRIPT ...` and `torchrun ... SCRIPT ...` in README.md."""
    lines = (ROOT / "README.md").read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):   # a shell line continued on the next
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        for m in re.finditer(r"(?:python|torchrun\b[^`#]*?)\s+(\w+\.py)\b([^`#&|\n]*)", line):
            if m.group(1) in SCRIPTS:
                argv = [PLACEHOLDERS.get(a, a) for a in shlex.split(m.group(2)) if a != "[flags]"]
                found.append((number, m.group(1), argv))
        i += 1
    return found


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    scripts = {s for _, s, _ in COMMANDS}
    assert {"train.py", "eval.py", "results.py", "bench.py", "grad_variance.py", "plot.py"} <= scripts
    assert any(argv == ["--p", "0", "--temperature", "0.01"] for _, _, argv in COMMANDS)


def needs_network(argv: list[str]) -> bool:
    flags = dict(zip(argv, argv[1:] + [""]))
    return (any(f in flags for f in ("--preset", "--init-from", "--help"))
            or flags.get("--model", "tiny") != "tiny" or flags.get("--data", "synthetic") != "synthetic")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("readme") / "run"
    train.main(["--out", str(out), *TINY, *ALGO_TINY["dropout_grpo"]])
    return out


@pytest.mark.parametrize("number, script, argv", COMMANDS, ids=[f"line{n}-{s}" for n, s, _ in COMMANDS])
def test_readme_command(number, script, argv, tiny_run, tmp_path, capsys):
    module = SCRIPTS[script]
    argv = [str(tiny_run / Path(a).name) if a in RUN_DIRS[1:4] else str(tiny_run) if a in RUN_DIRS else a
            for a in argv]
    if "--help" in argv:
        with pytest.raises(SystemExit) as stop:
            module.parse_args(argv)
        assert stop.value.code == 0 and "--p" in capsys.readouterr().out
        return
    if script != "train.py" or needs_network(argv):   # parsed: each script runs elsewhere in the suite
        module.parse_args(argv)
        return
    algo = argv[argv.index("--algo") + 1] if "--algo" in argv else "dropout_grpo"
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    summary = train.main([*TINY, *ALGO_TINY[algo], "--allow-degenerate", "true", *out, *argv])
    assert summary["algo"] == algo


def test_readme_eval_and_measurement_commands_run(tiny_run, tmp_path):
    """The README's eval.py and grad_variance.py commands on the tiny run, with few questions."""
    ran = 0
    for _, script, argv in COMMANDS:
        if script not in ("eval.py", "grad_variance.py") or needs_network(argv):
            continue
        argv = [str(tiny_run) if a in RUN_DIRS else a for a in argv]
        if script == "eval.py":
            report = evaluation.main([*argv, "--limit", "2", "--out", str(tmp_path / f"e{ran}.json")])
            assert report["results"]["synthetic"]["num_examples"] == 2
        else:
            report = grad_variance.main([*argv, "--repeats", "2", "--num-prompts", "2", "--num-generations", "2"])
            assert set(report["results"]) == {"shared", "per_step"}
        ran += 1
    assert ran >= 3
