"""End-to-end tests of the shared loop: the CLIs on a tiny budget, bad input, resume, and the loop's own plumbing."""
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval as evaluation
import train

ROOT = Path(__file__).resolve().parent.parent
# The smallest run that still goes through every phase: CoT SFT, each latent stage, evaluation, GRPO, checkpoint.
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--cot-steps", "2", "--sft-steps", "1",
        "--sft-batch-size", "4", "--max-steps", "2", "--num-prompts", "2", "--num-generations", "2",
        "--eval-size", "4", "--eval-every", "1", "--save-every", "1"]
ALGO_TINY = {"dropout_grpo": ["--max-new-tokens", "12"], "latent_grpo": ["--max-response-length", "12", "--latent-stages", "1"]}


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module", params=["dropout_grpo", "latent_grpo"])
def finished_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    summary = train.main(["--algo", request.param, "--out", str(out), *TINY, *ALGO_TINY[request.param]])
    return request.param, out, summary


def test_run_writes_every_output(finished_run):
    algo, out, summary = finished_run
    for key in ("algo", "init_accuracy", "final_accuracy", "mean_latent_steps", "steps", "wall_seconds"):
        assert key in summary
    assert summary["algo"] == algo and summary["steps"] == 2
    assert json.loads((out / "summary.json").read_text()) == summary
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["algo"] == algo and config["args"]["max_steps"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "latent/mean_steps",
                "loss", "clip_ratio", "time/rollout", "eval/accuracy"):
        assert key in rl[0], key
    sft_stages = {r["stage"] for r in records if r["phase"] == "sft"}
    assert sft_stages == set(range(len(sft_stages))) and len(sft_stages) >= 2  # CoT plus at least one latent stage


def test_checkpoint_loads_with_plain_transformers_and_eval_cli(finished_run):
    algo, out, _ = finished_run
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(out / "checkpoint")
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert not list(out.glob(".checkpoint-*")), "a temporary checkpoint directory was left behind"
    result = run_cli("eval.py", "--checkpoint", str(out), "--limit", "3", "--runs", "2", "--k", "1,2",
                     "--out", str(out / "e.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "e.json").read_text())["results"]["synthetic"]
    assert report["num_examples"] == 3 and 0.0 <= report["accuracy"] <= 1.0 and "pass@2" in report


def test_grpo_from_the_saved_initialisation(finished_run, tmp_path):
    """RUN/init is the latent initialisation; with no SFT steps a new run starts GRPO from exactly those weights."""
    algo, out, summary = finished_run
    assert json.loads((out / "init" / "algorithm.json").read_text())["stage"] >= 1
    again = train.main(["--algo", algo, "--out", str(tmp_path / "rl"), *TINY, *ALGO_TINY[algo], "--model",
                        str(out / "init"), "--cot-steps", "0", "--sft-steps", "0", "--allow-degenerate", "true"])
    assert again["init_accuracy"] == summary["init_accuracy"] and again["cot_accuracy"] is None
    assert not [line for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines() if '"sft"' in line]
    assert not (tmp_path / "rl" / "init").exists(), "init/ is a copy of a trained initialisation; this run trained none"


def test_resume_continues_from_the_checkpoint(finished_run, tmp_path):
    algo, out, _ = finished_run
    summary = train.main(["--algo", algo, "--out", str(out), "--resume", "true", *TINY, *ALGO_TINY[algo],
                          "--max-steps", "3"])
    assert summary["steps"] == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "rl"]
    assert steps == [1, 2, 3]  # step 3 only: neither SFT nor the first two GRPO steps ran again


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("algo", ["dropout_grpo", "latent_grpo"])
def test_one_grpo_update_changes_every_trainable_parameter(algo, beta):
    """TRL's anchor: with rewards that differ inside each group, one update moves every trainable parameter; with
    beta > 0 a frozen reference (a copy of the policy, as run_rl makes it) enters through the k3 KL, 0 at the start."""
    # an untrained model never stops, and Latent-GRPO's invalid-sample masking rightly zeroes truncated samples
    extra = ["--invalid-mask", "false"] if algo == "latent_grpo" else []
    extra += ["--beta", str(beta)]
    args, algo_cls, cfg = train.parse_args(["--algo", algo, *TINY, *ALGO_TINY[algo], "--learning-rate", "1e-2", *extra])
    torch.manual_seed(0)
    model, tokenizer = train.build_model(args, args.model)
    method = algo_cls(model, tokenizer, cfg, add_tokens=True)
    method.stage = method.num_stages
    model.eval()
    generator = torch.Generator().manual_seed(0)
    rollout = method.rollout(model, ["Ann has 3 pens. How many pens now?", "Ben has 2 cards. How many cards now?"], 2, generator)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if beta else None
    metrics = train.grpo_step(args, method, model, ref, opt, rollout, rewards)
    assert metrics["grad_norm"] > 0
    if beta:
        assert abs(metrics["kl"]) < 1e-6  # the policy equals its reference before the step
    unchanged = [n for n, p in model.named_parameters() if n in trainable and torch.equal(p, trainable[n])]
    assert not unchanged, f"not updated: {unchanged}"


def test_select_and_concat_rollouts_are_inverse():
    """Dynamic sampling keeps whole groups and stitches batches together, field by field."""
    args, algo_cls, cfg = train.parse_args(["--algo", "dropout_grpo", *TINY, *ALGO_TINY["dropout_grpo"]])
    model, tokenizer = train.build_model(args, args.model)
    method = algo_cls(model, tokenizer, cfg, add_tokens=True)
    model.eval()
    rollout = method.rollout(model, ["Ann has 3 pens.", "Ben has 2 cards.", "Cara has 9 books."], 2, torch.Generator().manual_seed(1))
    parts = [train.select_rows(rollout, train.group_rows([g], 2)) for g in range(3)]
    joined = train.concat_rollouts(parts)
    for f in dataclasses.fields(rollout):
        a, b = getattr(rollout, f.name), getattr(joined, f.name)
        if torch.is_tensor(a):
            assert torch.equal(a, b), f.name
        else:
            assert len(a) == len(b) and all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b)), f.name


