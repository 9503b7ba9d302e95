"""
The one training loop both papers share: latent initialisation (SFT), then GRPO.

    python train.py                              # Dropout-GRPO on the embedded default, CPU or GPU, minutes
    python train.py --algo latent_grpo           # Latent-GRPO on the same default
    python train.py --algo latent_grpo --latent false     # explicit-CoT GRPO, the baseline both papers compare to
    python train.py --algo dropout_grpo --help   # every knob of the loop and of that algorithm

With no arguments everything is built in code, nothing is downloaded: a byte-level BPE tokenizer trained on the
synthetic task (data.py), a tiny GPT-2 from a config, and a seeded GSM8K-Aug-style task. `--model` takes any
Hugging Face causal LM (path or hub name) and `--data` a local JSON / JSONL file of GSM8K-Aug records.

The pipeline:
  1. latent initialisation: stage 0 is CoT SFT; stages 1..S are the algorithm's latent curriculum
     (Coconut's for Dropout-GRPO; the superposition stand-in for Latent-SFT for Latent-GRPO);
  2. evaluate (`init_accuracy`);
  3. GRPO: rollout -> reward -> (dynamic group filter) -> old / ref log-probs -> advantage -> clipped update;
  4. evaluate again (`final_accuracy`), write `summary.json`.

The loop knows an algorithm only through the small interface in README.md ("The algorithm interface"): a class with
`sft_batch / sft_loss / rollout / logprobs / advantages / loss / metrics / generate`. Everything the papers
specify lives in the algorithm files; this file only does the plumbing: config, data, model, optimiser, logging,
checkpoints.

Outputs in --out: config.json, metrics.jsonl (one JSON object per logged step), summary.json, checkpoint/
(loadable by AutoModelForCausalLM / AutoTokenizer.from_pretrained, plus algorithm.json and trainer_state.pt so
`--resume` continues where the run stopped), and init/, the latent initialisation, for GRPO variants from the same
start: `python train.py --model RUN/init --cot-steps 0 --sft-steps 0 ...`.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
import eval as evaluation


@dataclass
class Args:
    # --- what to run ---
    algo: str = "dropout_grpo"
    """Algorithm: one of the names in eval.ALGORITHMS (dropout_grpo, latent_grpo)."""
    model: str = "tiny"
    """`tiny` (a small GPT-2 built from a config, with a tokenizer built in code) or any HF causal LM path/hub name."""
    data: str = "synthetic"
    """`synthetic` (the embedded seeded task) or a local JSON/JSONL file of {question, steps, answer} records."""
    eval_data: str = ""
    """Held-out data for evaluation: empty = the synthetic test split, or the last --eval-size rows of --data."""
    out: str = "runs/default"
    """Output directory: config.json, metrics.jsonl, summary.json, checkpoint/."""
    seed: int = 0
    """Seed for data order, initial weights and every random draw of the rollouts."""
    data_seed: int = 0
    """Seed of the synthetic task's train/test split (eval.py's --data-seed); fixed across --seed for comparisons."""
    device: str = "auto"
    """`auto` (cuda if available), `cpu`, `cuda`, `cuda:1`, ..."""
    threads: int = 1
    """CPU threads for torch. The tiny default is overhead-bound: 1 thread is fastest; 0 = torch's default."""
    resume: bool = False
    """Continue from --out/checkpoint if it exists (same config), instead of starting over."""
    # --- the embedded tiny model ---
    n_layer: int = 4
    """Tiny model: transformer blocks."""
    n_embd: int = 64
    """Tiny model: width."""
    n_head: int = 4
    """Tiny model: attention heads."""
    dropout: float = 0.1
    """Tiny model: GPT-2's native dropout during SFT (Coconut trains with it; the RL masks replay these sites)."""
    # --- latent initialisation (SFT) ---
    cot_steps: int = 2000
    """SFT optimiser steps on stage 0 (explicit chain of thought)."""
    sft_steps: int = 250
    """SFT optimiser steps on each later (latent) curriculum stage."""
    sft_batch_size: int = 32
    """SFT examples per optimiser step."""
    sft_lr: float = 2e-3
    """SFT learning rate (AdamW, weight decay 0.01, reset at every stage as in Coconut); 1e-4 for pretrained models."""
    # --- GRPO ---
    max_steps: int = 150
    """GRPO steps (each: one rollout batch, then the update)."""
    num_prompts: int = 16
    """Questions per GRPO step (the number of groups)."""
    num_generations: int = 8
    """Rollouts per question (the group size, G or K in the papers)."""
    learning_rate: float = 1e-4
    """GRPO learning rate (AdamW, constant)."""
    weight_decay: float = 0.0
    """GRPO AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; a step with a non-finite norm is skipped."""
    num_iterations: int = 1
    """PPO epochs over each rollout batch (mu); 1 = on-policy, ratio exactly 1."""
    num_mini_batches: int = 1
    """Optimiser steps per rollout batch, each on a disjoint set of whole groups."""
    filter_groups: bool = False
    """Dynamic sampling (DAPO): keep only groups whose rewards differ; generate more batches to refill."""
    max_num_gen_batches: int = 4
    """Dynamic sampling: give up refilling after this many generation batches and train on what was kept."""
    # --- evaluation and logging ---
    eval_size: int = 500
    """Held-out questions per evaluation."""
    eval_every: int = 50
    """Evaluate every this many GRPO steps (0 = only before and after)."""
    save_every: int = 50
    """Write a checkpoint every this many GRPO steps (always at the end)."""
    batch_size_eval: int = 100
    """Questions per generation batch at evaluation."""


