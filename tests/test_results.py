"""results.py: the statistics, the commands it runs, and one tiny end-to-end call (rows over seeds, a row that starts
from another row's initialisation, resuming)."""
import json
import math
import statistics
from pathlib import Path

from hypothesis import given, settings, strategies as st

import results


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=12))
def test_mean_se_is_the_standard_error(values):
    mean, se = results.mean_se(values)
    assert math.isclose(mean, statistics.fmean(values), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(se, statistics.stdev(values) / math.sqrt(len(values)), rel_tol=1e-6, abs_tol=1e-9)


def test_mean_se_of_one_value_has_no_error():
    assert results.mean_se([3.0])[0] == 3.0 and math.isnan(results.mean_se([3.0])[1])


def test_a_row_that_starts_from_another_trains_grpo_only_from_its_initialisation(tmp_path):
    row = next(r for r in results.TABLES["dropout_grpo"] if r.name == "p0")
    argv = results.command(tmp_path, "dropout_grpo", row, 2, results.TINY)
    start = argv.index("--model")
    # the start flags come after the budget's --cot-steps / --sft-steps, so argparse keeps them
    assert argv[start:start + 6] == ["--model", str(tmp_path / "dropout_grpo" / "default" / "seed2" / "init"),
                                     "--cot-steps", "0", "--sft-steps", "0"]
    assert argv.index("--cot-steps") < start and ["--p", "0"] == argv[argv.index("--p"):argv.index("--p") + 2]
    assert argv[-2:] == ["--out", str(tmp_path / "dropout_grpo" / "p0" / "seed2")]


def test_tiny_results_run_end_to_end_and_resume(tmp_path, capsys):
    argv = ["--tables", "dropout_grpo,latent_grpo", "--rows", "p0,no_one_sided", "--seeds", "0,1", "--jobs", "2",
            "--budget", "tiny", "--out", str(tmp_path)]
    out = results.main(argv)
    assert set(out["latent_grpo"]) == {"default", "no_one_sided"}
    runs = out["dropout_grpo"]
    assert set(runs) == {"default", "p0"}   # p0 needs default's initialisation, so default runs too
    for seed, (default, p0) in enumerate(zip(runs["default"], runs["p0"])):
        assert p0["cot_accuracy"] == default["cot_accuracy"]   # the same initialisation, so the same CoT model
        assert p0["init_accuracy"] == default["init_accuracy"]
        assert json.loads((tmp_path / "dropout_grpo" / "p0" / f"seed{seed}" / "config.json").read_text())["args"]["seed"] == seed
    table = (tmp_path / "results.md").read_text()
    assert "| Coconut initialisation -> Dropout-GRPO" in table and "| Latent-GRPO without one-sided noise" in table
    assert " ± " in table and "torch " in table
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 1]
    stamp = (tmp_path / "dropout_grpo" / "p0" / "seed0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert results.main(argv) == out   # everything done already: nothing runs again
    assert (tmp_path / "dropout_grpo" / "p0" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    assert table in capsys.readouterr().out


def test_unknown_table_is_one_line(capsys):
    try:
        results.parse_args(["--tables", "nope"])
    except SystemExit as e:
        assert e.code == 2
    assert "unknown table 'nope'" in capsys.readouterr().err