def test_help_documents_every_knob():
    for algo in ("dropout_grpo", "latent_grpo"):
        result = run_cli("train.py", "--algo", algo, "--help")
        assert result.returncode == 0
        flags = [f.name for f in dataclasses.fields(train.Args)]
        flags += [f.name for f in dataclasses.fields(evaluation.algorithm_class(algo).Config)]
        docs = {**train.field_docs(train.Args), **train.field_docs(evaluation.algorithm_class(algo).Config)}
        for name in flags:
            assert "--" + name.replace("_", "-") in result.stdout, name
            assert docs.get(name), f"{name} has no docstring"


def test_an_algorithm_can_change_the_loops_defaults():
    assert train.parse_args(["--algo", "latent_grpo"])[0].learning_rate == 3e-5
    assert train.parse_args(["--algo", "latent_grpo", "--learning-rate", "1e-3"])[0].learning_rate == 1e-3
    assert train.parse_args(["--algo", "dropout_grpo"])[0].learning_rate == train.Args.learning_rate


def test_parse_bool_is_explicit():
    assert train.parse_args(["--resume", "False"])[0].resume is False
    assert train.parse_args(["--resume", "true"])[0].resume is True


def bad_data_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2"}\n')
    return str(path)


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--algo", "ppo"], "ppo"),
    (lambda t: ["--p", "1.5"], "--p"),
    (lambda t: ["--num-generations", "1"], "--num-generations"),
    (lambda t: ["--data", bad_data_file(t)], "row 1"),
    (lambda t: ["--model", str(t / "no-such-model")], "--model"),
    (lambda t: ["--algo", "latent_grpo", "--top-k", "0"], "top"),
    (lambda t: ["--algo", "latent_grpo", "--noise-scale", "-1"], "noise"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, make_args, message):
    out = tmp_path / "out"
    result = run_cli("train.py", "--out", str(out), *make_args(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("where, message", [
    ("file", "is a file, not a directory"),
    ("file/run", "file is a file, not a directory"),
])
def test_out_on_a_file_is_one_line(tmp_path, where, message):
    (tmp_path / "file").write_text("not a run")
    result = run_cli("train.py", "--out", str(tmp_path / where), *TINY)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert (tmp_path / "file").read_text() == "not a run"


def test_out_without_write_permission_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(train.os, "access", lambda path, mode: Path(path) != tmp_path)   # root may write anywhere
    with pytest.raises(train.UserError, match=f"no permission to write in {tmp_path}"):
        train.main(["--out", str(tmp_path / "a" / "run"), *TINY])
    assert list(tmp_path.iterdir()) == []


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    result = run_cli("train.py", "--out", str(out))
    assert result.returncode == 2 and "--resume" in result.stderr
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_validation_selects_and_test_scores_the_report(tmp_path, monkeypatch):
    """During GRPO only validation questions are evaluated; RUN/best holds the best validation checkpoint, and
    test is scored for the report rows (CoT, initialisation, final, best)."""
    import data
    splits = data.synthetic_splits(0)
    val_q, test_q = {r["question"] for r in splits["validation"][:4]}, {r["question"] for r in splits["test"][:4]}
    seen = []
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda algo, model, records, args, name, *logger, **where:
                        seen.append((name, {r["question"] for r in records}))
                        or real(algo, model, records, args, name, *logger, **where))
    out = tmp_path / "run"
    summary = train.main(["--out", str(out), *TINY, *ALGO_TINY["dropout_grpo"]])
    during = [q for name, q in seen if name.startswith("grpo step") or "(validation)" in name]
    assert during and all(q == val_q for q in during)
    assert [name for name, q in seen if q == test_q][:2] == ["after CoT SFT (stage 0)", "latent initialisation"]
    assert (out / "best" / "algorithm.json").is_file()
    assert summary["val_best_accuracy"] == max(summary["val_init_accuracy"], summary["val_final_accuracy"],
                                               summary["val_best_accuracy"])
    assert 0 <= summary["best_step"] <= 2 and summary["val_size"] == 4 and "test_best_accuracy" in summary


@pytest.mark.parametrize("steps", [7, 100, 2000])
def test_sft_lr_factor_warms_up_then_holds_or_decays_to_zero(steps):
    import math
    import train

    warmup = max(1, min(100, steps // 10))
    constant = [train.sft_lr_factor(s, steps, "constant") for s in range(steps)]
    cosine = [train.sft_lr_factor(s, steps, "cosine") for s in range(steps)]
    assert constant[:warmup] == cosine[:warmup] == [(s + 1) / warmup for s in range(warmup)]
    assert constant[warmup:] == [1.0] * (steps - warmup)
    assert all(a >= b for a, b in zip(cosine[warmup - 1:], cosine[warmup:]))   # non-increasing after the warmup
    assert 0 < cosine[-1] < 0.5 * (1 - math.cos(math.pi / (steps + 1 - warmup))) + 1e-12   # the last step, near 0
    assert train.sft_lr_factor(0, steps, "constant", warmup=False) == 1.0


def test_environment_names_versions_and_kernels():
    env = evaluation.environment("cpu")
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert all(env[k] for k in ("python", "transformers", "tokenizers"))


def test_resume_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    """A run killed after its last checkpoint logged rows it will log again: --resume drops them, so no step appears
    twice (SFT rows of the stage it had not finished, GRPO rows after the checkpoint's step)."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"phase": "sft", "stage": 0, "step": 0}, {"phase": "sft", "stage": 1, "step": 0},
            {"phase": "rl", "step": 1}, {"phase": "rl", "step": 2}, {"phase": "rl", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.Logger(tmp_path, {"sft_stage": 2, "rl_step": 2}).log({"phase": "rl", "step": 3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:4] + [{"phase": "rl", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    train.Logger(tmp_path, {"sft_stage": 1, "rl_step": 0})   # killed during stage 1: its rows go, stage 0's stay
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:1]


@pytest.mark.parametrize("at_step, where", [(1, "at the latent initialisation, before GRPO"), (2, "at GRPO step 1")])
def test_ctrl_c_names_the_checkpoint_and_leaves_it_consistent(tmp_path, monkeypatch, at_step, where):
    """Interrupted in GRPO's first step (the checkpoint is the initialisation's, validation scored) or its second."""
    real = train.grpo_step
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "grpo_step", interrupted)
    out = tmp_path / "run"
    with pytest.raises(train.Interrupted, match=f"{where}; continue it with --resume true"):
        train.main(["--out", str(out), *TINY, *ALGO_TINY["dropout_grpo"]])
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["rl_step"] == at_step - 1 and "val_best_accuracy" in state and not list(out.glob(".checkpoint-*"))
    monkeypatch.setattr(train, "grpo_step", real)
    summary = train.main(["--out", str(out), "--resume", "true", *TINY, *ALGO_TINY["dropout_grpo"]])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "rl"]
    assert summary["steps"] == 2 and steps == [1, 2]


def test_ctrl_c_on_the_command_line_is_one_line_and_exit_130(tmp_path):
    """The CLI's contract, with SIGINT raised inside GRPO's first step (a subprocess, so the signal is real)."""
    script = ("import os, signal, sys, train\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"   # as at a terminal, even under nohup / &
              "real = train.grpo_step\n"
              "def step(*a, **k):\n    os.kill(os.getpid(), signal.SIGINT)\n    return real(*a, **k)\n"
              "train.grpo_step = step\n"
              "sys.argv = ['train.py', *sys.argv[1:]]\n"
              "train.cli()\n")
    result = run_cli("-c", script, "--out", str(tmp_path / "run"), *TINY, *ALGO_TINY["dropout_grpo"])
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr.strip().splitlines()[-1]


def test_sigint_while_a_checkpoint_moves_into_place_waits_for_the_move():
    import os
    import signal
    done = []
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)   # as at a terminal, even under nohup / &
    try:
        with pytest.raises(KeyboardInterrupt):
            with train.interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("moved")
        assert done == ["moved"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
