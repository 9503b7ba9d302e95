"""A run you can watch: samples.jsonl and the samples printed at each evaluation, --report-to, and plot.py."""
import contextlib
import io
import json
import shutil
import sys
import types

import pytest

import plot
import train
from test_train import ALGO_TINY, TINY

SAMPLE_KEYS = {"phase", "name", "step", "question", "completion", "gold", "prediction", "correct", "latent_steps"}


class FakeWriter:
    """torch.utils.tensorboard.SummaryWriter's two calls the loop makes, recorded."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """A tiny run with 2 samples per evaluation, reporting to a fake TensorBoard; what it printed."""
    out = tmp_path_factory.mktemp("watch") / "run"
    printed = io.StringIO()
    FakeWriter.made.clear()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
        train.main(["--out", str(out), *TINY, *ALGO_TINY["dropout_grpo"], "--samples", "2",
                    "--report-to", "tensorboard"])
    return out, printed.getvalue(), FakeWriter.made


def test_every_evaluation_writes_and_prints_its_samples(watched_run):
    out, printed, _ = watched_run
    rows = read_jsonl(out / "samples.jsonl")
    evals = [line.split(": accuracy")[0].removeprefix("[eval] ") for line in printed.splitlines()
             if line.startswith("[eval] ")]
    # CoT, initialisation (test, validation), GRPO step 1, final (test, validation), best: 2 samples each
    assert len(evals) == 7 and [r["name"] for r in rows] == [name for name in evals for _ in range(2)]
    assert all(set(r) - {"stage"} == SAMPLE_KEYS for r in rows)
    assert [(r["phase"], r["step"]) for r in rows[::2]] == [("sft", 0), ("init", 0), ("init", 0), ("rl", 1),
                                                            ("final", 2), ("final", 2), ("final", 2)]
    assert rows[0]["stage"] == 0 and isinstance(rows[0]["completion"], str) and isinstance(rows[0]["correct"], bool)
    lines = printed.splitlines()
    for i, line in enumerate(lines):   # each [eval] line is followed by its samples, one line each
        if line.startswith("[eval] "):
            assert all(s.startswith(("  right: gold ", "  wrong: gold ")) and len(s) < 240 for s in lines[i + 1:i + 3])


def test_the_tracker_gets_every_metric_under_its_name(watched_run):
    out, _, writers = watched_run
    assert len(writers) == 1 and writers[0].closed and writers[0].log_dir == str(out / "tensorboard")
    scalars = writers[0].scalars
    metrics = read_jsonl(out / "metrics.jsonl")
    for r in (r for r in metrics if r["phase"] == "rl"):
        assert {tag for tag, _, step in scalars if step == r["step"] and not tag.startswith("sft/")} == \
            set(r) - {"phase", "step"}
    sft = [r for r in metrics if r["phase"] == "sft"]
    assert [value for tag, value, _ in scalars if tag == "sft/loss"] == pytest.approx([r["loss"] for r in sft], abs=1e-6)
    steps = [step for tag, _, step in scalars if tag == "sft/loss"]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)   # one axis over every SFT stage


def test_resume_drops_the_samples_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"phase": "sft", "stage": 0, "step": 0}, {"phase": "init", "step": 0}, {"phase": "rl", "step": 1},
            {"phase": "rl", "step": 2}, {"phase": "final", "step": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.Logger(tmp_path, {"sft_stage": 5, "rl_step": 1, "init_accuracy": 0.0})
    assert read_jsonl(path) == rows[:3]        # GRPO step 2 and the final evaluations are done again
    train.Logger(tmp_path, {"sft_stage": 5, "rl_step": 0})   # the initialisation's evaluation was not saved
    assert read_jsonl(path) == rows[:1]


def test_a_resumed_run_has_each_evaluation_once(watched_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(watched_run[0], out)
    train.main(["--out", str(out), "--resume", "true", *TINY, *ALGO_TINY["dropout_grpo"], "--samples", "2",
                "--max-steps", "3"])
    seen = [(r["name"], r["step"]) for r in read_jsonl(out / "samples.jsonl")[::2]]
    assert len(seen) == len(set(seen)) and ("after GRPO", 3) in seen and ("after GRPO", 2) not in seen


@pytest.mark.parametrize("tracker, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_is_one_line_and_writes_nothing(tmp_path, monkeypatch, tracker, module):
    monkeypatch.setitem(sys.modules, module, None)   # import fails as if the package were not installed
    with pytest.raises(train.UserError) as error:
        train.main(["--out", str(tmp_path / "run"), *TINY, "--report-to", tracker])
    assert str(error.value) == f"--report-to {tracker} needs the {tracker} package: pip install {tracker}"
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(train.UserError, match="--report-to must be none, tensorboard or wandb"):
        train.main(["--out", str(tmp_path / "run"), *TINY, "--report-to", "mlflow"])


def test_wandb_plots_each_metric_against_its_phase_step(tmp_path, monkeypatch):
    """The W&B adapter with a fake wandb module: every metric defined once against its axis, every row logged."""
    calls = []
    run = types.SimpleNamespace(define_metric=lambda name, step_metric=None: calls.append(("define", name, step_metric)),
                                log=lambda values: calls.append(("log", values)), finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    logger = train.Logger(tmp_path, None, train.WandB(train.tracker_module("wandb"), tmp_path, {}))
    logger.log({"phase": "sft", "stage": 0, "step": 0, "loss": 2.0})
    logger.log({"phase": "sft", "stage": 0, "step": 9, "loss": 1.0})
    logger.log({"phase": "sft", "stage": 1, "step": 0, "loss": 1.5})
    logger.log({"phase": "rl", "step": 1, "loss": 0.0, "reward": 0.5})
    logger.close()
    logged = [c[1] for c in calls if c[0] == "log"]
    assert [v.get("sft/step", v.get("grpo/step")) for v in logged] == [0, 9, 10, 1]
    assert logged[-1] == {"grpo/step": 1, "loss": 0.0, "reward": 0.5}
    defined = {name: axis for _, name, axis in (c for c in calls if c[0] == "define")}
    assert defined == {"sft/step": None, "sft/stage": "sft/step", "sft/loss": "sft/step", "grpo/step": None,
                       "loss": "grpo/step", "reward": "grpo/step"}
    assert len([c for c in calls if c[0] == "define"]) == len(defined) and calls[-1] == ("finish",)


def test_tensorboard_writes_an_event_file_with_the_metric_names(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    train.main(["--out", str(out), *TINY, *ALGO_TINY["dropout_grpo"], "--report-to", "tensorboard"])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    metrics = read_jsonl(out / "metrics.jsonl")
    names = {f"sft/{k}" if r["phase"] == "sft" else k for r in metrics for k in r if k not in ("phase", "step")}
    assert set(events.Tags()["scalars"]) == names
    assert [e.step for e in events.Scalars("reward")] == [1, 2]


def test_plot_draws_the_run(watched_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, _, _ = watched_run
    png = plot.main([str(out), "--out", str(tmp_path / "run.png")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("metrics, message", [(None, "metrics.jsonl: no such file"),
                                              ("", "metrics.jsonl is empty"),
                                              ('{"phase": "rl", "step": 1, "reward": 0.5}\n', "needs matplotlib")])
def test_plot_errors_in_one_line(tmp_path, monkeypatch, capsys, metrics, message):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails as if matplotlib were not installed
    if metrics is not None:
        (tmp_path / "metrics.jsonl").write_text(metrics)
    with pytest.raises(SystemExit) as stop:
        plot.main([str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run.png").exists()
