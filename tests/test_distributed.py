"""torchrun's arithmetic on CPU: 2 gloo processes against one process on the same global batch (float64).

Starting the processes (imports, gloo) costs more than the cases, so one spawned pair of processes runs every case of
both --parallel modes in sequence, and this process runs the same cases once as the reference for both modes. Each
test then compares one property of the saved results."""
import contextlib
import copy
import functools
import json
import os
import random
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import data
import distributed
import eval as evaluation
import train

WORLD = 2
PARALLEL = ["ddp", "fsdp"]
TINY = ["--n-layer", "2", "--n-embd", "16", "--n-head", "2", "--num-prompts", "4", "--num-generations", "2",
        "--sft-batch-size", "4", "--dropout", "0", "--learning-rate", "1.0", "--max-grad-norm", "1e9"]
ALGO_TINY = {"dropout_grpo": ["--max-new-tokens", "6"],
             "latent_grpo": ["--max-response-length", "6", "--latent-stages", "1", "--invalid-mask", "false"]}
ALGOS = list(ALGO_TINY)
QUESTIONS = ["Ann has 3 pens. How many pens now?", "Ben has 2 cards. How many cards now?",
             "Cat has 5 cups. How many cups now?", "Dan has 4 hats. How many hats now?"]
REWARDS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)


_tokenizer = functools.cache(data.build_tokenizer)
_splits = functools.cache(data.synthetic_splits)


@contextlib.contextmanager
def made_once():
    """The BPE tokenizer and the 21,000-problem synthetic task, made once per process instead of once per case
    (fresh copies handed out: the algorithms add their tokens to the tokenizer)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "build_tokenizer", lambda vocab_size=400: copy.deepcopy(_tokenizer(vocab_size)))
        patch.setattr(data, "synthetic_splits",
                      lambda *a, **k: {split: list(rows) for split, rows in _splits(*a, **k).items()})
        yield


def setup(algo: str):
    """The same float64 model, algorithm and (pre-made) rollout in every process."""
    args, algo_cls, cfg = train.parse_args(["--algo", algo, *TINY, *ALGO_TINY[algo]])
    torch.manual_seed(0)
    model, tokenizer = train.build_model(args, args.model)
    method = algo_cls(model, tokenizer, cfg, add_tokens=True)
    model.double().eval()
    method.stage = method.num_stages
    rollout = method.rollout(model, QUESTIONS, 2, torch.Generator().manual_seed(0))
    return args, model, tokenizer, method, rollout


def sgd(model):
    # SGD, not AdamW: a first AdamW step is lr * sign(g) and would hide a wrongly scaled gradient
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)


def full_weights(model) -> dict:
    weights = distributed.full_state_dict(model)
    return {k: v.detach().cpu().clone() for k, v in (model.state_dict() if weights is None else weights).items()}


def grpo_update(algo: str, parallel: str, ref_dir: Path | None = None) -> tuple[dict, float]:
    """One GRPO step; with ref_dir, under a KL to the reference (train.reference_model, written to ref_dir) from
    which the policy is then moved, so that the KL and its gradient are not 0."""
    args, model, _, method, rollout = setup(algo)
    groups = distributed.share(list(range(len(QUESTIONS))))   # whole groups per rank, as rollout_batch shares them
    local = train.select_rows(rollout, train.group_rows(groups, 2)) if distributed.world() > 1 else rollout
    model = distributed.wrap(model, parallel)
    ref_model = None
    if ref_dir is not None:
        method.cfg.beta, args.parallel = 0.5, parallel
        ref_model = train.reference_model(args, method, model, ref_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)
    metrics = train.grpo_step(args, method, model, ref_model, sgd(model), local, REWARDS[groups])
    metrics = distributed.mean_metrics(metrics)
    return full_weights(model), metrics["grad_norm"], metrics.get("kl")


class NoLogger:
    def log(self, record):
        pass

    def samples(self, rows):
        pass


def float64_setup(args, algo_cls, cfg, parallel: str):
    """The tiny model of `args` (seed 0), its algorithm, in float64 and wrapped for `parallel`; the train records."""
    torch.manual_seed(0)
    model, tokenizer = train.build_model(args, args.model)
    method = algo_cls(model, tokenizer, cfg, add_tokens=True)
    model.double()
    records, _ = train.load_data(args)
    return distributed.wrap(model, parallel), method, records


def sft_update(algo: str, parallel: str) -> dict:
    args, algo_cls, cfg = train.parse_args(["--algo", algo, *TINY, *ALGO_TINY[algo], "--cot-steps", "1",
                                            "--sft-steps", "0", "--sft-lr", "1.0"])
    model, method, records = float64_setup(args, algo_cls, cfg, parallel)
    # stage 0 ends with an evaluation on these: the sharded one
    train.run_sft(args, method, model, records, records[:3], NoLogger(), {"sft_stage": 0}, lambda state: None)
    return full_weights(model)


class adamw_as_sgd:
    """The SFT stages' AdamW replaced by SGD at the same rate: a first AdamW step is lr * sign(g), which would hide
    a gradient summed instead of averaged, or one left unaveraged on a rank whose sign agrees."""

    def __enter__(self):
        self.adamw = torch.optim.AdamW
        torch.optim.AdamW = lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr)

    def __exit__(self, *exc):
        torch.optim.AdamW = self.adamw


def latent_sft_update(parallel: str) -> tuple[dict, dict]:
    """One step of Latent-SFT's 1a (encoder only), one of 1c (encoder and decoder), one of 2 (decoder; CE over
    tokens + KL over examples, without the Gumbel noise each rank would draw its own of): the decoder's weights and
    the encoder's (a second network the algorithm owns, whose gradients the loop must average too)."""
    args, algo_cls, cfg = train.parse_args(["--algo", "latent_grpo", *TINY, *ALGO_TINY["latent_grpo"],
                                            "--cot-steps", "0", "--sft-steps", "1", "--sft-lr", "1.0",
                                            "--latent-sft-steps-1b", "0", "--sft-noise-scale", "0",
                                            "--seed", "1"])  # seed 1: uneven token counts over the ranks in 2
    model, method, records = float64_setup(args, algo_cls, cfg, parallel)
    with adamw_as_sgd():
        train.run_sft(args, method, model, records, records[:3], NoLogger(), {"sft_stage": 1}, lambda state: None)
    encoder = {k: v.detach().cpu().clone() for k, v in method.sft.encoder.state_dict().items()}
    return full_weights(model), encoder