# --------------------------------------------------------------------------------------------------------------
# Config: dataclasses -> argparse, with each field's docstring as its --help


def field_docs(cls) -> dict[str, str]:
    """The string literal right under each dataclass field (the cleanrl convention) becomes that field's help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = {"bool": evaluation.parse_bool, "int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=f.default,
            metavar=f.name.upper() if kind is not evaluation.parse_bool else "BOOL",
            help=docs.get(f.name, "").replace("%", "%%") + " (default: %(default)s)",  # shows train_defaults too
        )


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2, nothing written."""


def parse_args(argv=None):
    """Two passes: --algo first, so that --help lists exactly the chosen algorithm's knobs."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--algo", default=Args.algo)
    known, _ = pre.parse_known_args(argv)
    try:
        algo_cls = evaluation.algorithm_class(known.algo)
    except ValueError as e:
        raise UserError(str(e)) from None
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
    )
    add_dataclass_args(parser, Args, "training loop (shared)")
    add_dataclass_args(parser, algo_cls.Config, f"{known.algo} (see {known.algo}.py)")
    parser.set_defaults(**getattr(algo_cls, "train_defaults", {}))  # an algorithm may change the loop's defaults
    ns = vars(parser.parse_args(argv))
    args = Args(**{f.name: ns[f.name] for f in dataclasses.fields(Args)})
    try:
        algo_cfg = algo_cls.Config(**{f.name: ns[f.name] for f in dataclasses.fields(algo_cls.Config)})
    except ValueError as e:
        raise UserError(str(e)) from None
    return args, algo_cls, algo_cfg


def check_args(args: Args) -> None:
    positive = ["num_prompts", "sft_batch_size", "num_iterations", "num_mini_batches", "eval_size", "batch_size_eval"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ["max_steps", "cot_steps", "sft_steps", "eval_every", "save_every"]:
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.num_generations < 2:
        raise UserError(f"--num-generations must be >= 2 (a group needs two rollouts to compare), got {args.num_generations}")
    if args.num_prompts % args.num_mini_batches:
        raise UserError(f"--num-prompts ({args.num_prompts}) must be divisible by --num-mini-batches ({args.num_mini_batches})")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")


# --------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def build_model(args: Args, name: str):
    """`name`: `tiny` (a GPT-2 built from args' tiny-model fields), a checkpoint directory or a hub name, through the
    same transformers classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    if name == "tiny":
        tokenizer = data.build_tokenizer()
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=512, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
            resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        return model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    except OSError as e:
        where = "a local directory" if Path(name).exists() else "the hub (offline, or no such model?)"
        raise UserError(f"--model {name}: cannot load from {where}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_data(args: Args) -> tuple[list[dict], list[dict]]:
    try:
        train = data.load_records(args.data, "train", args.data_seed)
        if args.eval_data:
            test = data.load_records(args.eval_data, "test", args.data_seed)
        elif args.data == "synthetic":
            test = data.load_records("synthetic", "test", args.data_seed)
        else:  # hold out the tail of the file
            if len(train) <= args.eval_size:
                raise UserError(f"--data {args.data}: {len(train)} rows, need more than --eval-size {args.eval_size}")
            train, test = train[: -args.eval_size], train[-args.eval_size :]
    except ValueError as e:
        raise UserError(str(e)) from None
    return train, test[: args.eval_size]


# --------------------------------------------------------------------------------------------------------------
# Rollout batches: select whole groups, concatenate batches (the Rollout contract: every field is per-row)


def select_rows(rollout, rows: list[int]):
    index = torch.tensor(rows, dtype=torch.long)
    fields = {}
    for f in dataclasses.fields(rollout):
        value = getattr(rollout, f.name)
        fields[f.name] = value[index.to(value.device)] if torch.is_tensor(value) else [value[i] for i in rows]
    return type(rollout)(**fields)


def concat_rollouts(rollouts: list):
    first = rollouts[0]
    fields = {}
    for f in dataclasses.fields(first):
        values = [getattr(r, f.name) for r in rollouts]
        fields[f.name] = torch.cat(values) if torch.is_tensor(values[0]) else sum(values, [])
    return type(first)(**fields)


def group_rows(groups: list[int], num_generations: int) -> list[int]:
    return [g * num_generations + k for g in groups for k in range(num_generations)]


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary directory, then moved into place, so a crash never leaves half a checkpoint


def save_checkpoint(out: Path, model, tokenizer, algo, name: str, cfg, state: dict, where: str = "checkpoint") -> None:
    final = out / where
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "algorithm.json").write_text(json.dumps({"algo": name, "config": dataclasses.asdict(cfg), "stage": algo.stage}, indent=2))
    torch.save(state, tmp / "trainer_state.pt")
    old = out / ".checkpoint-old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The run


class Logger:
    """metrics.jsonl: one JSON object per line, flushed at once so a crashed run keeps its history."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def log(self, record: dict) -> None:
        clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()


def evaluate(algo, model, records, args: Args, name: str) -> dict:
    result = evaluation.evaluate(algo, model, records, runs=1, explore=False, batch_size=args.batch_size_eval, seed=args.seed)
    length = "all truncated" if result["mean_length"] is None else f"{result['mean_length']:.1f}"
    tqdm.write(f"[eval] {name}: accuracy {result['accuracy']:.3f}, latent steps {result['mean_latent_steps']:.2f}, "
               f"length {length}")
    return result


def run_sft(args, algo, model, train, test, logger, state, save):
    """Latent initialisation: stage 0 (CoT), then the algorithm's latent curriculum, each with a fresh AdamW."""
    rng = random.Random(args.seed)
    for stage in range(state["sft_stage"], algo.num_stages + 1):  # resumed: earlier stages are in the checkpoint
        algo.stage = stage
        steps = args.cot_steps if stage == 0 else args.sft_steps
        state["sft_stage"] = stage + 1
        if steps == 0:  # e.g. GRPO straight from a trained initialisation (--model RUN/init)
            continue
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.sft_lr, weight_decay=0.01)
        warmup = max(1, min(100, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        bar = tqdm(range(steps), desc=f"sft stage {stage}", leave=False)
        for step in bar:
            batch = algo.sft_batch(rng.sample(train, args.sft_batch_size), stage)
            loss = algo.sft_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                logger.log({"phase": "sft", "stage": stage, "step": step, "loss": loss.item()})
        model.eval()
        if stage == 0:
            state["cot_accuracy"] = evaluate(algo, model, test, args, "after CoT SFT (stage 0)")["accuracy"]
        save(state)


def rollout_batch(args, algo, model, train, generator, data_rng):
    """One GRPO batch of whole groups, with dynamic sampling if asked: (rollout, rewards (P, G), metrics)."""
    G = args.num_generations
    reward_fn = evaluation.REWARDS[algo.answer_format]
    kept, kept_rewards, seen_rewards, num_batches = [], [], [], 0
    while True:
        batch = data_rng.sample(train, args.num_prompts)
        rollout = algo.rollout(model, [r["question"] for r in batch], G, generator)
        rewards = torch.tensor([reward_fn(t, r["answer"]) for r, t in zip((r for r in batch for _ in range(G)), rollout.texts)])
        rewards = rewards.view(len(batch), G)
        seen_rewards.append(rewards)
        num_batches += 1
        keep = list(range(len(batch)))
        if args.filter_groups:
            keep = [g for g in keep if rewards[g].std() > 0]
        if keep:
            kept.append(select_rows(rollout, group_rows(keep, G)) if len(keep) < len(batch) else rollout)
            kept_rewards.append(rewards[keep])
        have = sum(len(r) for r in kept_rewards)
        if not args.filter_groups or have >= args.num_prompts or num_batches >= args.max_num_gen_batches:
            break
    seen = torch.cat(seen_rewards)
    kept_groups = sum(len(r) for r in kept_rewards)
    metrics = {
        "adv/frac_groups_filtered": 1.0 - kept_groups / len(seen),
        "reward": seen.mean().item(),
        "reward_std": seen.std(dim=1).mean().item(),
        "frac_reward_zero_std": (seen.std(dim=1) == 0).float().mean().item(),
        "gen_batches": num_batches,
    }
    if not kept:
        return None, None, metrics
    rollout, rewards = concat_rollouts(kept), torch.cat(kept_rewards)
    if len(rewards) > args.num_prompts:
        rollout, rewards = select_rows(rollout, group_rows(list(range(args.num_prompts)), G)), rewards[: args.num_prompts]
    return rollout, rewards, metrics


def grpo_step(args, algo, model, ref_model, opt, rollout, rewards) -> dict:
    """old/ref log-probs -> advantages -> num_iterations x num_mini_batches clipped updates."""
    G = args.num_generations
    t0 = time.perf_counter()
    with torch.no_grad():
        old = algo.logprobs(model, rollout)  # (N, L): recomputed, never trusted from the sampler
        ref = algo.logprobs(ref_model, rollout) if ref_model is not None else None
    adv = algo.advantages(rewards.to(old.device), rollout, old)  # (N, L) or (N, 1)
    t1 = time.perf_counter()
    groups = list(range(rewards.shape[0]))
    per_mb = len(groups) // args.num_mini_batches
    sums, count = {}, 0
    for _ in range(args.num_iterations):
        for i in range(args.num_mini_batches):
            rows = group_rows(groups[i * per_mb:(i + 1) * per_mb], G)
            mb = rollout if args.num_mini_batches == 1 else select_rows(rollout, rows)
            idx = torch.tensor(rows, device=old.device)
            new = algo.logprobs(model, mb, advantages=adv[idx])
            L = new.shape[1]  # column t is response step t, so a mini-batch is the first L columns of its rows
            loss, metrics = algo.loss(new, old[idx, :L], None if ref is None else ref[idx, :L], adv[idx, : min(L, adv.shape[1])], mb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
            if torch.isfinite(grad_norm):
                opt.step()
            metrics = {"loss": loss.item(), "grad_norm": grad_norm.item(), **metrics}
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
    out = {k: v / count for k, v in sums.items()}
    out["time/logprobs"] = t1 - t0
    out["time/update"] = time.perf_counter() - t1
    return out


def run_rl(args, algo, model, train, test, out, logger, state, save):
    model.eval()  # RL noise comes only from the algorithm (masks / Gumbel noise), never from native dropout
    if hasattr(algo, "start_rl"):
        algo.start_rl(model)
    ref_model = None
    if getattr(algo.cfg, "beta", 0.0) > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if (out / "reference").exists():  # resumed: the reference is the model as it was when RL started
            ref_model.load_state_dict(torch.load(out / "reference" / "weights.pt", map_location=model.device))
        else:
            (out / "reference").mkdir()
            torch.save(ref_model.state_dict(), out / "reference" / "weights.pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    data_rng = random.Random(args.seed + 1)
    if "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        data_rng.setstate(state["data_rng"])
    bar = tqdm(range(state["rl_step"], args.max_steps), desc="grpo", initial=state["rl_step"], total=args.max_steps)
    for step in bar:
        t0 = time.perf_counter()
        rollout, rewards, metrics = rollout_batch(args, algo, model, train, generator, data_rng)
        metrics["time/rollout"] = time.perf_counter() - t0
        if rollout is not None:
            metrics.update({
                "completions/mean_length": rollout.lengths.float().mean().item(),
                "completions/clipped_ratio": rollout.truncated.float().mean().item(),
                "latent/mean_steps": rollout.num_latent.float().mean().item(),
                **algo.metrics(rollout),
                **grpo_step(args, algo, model, ref_model, opt, rollout, rewards),
            })
        metrics["time/step"] = time.perf_counter() - t0
        state["rl_step"] = step + 1
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            metrics["eval/accuracy"] = evaluate(algo, model, test, args, f"grpo step {step + 1}")["accuracy"]
        logger.log({"phase": "rl", "step": step + 1, **metrics})
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", zero_std=f"{metrics['frac_reward_zero_std']:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 or step + 1 == args.max_steps:
            state.update(optimizer=opt.state_dict(), generator=generator.get_state(), data_rng=data_rng.getstate())
            save(state)


def main(argv=None) -> dict:
    t_start = time.time()
    args, algo_cls, algo_cfg = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    resuming = args.resume and (out / "checkpoint" / "trainer_state.pt").exists()
    if out.exists() and any(out.iterdir()) and not resuming:
        raise UserError(f"--out {out} already holds a run; pass --resume true to continue it or choose another --out")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    train, test = load_data(args)
    if resuming:
        model, tokenizer = build_model(args, str(out / "checkpoint"))
        state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    else:
        model, tokenizer = build_model(args, args.model)
        state = {"sft_stage": 0, "rl_step": 0}
    try:
        algo = algo_cls(model, tokenizer, algo_cfg, add_tokens=not resuming)
    except ValueError as e:
        raise UserError(str(e)) from None
    model.to(device)
    if resuming:
        algo.stage = json.loads((out / "checkpoint" / "algorithm.json").read_text())["stage"]

    # Everything the user asked for is valid: only now is anything written.
    out.mkdir(parents=True, exist_ok=True)
    config = {"args": dataclasses.asdict(args), "algo_config": dataclasses.asdict(algo_cfg),
              "device": str(device), "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else list(argv)}
    evaluation.write_json_atomic(out / "config.json", config)
    logger = Logger(out / "metrics.jsonl")
    save = lambda s: save_checkpoint(out, model, tokenizer, algo, args.algo, algo_cfg, s)
    print(f"{args.algo} on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train)} train / {len(test)} eval questions -> {out}")

    run_sft(args, algo, model, train, test, logger, state, save)
    if "init_accuracy" not in state:
        init = evaluate(algo, model, test, args, "latent initialisation")
        state.update(init_accuracy=init["accuracy"], init_latent_steps=init["mean_latent_steps"], init_length=init["mean_length"])
        save(state)
        # a copy of the latent initialisation, so that GRPO variants can start from the very same weights:
        #   python train.py --model RUN/init --cot-steps 0 --sft-steps 0 ...
        save_checkpoint(out, model, tokenizer, algo, args.algo, algo_cfg, state, where="init")
    run_rl(args, algo, model, train, test, out, logger, state, save)
    final = evaluate(algo, model, test, args, "after GRPO")

    summary = {
        "algo": args.algo,
        "cot_accuracy": state.get("cot_accuracy"),
        "init_accuracy": state["init_accuracy"],
        "final_accuracy": final["accuracy"],
        "init_latent_steps": state["init_latent_steps"],
        "mean_latent_steps": final["mean_latent_steps"],
        "init_length": state["init_length"],
        "mean_length": final["mean_length"],
        "steps": state["rl_step"],
        "wall_seconds": round(time.time() - t_start, 1),
        "eval_size": len(test),
    }
    evaluation.write_json_atomic(out / "summary.json", summary)
    width = max(map(len, summary))
    print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