def sharded_eval(algo: str) -> dict:
    args, model, _, method, _ = setup(algo)
    records = [{"question": q, "answer": str(i)} for i, q in enumerate(QUESTIONS + QUESTIONS[:1])]  # 5: uneven shares
    return evaluation.evaluate(method, model, records, batch_size=2, keep_examples=True)


def rollout_draws(algo: str) -> dict:
    """What rollout_batch draws on this rank: its questions and Dropout-GRPO's mask seeds."""
    args, model, _, method, _ = setup(algo)
    train_set, _ = train.load_data(args)
    generator = torch.Generator().manual_seed(distributed.seed(args.seed))
    rollout, _, _ = train.rollout_batch(args, method, model, train_set, generator, random.Random(args.seed + 1))
    return {"prompts": [p.tolist() for p in rollout.prompt_ids][::2],
            "seeds": rollout.mask_seed.tolist() if hasattr(rollout, "mask_seed") else []}


def cases(parallel: str, out: Path) -> dict:
    """Every update case under one --parallel mode (in one process the mode changes nothing)."""
    results = {}
    for algo in ALGOS:
        results[f"grpo-{algo}"] = grpo_update(algo, parallel)
        results[f"sft-{algo}"] = sft_update(algo, parallel)
        ref_dir = out / f"ref-{algo}"
        ref_dir.mkdir(parents=True, exist_ok=True)
        results[f"grpo-beta-{algo}"] = grpo_update(algo, parallel, ref_dir)
    results["latent-sft"] = latent_sft_update(parallel)
    return results


def mode_free_cases() -> dict:
    """The cases that do not depend on --parallel (evaluation, rollout sharing): run once."""
    return {**{f"eval-{algo}": sharded_eval(algo) for algo in ALGOS},
            "draws": distributed.per_rank(rollout_draws("dropout_grpo"))}


def checkpoint_and_resume(run: Path) -> None:
    """One FSDP run of one RL step that saves a checkpoint, then a second run that resumes it for a second step."""
    common = ["--algo", "dropout_grpo", "--n-layer", "2", "--n-embd", "16", "--n-head", "2", "--cot-steps", "2",
              "--sft-steps", "0", "--sft-batch-size", "4", "--num-prompts", "2", "--num-generations", "2",
              "--max-new-tokens", "6", "--max-latent-stage", "1", "--eval-size", "3", "--eval-every", "0",
              "--save-every", "1", "--parallel", "fsdp", "--out", str(run)]
    train.main([*common, "--max-steps", "1"])
    if distributed.is_main():  # rank 0 writes the log: what it held before the resumed run
        (run / "metrics-before-resume.jsonl").write_text((run / "metrics.jsonl").read_text())
    train.main([*common, "--max-steps", "2", "--resume", "true"])


def worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    distributed.init()
    try:
        with made_once():
            results = {parallel: cases(parallel, out / parallel) for parallel in PARALLEL}
            results.update(mode_free_cases())
            checkpoint_and_resume(out / "run")
        if distributed.is_main():
            torch.save(results, out / "results.pt")
    finally:
        distributed.shutdown()
    # Done and saved: skip the interpreter's teardown (seconds of garbage collection over torch's and transformers'
    # modules). An exception above still reaches mp.spawn's error report.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every case on 2 ranks (both --parallel modes, one spawn) and in this process (the reference for both modes),
    the two at once: this process computes its reference while the ranks run."""
    out = tmp_path_factory.mktemp("two-ranks")
    ranks = mp.start_processes(worker, args=(free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    try:
        with made_once():
            one = {**cases("ddp", tmp_path_factory.mktemp("one-process")), **mode_free_cases()}
    finally:
        while not ranks.join():
            pass
    return {"one process": one, "two ranks": torch.load(out / "results.pt", weights_only=False), "run": out / "run"}


@pytest.fixture(scope="module")
def one_process(runs) -> dict:
    return runs["one process"]


@pytest.fixture(scope="module")
def two_ranks(runs) -> dict:
    return runs["two ranks"]


def assert_same_weights(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("parallel", PARALLEL)
def test_grpo_step_on_two_ranks_equals_one_process(two_ranks, one_process, parallel, algo):
    """Same parameters after one update of the global batch (and the same global gradient norm): the loss
    normaliser is global and each rank's loss is weighted so that the gradient average is the one-process gradient."""
    want, want_norm, _ = one_process[f"grpo-{algo}"]
    got, got_norm, _ = two_ranks[parallel][f"grpo-{algo}"]
    assert_same_weights(got, want)
    assert got_norm == pytest.approx(want_norm, rel=1e-10)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("parallel", PARALLEL)
def test_grpo_step_with_a_reference_on_two_ranks_equals_one_process(two_ranks, one_process, parallel, algo):
    """--beta > 0: the reference model (sharded too under fsdp) gives the one-process KL and update."""
    want, want_norm, want_kl = one_process[f"grpo-beta-{algo}"]
    got, got_norm, got_kl = two_ranks[parallel][f"grpo-beta-{algo}"]
    assert want_kl > 0
    assert got_kl == pytest.approx(want_kl, rel=1e-10)
    assert_same_weights(got, want)
    assert got_norm == pytest.approx(want_norm, rel=1e-10)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("parallel", PARALLEL)
def test_sft_step_on_two_ranks_equals_one_process(two_ranks, one_process, parallel, algo):
    """Stage 0 (CoT): under fsdp Latent-GRPO's embedding rows are mixed outside the forward call, so part of their
    gradient arrives after FSDP's reduce-scatter (distributed.gathered averages it)."""
    assert_same_weights(two_ranks[parallel][f"sft-{algo}"], one_process[f"sft-{algo}"])


@pytest.mark.parametrize("parallel", PARALLEL)
def test_latent_sft_steps_on_two_ranks_equal_one_process(two_ranks, one_process, parallel):
    """Latent-SFT's 1a, 1c and 2 on 2 ranks leave the one-process decoder and encoder: the encoder's gradients are
    averaged with the decoder's (under fsdp the encoder is an ordinary copy beside the sharded decoder), and the
    CE's token mean and the KL's example mean are global."""
    want_model, want_encoder = one_process["latent-sft"]
    got_model, got_encoder = two_ranks[parallel]["latent-sft"]
    assert_same_weights(got_encoder, want_encoder)
    assert_same_weights(got_model, want_model)


@pytest.mark.parametrize("algo", ALGOS)
def test_sharded_eval_equals_one_process(two_ranks, one_process, algo):
    """Evaluation does not depend on --parallel: run once."""
    assert two_ranks[f"eval-{algo}"] == one_process[f"eval-{algo}"]


def test_each_rank_rolls_out_its_own_groups_with_its_own_seeds(two_ranks, one_process):
    """The ranks' prompts are the one-process batch, split by whole groups; rank 0 draws the one-process
    mask seeds, rank 1 others. (Rollout sharing does not depend on --parallel: run once.)"""
    one = one_process["draws"]
    ranks = two_ranks["draws"]
    assert distributed.gather_shares([], 0) == []  # one process: nothing to gather
    assert [p for r in range(WORLD) for p in ranks[r]["prompts"]] != []
    merged = [None] * len(one["prompts"])
    for r in range(WORLD):
        merged[r::WORLD] = ranks[r]["prompts"]
    assert merged == one["prompts"]
    assert ranks[0]["seeds"] == one["seeds"][: len(ranks[0]["seeds"])]
    seeds = [s for r in ranks for s in r["seeds"]]
    assert len(set(seeds)) == len(seeds)


def test_fsdp_checkpoint_loads_with_from_pretrained_and_resumes(runs):
    run = runs["run"]
    ckpt = run / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.n_layer == 2
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["rl_step"] == 2 and len(state["generator"]) == WORLD
    def rl_rows(name):
        return [row for row in map(json.loads, (run / name).read_text().splitlines()) if row["phase"] == "rl"]

    rows = rl_rows("metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]  # written once (rank 0)
    assert rows[:1] == rl_rows("metrics-before-resume.jsonl")  # the resumed run went on from step 1, not redoing it
    assert (run / "summary.json").exists()
