"""
The one training loop both papers share: latent initialisation (SFT), then GRPO.

    python train.py                              # Dropout-GRPO on the embedded default, CPU or GPU, minutes
    python train.py --algo latent_grpo           # Latent-GRPO on the same default
    python train.py --algo latent_grpo --latent false     # explicit-CoT GRPO, the baseline both papers compare to
    python train.py --algo dropout_grpo --help   # every knob of the loop and of that algorithm
    python train.py --preset dropout-grpo-gsm8k --init-from COCONUT.pt      # a paper's recipe on real models
    python train.py --preset latent-grpo-gsm8k-llama --model LATENT_SFT_DIR

With no arguments everything is built in code, nothing is downloaded: a byte-level BPE tokenizer trained on the
synthetic task (data.py), a tiny GPT-2 from a config, and a seeded GSM8K-Aug-style task. `--model` takes any
Hugging Face causal LM (path or hub name), `--data` a named data set (gsm8k, gsm8k-aug, ...) or a local file
(data.py lists the formats), and `--preset` a paper's own hyper-parameters (PRESETS).

The pipeline:
  1. latent initialisation: stage 0 is CoT SFT; stages 1..S are the algorithm's latent curriculum
     (Coconut's for Dropout-GRPO; Latent-SFT's steps 1a, 1b, 1c and stage 2 for Latent-GRPO);
  2. evaluate (`init_accuracy`);
  3. GRPO: rollout -> reward -> (dynamic group filter) -> old / ref log-probs -> advantage -> clipped update;
  4. evaluate again (`final_accuracy`), write `summary.json`.

The loop knows an algorithm only through the small interface in README.md ("The algorithm interface"): a class with
`sft_batch / sft_loss / rollout / logprobs / advantages / loss / loss_normaliser / metrics / generate`. Everything the papers
specify lives in the algorithm files; this file only does the plumbing: config, data, model, optimiser, logging,
checkpoints.

Outputs in --out: config.json, metrics.jsonl (one JSON object per logged step; --report-to also sends them to
TensorBoard or W&B), samples.jsonl (a few completions of every evaluation; `python plot.py RUN` draws the run),
summary.json, checkpoint/
(loadable by AutoModelForCausalLM / AutoTokenizer.from_pretrained, plus algorithm.json and trainer_state.pt so
`--resume` continues where the run stopped), init/, the latent initialisation, for GRPO variants from the same
start: `python train.py --model RUN/init --cot-steps 0 --sft-steps 0 ...`, and best/, the checkpoint with the best
validation accuracy (--validation).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

import data
import distributed
import eval as evaluation
import health


@dataclass
class Args:
    # --- what to run ---
    preset: str = ""
    """A paper's recipe: sets the defaults of its loop and algorithm flags (explicit flags still win). The presets
    are listed at the end of --help; `--preset NAME --help` shows every default it sets."""
    algo: str = "dropout_grpo"
    """Algorithm: one of the names in eval.ALGORITHMS (dropout_grpo, latent_grpo)."""
    model: str = "tiny"
    """`tiny` (a small GPT-2 built from a config, with a tokenizer built in code), or any HF causal LM: a local
    directory or a hub name (GPT-2, Llama, Qwen2, ...; a Latent-SFT checkpoint for latent_grpo)."""
    init_from: str = ""
    """dropout_grpo: a Coconut checkpoint (facebookresearch/coconut's `torch.save(model.state_dict())`, keys
    `base_causallm.*`) loaded onto --model (its base, e.g. gpt2) after adding Coconut's three tokens. The checkpoint
    is the latent model: it implies --cot-steps 0 --sft-steps 0, and GRPO starts at the last curriculum stage."""
    data: str = "synthetic"
    """`synthetic` (the embedded seeded task), a named hub set (gsm8k, gsm8k-aug, svamp, multiarith; its train split)
    or a local file: .json / .jsonl / .parquet (GSM8K-Aug, openai/gsm8k, SVAMP, MultiArith, GSM-Hard or Latent-GRPO
    fields, told apart by their names) or internalize-CoT's .txt (`question||<<step>> <<step>> #### answer`)."""
    eval_data: str = ""
    """Held-out data, a name or a file as for --data (gsm-hard too). Empty: the test split of a named --data, or the
    last --eval-size rows of a --data file."""
    field_map: str = ""
    """Fields of a local --data / --eval-data file, when its format is not detected: question=Body+Question,answer=Answer
    [,steps=...] (a+b joins two fields, a.b reads a nested key)."""
    out: str = "runs/default"
    """Output directory: config.json, metrics.jsonl, samples.jsonl, summary.json, checkpoint/."""
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
    parallel: str = "ddp"
    """Under torchrun: `ddp` (every rank holds the whole model; gradients averaged) or `fsdp` (weights, gradients
    and AdamW states sharded with FSDP2, per decoder layer). Ignored in one process."""
    # --- memory, for real model sizes on one GPU ---
    bf16: bool = False
    """Autocast to bfloat16 for SFT, rollouts, log-probs, update and evaluation (CUDA; allowed on CPU, where it saves
    little). Weights, gradients and AdamW stay float32; log-softmax, losses and advantages are computed in float32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass of the update (and of SFT) instead of storing
    them. latent_grpo only: dropout_grpo's update replays the thoughts through the KV cache, which checkpointed
    transformers layers drop, and its mask hooks would be off when a layer is recomputed."""
    micro_batch_size: int = 0
    """Rows per forward / backward in the update and in the old / reference log-probs (0 = a whole mini-batch).
    Gradients are accumulated, each micro-batch weighted by its share of the loss normaliser, so the update equals
    the mini-batch's."""
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
    cot_steps: int = 4000
    """SFT optimiser steps on stage 0 (explicit chain of thought)."""
    sft_steps: int = 250
    """SFT optimiser steps on each later (latent) curriculum stage."""
    sft_batch_size: int = 32
    """SFT examples per optimiser step."""
    sft_lr: float = 2e-3
    """SFT learning rate (AdamW, weight decay 0.01, reset at every stage as in Coconut); 1e-4 for pretrained models."""
    cot_schedule: str = "cosine"
    """Learning-rate schedule of stage 0 (CoT), after a linear warmup of min(100, steps / 10) steps: cosine (decay to 0
    at the stage's last step) | constant [I]. On the embedded default a constant rate leaves the CoT model's
    arithmetic half learned after 4000 steps, and where it stands then differs from seed to seed (README, "What
    reproduces")."""
    sft_schedule: str = "constant"
    """Learning-rate schedule of each latent stage, after the same warmup: constant (Coconut's) | cosine."""
    sft_warmup: bool = True
    """Linear warmup over the first min(100, steps/10) steps of each stage [I]; Coconut has none (false)."""
    sft_reset_every: int = 0
    """Also reset AdamW every this many steps inside a stage (Coconut resets it every epoch: steps per epoch);
    0 = once per stage."""
    sft_last_stage_steps: int = 0
    """SFT steps on the last latent stage (Coconut trains it longer: epochs 12-24 against 3 per stage); 0 = --sft-steps."""
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
    validation: bool = True
    """Evaluate during GRPO on a validation split, never on test, and keep the best checkpoint by validation accuracy
    in RUN/best (synthetic: its validation split; a named set: its validation split, else the last 500 train rows,
    Coconut's gsm_valid size; a file: the 500 rows before its held-out tail). The test set is scored for the report
    rows only (after CoT SFT, the initialisation, the end, and the best checkpoint at the end). false: test throughout."""
    eval_every: int = 50
    """Evaluate every this many GRPO steps (0 = only before and after)."""
    save_every: int = 50
    """Write a checkpoint every this many GRPO steps (always at the end)."""
    batch_size_eval: int = 100
    """Questions per generation batch at evaluation."""
    samples: int = 3
    """Completions of the first N evaluation questions written to samples.jsonl and printed at each evaluation;
    0 = none."""
    report_to: str = "none"
    """Also send every row of metrics.jsonl to a tracker: none | tensorboard (RUN/tensorboard; pip install
    tensorboard) | wandb (pip install wandb; WANDB_PROJECT names the project, WANDB_MODE=offline keeps it local).
    GRPO rows keep their names against the GRPO step; SFT rows go under sft/ against the SFT steps of all stages."""
    allow_degenerate: bool = False
    """Go on when a run is degenerate (no output leaves latent mode, a non-finite SFT loss; health.py) instead of
    stopping with the cause and the fix."""


# A preset is one paper's run on one GPU: the defaults it gives loop (Args) and algorithm (Config) fields, and the
# flags the user must still give (the checkpoint to start from), each with why. Spec sections are those of
# specs/dropout_grpo.md and specs/latent_grpo.md; [I] marks a choice the spec leaves open.
PRESETS = {
    "dropout-grpo-gsm8k": {
        "help": "Coconut GPT-2 checkpoint (--init-from) -> Dropout-GRPO on GSM8K-Aug questions, greedy eval on the "
                "GSM8K test set",
        "requires": {"init_from": "the Coconut GPT-2 checkpoint (a torch.save'd state dict, keys base_causallm.*)"},
        "defaults": {
            "algo": "dropout_grpo",
            "model": "gpt2",                              # §2.1: Coconut's base model and tokenizer
            "data": "gsm8k-aug", "eval_data": "gsm8k",    # §5: GSM8K-Aug train questions; greedy on GSM8K test
            "eval_size": 1319,                            # §2.3: the whole GSM8K test set
            "c_thought": 2, "max_latent_stage": 3,        # §2.1, §2.4: c = 2, 3 stages, T = 6 thoughts
            "p": 0.1, "mask_sites": "native",             # §5 recommended default: p 0.1 at GPT-2's native sites
            "num_prompts": 32, "num_generations": 8,      # §5: 16-32 prompts ([S]: B = 32), K = 8
            "temperature": 1.0, "max_new_tokens": 64,     # §5: answers at T 1.0, top-p 1.0; 64 answer tokens
            "adv_mode": "mean", "epsilon": 0.2,           # §3.6, §5: r - mean(r); clip 0.2
            "beta": 0.0, "num_iterations": 1,             # §5: no KL (so no reference model); mu = 1
            "learning_rate": 1e-5, "weight_decay": 0.0, "max_grad_norm": 1.0,   # §5: full model, AdamW
            "max_steps": 1000, "eval_every": 50, "save_every": 50,   # [I] §5: keep the best by validation accuracy
            "micro_batch_size": 64,   # [I] 256 rows x ~220 positions in 4 passes: estimated peak ~18 GB, not ~64
        },
    },
    "latent-grpo-gsm8k-llama": {
        "help": "Latent-SFT LLaMA-3.2-1B-Instruct checkpoint (--model) -> Latent-GRPO on GSM8K-Aug, eval on the "
                "GSM8K-Aug test set",
        "requires": {"model": "the Latent-SFT checkpoint, e.g. DJCheng/LLaMA3.2-1B-Instruct-Latent-SFT-Top10 or a "
                              "local copy"},
        "defaults": {
            "algo": "latent_grpo",
            "data": "gsm8k-aug", "eval_data": "gsm8k-aug",   # §2: low-difficulty setting
            "eval_size": 1319,                               # §8: the whole GSM8K-Aug test set
            "cot_steps": 0, "sft_steps": 0,                  # §2: the Latent-SFT checkpoint is the initialisation
            "num_prompts": 64, "num_generations": 8,         # §7: train_batch_size 64, n 8
            "num_mini_batches": 4, "num_iterations": 1,      # §7: mini-batch 16 prompts -> 4 optimiser steps; 1 epoch
            "learning_rate": 1e-6, "weight_decay": 0.01, "max_grad_norm": 1.0,   # §7: constant lr, AdamW
            "epsilon": 0.2, "epsilon_high": 0.2, "dual_clip": 3.0, "beta": 0.0,  # §7: clip 0.2 / 0.2 / 3.0, no KL
            "top_k": 10, "top_p_latent": 0.95,               # §7: K 10, latent nucleus 0.95
            "train_reward": "verl-math",                     # §7: verl's math.compute_score on the whole response
            "loss_agg": "micro-token-mean", "ppo_micro_batch_size": 2,   # §7: verl's per-micro-batch token means
            "noise_scale": 1.0, "one_sided": True, "gumbel_temperature": 1.0,    # §7: noise on, one-sided, s 1, tau 1
            "temperature": 0.6, "top_p": 0.95, "answer_top_k": 30,               # §7: answer phase
            "max_response_length": 128,                      # §7
            "invalid_mask": True, "exclude_truncated": False,   # §7: include variant on GSM8K
            "filter_groups": True, "max_num_gen_batches": 50,   # §7: dynamic sampling
            "freeze_embedding": True,                        # §7
            # §7: 10 epochs. GSM8K-Aug has 385,620 questions, 6,025 batches of 64 per epoch; dynamic sampling draws
            # one or more batches per step, so 10 epochs is at most 60,250 steps
            "max_steps": 60250, "eval_every": 10, "save_every": 40,   # §7: validation every 10, checkpoint every 40
            # [I] one GPU instead of 8: bf16 autocast, 16 rows per forward / backward (estimated peak ~35 GB)
            "bf16": True, "micro_batch_size": 16,
        },
    },
    "latent-grpo-math-qwen": {
        "help": "Latent-SFT Qwen2.5-Math-7B checkpoint (--model) -> Latent-GRPO on DAPO-Math-17k, eval on MATH-500; "
                "under torchrun --parallel fsdp on 8 GPUs",
        "requires": {"model": "the Latent-SFT checkpoint, e.g. DJCheng/Qwen2.5-Math-7B-Latent-SFT-4k-Top10 or a local "
                              "copy",
                     "data": "DAPO-Math-17k-en-train.parquet (HF data set DJCheng/Latent-GRPO-Data)",
                     "eval_data": "Math-500-test.parquet (HF data set DJCheng/Latent-GRPO-Data)"},
        "defaults": {
            "algo": "latent_grpo",
            "eval_size": 500,                                # §7: val_batch_size 500, the whole MATH-500
            "cot_steps": 0, "sft_steps": 0,                  # §2: the Latent-SFT checkpoint is the initialisation
            "num_prompts": 32, "num_generations": 8,         # §7: train_batch_size 32, n 8
            "num_mini_batches": 1, "num_iterations": 1,      # §7: mini-batch 32 prompts -> 1 optimiser step; 1 epoch
            "learning_rate": 1e-6, "weight_decay": 0.01, "max_grad_norm": 1.0,   # §7: constant lr, AdamW
            "epsilon": 0.2, "epsilon_high": 0.2, "dual_clip": 3.0,               # §7: clip 0.2 / 0.2 / 3.0
            "beta": 0.001,                                   # §5.3, §7: KL loss on, k3 (low_var_kl), coef 0.001
            "top_k": 10, "top_p_latent": 0.95,               # §7: K 10, latent nucleus 0.95
            "train_reward": "verl-math",                     # §2: verl's math.compute_score (lighteval/MATH)
            "loss_agg": "micro-token-mean", "ppo_micro_batch_size": 1,   # §7: micro-batch 1 per GPU, token means
            "noise_scale": 1.0, "one_sided": True, "gumbel_temperature": 1.0,    # §7: noise on, one-sided, s 1, tau 1
            "temperature": 0.6, "top_p": 0.95, "answer_top_k": 30,               # §7: answer phase
            "max_response_length": 4096,                     # §7: latent and answer steps together
            "invalid_mask": True, "exclude_truncated": True,    # §6.1, §7: exclude variant on MATH
            "filter_groups": True, "max_num_gen_batches": 50,   # §7: dynamic sampling
            "freeze_embedding": True,                        # §7
            "gradient_checkpointing": True,                  # §7: enable_gradient_checkpointing
            # [I] §7: 5 epochs; DAPO-Math-17k is about 17k prompts, about 540 batches of 32 per epoch, so 5 epochs is
            # at most about 2,700 steps (dynamic sampling draws one or more batches per step)
            "max_steps": 2700, "eval_every": 10, "save_every": 40,   # §7: validation every 10, checkpoint every 40
            # [I] FSDP2 over 8 GPUs instead of verl's FSDP with parameter and optimiser offload; bf16 autocast;
            # 2 rows per forward (the script's log_prob_micro_batch_size_per_gpu)
            "parallel": "fsdp", "bf16": True, "micro_batch_size": 2,
        },
    },
}


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


class Interrupted(Exception):
    """Ctrl-C: one line naming the last checkpoint, exit code 130 (metrics.jsonl is flushed row by row)."""


def parse_args(argv=None):
    """Two passes: --algo and --preset first, so that --help lists exactly the chosen algorithm's knobs, with the
    preset's values as their defaults."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --p is not --preset
    pre.add_argument("--algo")
    pre.add_argument("--preset", default=Args.preset)
    known, _ = pre.parse_known_args(argv)
    if known.preset and known.preset not in PRESETS:
        raise UserError(f"unknown --preset {known.preset!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS.get(known.preset, {"defaults": {}, "requires": {}})
    algo = preset["defaults"].get("algo", Args.algo)
    if known.algo and known.preset and known.algo != algo:
        raise UserError(f"--preset {known.preset} runs --algo {algo}, not {known.algo}")
    algo = known.algo or algo
    try:
        algo_cls = evaluation.algorithm_class(algo)
    except ValueError as e:
        raise UserError(str(e)) from None
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="presets (--preset NAME):\n" + "\n".join(f"  {name:<26}{p['help']}" for name, p in PRESETS.items())
        + "\n\nmemory: --bf16, --gradient-checkpointing, --micro-batch-size; the frozen reference model (a second copy "
          "of the weights) is built only when --beta > 0.",
    )
    add_dataclass_args(parser, Args, "training loop (shared)")
    add_dataclass_args(parser, algo_cls.Config, f"{algo} (see {algo}.py)")
    parser.set_defaults(**getattr(algo_cls, "train_defaults", {}))  # an algorithm may change the loop's defaults
    parser.set_defaults(**preset["defaults"])                          # a preset, then the command line, win over it
    ns = vars(parser.parse_args(argv))
    for name in preset["requires"]:
        if ns[name] == parser.get_default(name):
            raise UserError(f"--preset {known.preset} needs --{name.replace('_', '-')}: {preset['requires'][name]}")
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
    for name in ["max_steps", "cot_steps", "sft_steps", "eval_every", "save_every", "micro_batch_size",
                 "sft_reset_every", "sft_last_stage_steps", "samples"]:
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.num_generations < 2:
        raise UserError(f"--num-generations must be >= 2 (a group needs two rollouts to compare), got {args.num_generations}")
    if args.num_prompts % args.num_mini_batches:
        raise UserError(f"--num-prompts ({args.num_prompts}) must be divisible by --num-mini-batches ({args.num_mini_batches})")
    for name in ("cot_schedule", "sft_schedule"):
        if getattr(args, name) not in ("cosine", "constant"):
            raise UserError(f"--{name.replace('_', '-')} must be cosine or constant, got {getattr(args, name)!r}")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.init_from and args.algo != "dropout_grpo":
        raise UserError(f"--init-from loads a Coconut checkpoint, dropout_grpo's initialisation, not {args.algo}'s")
    if args.report_to not in ("none", *TRACKERS):
        raise UserError(f"--report-to must be none, {' or '.join(TRACKERS)}, got {args.report_to!r}")
    if args.parallel not in ("ddp", "fsdp"):
        raise UserError(f"--parallel must be ddp or fsdp, got {args.parallel!r}")
    world = distributed.world()  # torchrun: whole groups and whole SFT examples per rank
    if args.num_prompts % (world * args.num_mini_batches) or args.sft_batch_size % world:
        raise UserError(f"--num-prompts ({args.num_prompts}) must be divisible by {world} ranks x --num-mini-batches "
                        f"({args.num_mini_batches}), and --sft-batch-size ({args.sft_batch_size}) by {world} ranks")
    if args.gradient_checkpointing and args.algo == "dropout_grpo":
        raise UserError("--gradient-checkpointing does not work with dropout_grpo: its update replays the thoughts "
                        "through the KV cache, which checkpointed transformers layers drop (GPT-2 124M needs no "
                        "checkpointing; use --micro-batch-size)")


# --------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data


def check_out(out: Path) -> None:
    """--out must be a directory this process can create or write into: a file at or above it, or a directory
    without write permission, is one line before anything runs."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    above = out
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UserError(f"--out {out}: {above} is a file, not a directory")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: no permission to write in {above}")


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
        # float32 whatever the checkpoint's dtype (transformers 5 would keep a bfloat16 one in bfloat16): AdamW at
        # lr 1e-6 on bfloat16 weights rounds most updates away. --bf16 autocasts the compute instead.
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as e:  # OSError: files not found / not fetched; ValueError: not a causal LM
        reason = str(e).splitlines()[0]
        if Path(name).exists():
            raise UserError(f"--model {name}: cannot load this directory as a causal LM: {reason}") from None
        if "connect" in reason:  # transformers' offline message (HF_HUB_OFFLINE=1, or no network)
            reason = "the hub is unreachable (offline?) and it is not in the local cache"
        raise UserError(f"--model {name}: not a local directory, and not loadable from the hub: {reason}; pass a local "
                        f"directory (e.g. made by `huggingface-cli download {name} --local-dir DIR`)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# Coconut's run.py adds these, in this order, to GPT-2's 50257 tokens (ids 50257-50259); dropout_grpo.TOKEN_NAMES
# finds them by name.
COCONUT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
COCONUT_PREFIX = "base_causallm."


def load_coconut(model, tokenizer, path: str) -> None:
    """--init-from: facebookresearch/coconut's checkpoint, `torch.save(Coconut(...).state_dict())` (run.py). Its keys
    are the base LM's under `base_causallm.`, plus `embedding.weight` (Coconut's alias of the input embeddings,
    ignored). Coconut's three tokens are added to the tokenizer in Coconut's order, the embeddings resized, and every
    key of the base model is loaded from the checkpoint (strict on the base model's keys; extra keys are ignored)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--init-from {path}: file not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or weights-only errors: whatever it is, it is not a state dict
        raise UserError(f"--init-from {path}: not a state dict saved by torch.save ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"--init-from {path}: not a state dict (a mapping of parameter names to tensors)")
    base = {k[len(COCONUT_PREFIX):]: v for k, v in state.items() if k.startswith(COCONUT_PREFIX)}
    if not base:
        raise UserError(f"--init-from {path}: not a Coconut state dict: keys look like {', '.join(list(state)[:3])} "
                        f"(expected {COCONUT_PREFIX}...)")
    tokenizer.add_tokens(list(COCONUT_TOKENS), special_tokens=True)   # those already there keep their ids
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # every row is overwritten below
    own = model.state_dict()
    for key, value in own.items():
        if key not in base:
            raise UserError(f"--init-from {path}: the checkpoint has no {COCONUT_PREFIX}{key}, a weight of --model "
                            f"(is --model the checkpoint's base model?)")
        if base[key].shape != value.shape:
            raise UserError(f"--init-from {path}: {COCONUT_PREFIX}{key} has shape {tuple(base[key].shape)}, --model "
                            f"(with Coconut's 3 tokens) has {tuple(value.shape)}")
    model.load_state_dict({k: base[k] for k in own})


def precision(args: Args, model):
    """--bf16: one autocast region per forward phase (a rollout, a log-prob pass, a micro-batch's forward and backward,
    an SFT step, an evaluation), never around an optimiser step: autocast keeps the bfloat16 copies of the weights
    until its region ends, so a region spanning an update would go on using the old weights."""
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=args.bf16)


@contextlib.contextmanager
def checkpointed_layers(model, on: bool):
    """--gradient-checkpointing for one forward + backward (an RL update or an SFT step). transformers checkpoints
    a decoder layer only in training mode, but RL runs the model in eval(): the noise must come from the algorithm,
    never from native dropout. So only the decoder layers themselves (GradientCheckpointingLayer) are switched to
    training mode: their submodules, dropout and attention included, stay in eval(). The forward must not make a KV
    cache (config.use_cache off meanwhile): a checkpointed layer would write it again when the backward pass
    recomputes the layer, and the recomputed attention would see the sequence twice."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not on:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    was, use_cache = [m.training for m in layers], model.config.use_cache
    for m in layers:
        m.training = True
    model.config.use_cache = False
    try:
        yield
    finally:
        for m, training in zip(layers, was):
            m.training = training
        model.config.use_cache = use_cache


def enable_gradient_checkpointing(model) -> None:
    """Give every decoder layer a non-reentrant checkpoint (it also works when no input requires a gradient, as with
    frozen embeddings). Inert until a layer is in training mode: SFT (model.train()) and `checkpointed_layers`."""
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):   # newer transformers; the old name is deprecated
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(kwargs)
    except ValueError as e:
        raise UserError(f"--gradient-checkpointing: {e}") from None


def load_data(args: Args) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records: --eval-data, else a named set's own test split, else the tail of the --data file."""
    try:
        field_map = data.parse_field_map(args.field_map)
    except ValueError as e:
        raise UserError(str(e)) from None

    def load(flag: str, name: str, split: str) -> list[dict]:
        try:
            return data.load_records(name, split, args.data_seed, field_map)
        except ValueError as e:
            raise UserError(f"--{flag} {e}") from None

    train = load("data", args.data, "train")
    if args.eval_data:
        test = load("eval-data", args.eval_data, "test")
    elif args.data == "synthetic" or args.data in data.HUB_SETS:
        test = load("data", args.data, "test")
    else:  # hold out the tail of the file
        if len(train) <= args.eval_size:
            raise UserError(f"--data {args.data}: {len(train)} rows, need more than --eval-size {args.eval_size}")
        train, test = train[: -args.eval_size], train[-args.eval_size :]
    return train, test[: args.eval_size]


VALIDATION_HOLDOUT = 500   # Coconut's gsm_valid: 500 problems


def load_validation(args: Args, train: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, validation) for --validation: the data set's validation split, else the last 500 train rows (taken
    out of train); the first --eval-size of it. Empty when --validation is false."""
    if not args.validation:
        return train, []
    if args.data == "synthetic" or args.data in data.HUB_SETS and "validation" in data.HUB_SETS[args.data].splits:
        val = data.load_records(args.data, "validation", args.data_seed)
    else:
        if len(train) <= VALIDATION_HOLDOUT:
            raise UserError(f"--data {args.data}: {len(train)} train rows, need more than {VALIDATION_HOLDOUT} to hold "
                            f"out a validation split (or pass --validation false)")
        train, val = train[:-VALIDATION_HOLDOUT], train[-VALIDATION_HOLDOUT:]
    return train, val[: args.eval_size]


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


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C inside the block is held until the block ends (the main thread only), so a checkpoint is never left
    half moved into place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def save_checkpoint(out: Path, model, tokenizer, algo, name: str, cfg, state: dict, where: str = "checkpoint") -> None:
    weights = distributed.full_state_dict(model)  # torchrun + fsdp: the whole model, gathered on rank 0
    if not distributed.is_main():  # torchrun: rank 0 alone writes
        return
    final = out / where
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    try:
        transformers_logging.disable_progress_bar()   # its "Writing model shards" bar would break the run's bars
        model.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
        tokenizer.save_pretrained(tmp)
        (tmp / "algorithm.json").write_text(json.dumps({"algo": name, "config": dataclasses.asdict(cfg), "stage": algo.stage}, indent=2))
        torch.save(state, tmp / "trainer_state.pt")
    except BaseException:   # a crash or Ctrl-C while writing: the previous checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        transformers_logging.enable_progress_bar()
    old = out / ".checkpoint-old"
    with interrupts_deferred():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The run


def logged_before(row: dict, state: dict) -> bool:
    """Whether a row of metrics.jsonl or samples.jsonl was logged before the checkpoint `state` was saved: a run
    resumed from it logs the others again. Kept: the rows of the SFT stages it finished, the initialisation's
    samples once its evaluation is in the checkpoint, GRPO rows up to its step; never the final evaluations'
    samples, since a resumed run always ends with those evaluations."""
    phase = row.get("phase")
    if phase == "sft":
        return row["stage"] < state["sft_stage"]
    if phase == "init":
        return "init_accuracy" in state
    return phase != "final" and row.get("step", 0) <= state["rl_step"]


class Logger:
    """What a run logs as it goes, in --out: metrics.jsonl (one JSON object per logged step, also sent to the
    --report-to tracker) and samples.jsonl (the completions shown at each evaluation). Each line is flushed at once, so
    a crashed run keeps its history. torchrun: rank 0 alone writes."""

    def __init__(self, out: Path, state: dict | None = None, tracker=None):
        """`state`: a resumed run's trainer state. The rows of both files logged after its checkpoint (the SFT stage
        it had not finished, the GRPO steps after its last save, ...: `logged_before`) are dropped, since the run
        logs them again."""
        self.out, self.tracker, self.files = out, tracker, {}
        self.sft_steps = {}   # SFT stage -> its optimiser steps so far: the tracker's SFT step runs on over stages
        if not distributed.is_main():
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            if state is not None and (out / name).exists():
                rows = [line for line in (out / name).read_text().splitlines() if line.strip()
                        and logged_before(json.loads(line), state)]
                evaluation.write_text_atomic(out / name, "".join(line + "\n" for line in rows))
                if name == "metrics.jsonl":
                    for row in map(json.loads, rows):
                        self.count_sft(row)
        self.open("metrics.jsonl")   # samples.jsonl only once there is a sample

    def open(self, name: str):
        if name not in self.files:
            self.files[name] = open(self.out / name, "a")
        return self.files[name]

    def write(self, name: str, record: dict) -> None:
        if not distributed.is_main():
            return
        clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.open(name).write(json.dumps(clean) + "\n")
        self.files[name].flush()

    def count_sft(self, row: dict) -> int:
        """An SFT row's step counted over all stages so far (each stage logs its last step)."""
        if row.get("phase") != "sft":
            return 0
        self.sft_steps[row["stage"]] = row["step"] + 1
        return sum(n for stage, n in self.sft_steps.items() if stage < row["stage"]) + row["step"]

    def log(self, record: dict) -> None:
        """A row of metrics.jsonl, and its numbers to the tracker under the same names (SFT's under sft/)."""
        self.write("metrics.jsonl", record)
        if self.tracker is None:
            return
        values = {k: float(v) for k, v in record.items() if k not in ("phase", "step") and isinstance(v, (int, float))}
        if record["phase"] == "sft":
            self.tracker.log({f"sft/{k}": v for k, v in values.items()}, "sft/step", self.count_sft(record))
        else:
            self.tracker.log(values, "grpo/step", record["step"])

    def samples(self, rows: list[dict]) -> None:
        for row in rows:
            self.write("samples.jsonl", row)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.tracker is not None:
            self.tracker.close()


class TensorBoard:
    """--report-to tensorboard: scalars in RUN/tensorboard (`tensorboard --logdir RUN`)."""

    def __init__(self, module, out: Path, config: dict):
        self.writer = module.SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, values: dict, axis: str, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """--report-to wandb: one W&B run named after --out, with config.json as its config; each metric is plotted
    against its own phase's step (`axis`), since W&B's own step may never go back from SFT's steps to GRPO's."""

    def __init__(self, module, out: Path, config: dict):
        self.run = module.init(name=out.name, dir=str(out), config=config)
        self.defined = set()

    def log(self, values: dict, axis: str, step: int) -> None:
        for name in {axis, *values} - self.defined:
            self.run.define_metric(name, step_metric=None if name == axis else axis)
            self.defined.add(name)
        self.run.log({axis: step, **values})

    def close(self) -> None:
        self.run.finish()


# --report-to: (module, package to pip install, tracker); the module is imported only when asked for
TRACKERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard", TensorBoard), "wandb": ("wandb", "wandb", WandB)}


def tracker_module(name: str):
    """--report-to's module (None for none), imported at start-up: a missing package is one line naming it."""
    if name == "none":
        return None
    module, package, _ = TRACKERS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--report-to {name} needs the {package} package: pip install {package}") from None


def report(args: Args, problems) -> None:
    """health.py's findings: a warning line each; a fatal one stops the run unless --allow-degenerate."""
    for problem in problems:
        if problem is None:
            continue
        if problem.fatal and not args.allow_degenerate:
            raise UserError(problem.message + " (--allow-degenerate true to go on anyway)")
        tqdm.write(f"warning: {problem.message}")


def budget_flag(algo) -> str:
    return next(f"--{n.replace('_', '-')}" for n in ("max_response_length", "max_new_tokens") if hasattr(algo.cfg, n))


def evaluate(algo, model, records, args: Args, name: str, logger: Logger | None = None, **where) -> dict:
    """One greedy evaluation, printed as one line. With a `logger`, the completions of the first --samples questions
    are printed beneath it and written to samples.jsonl, each row tagged with `where` (phase, step, SFT stage)."""
    keep = args.samples if logger is not None else 0
    with precision(args, model), distributed.gathered(model):
        result = evaluation.evaluate(algo, model, records, runs=1, explore=False, batch_size=args.batch_size_eval,
                                     seed=args.seed, keep_examples=keep > 0, keep_first=keep)
    length = "all truncated" if result["mean_length"] is None else f"{result['mean_length']:.1f}"
    if distributed.is_main():
        tqdm.write(f"[eval] {name}: accuracy {result['accuracy']:.3f}, latent steps {result['mean_latent_steps']:.2f}, "
               f"length {length}")
    if keep:
        rows = [{"phase": where.get("phase"), "name": name, "step": where.get("step", 0), **where,
                 "question": ex["question"], "completion": ex["completions"][0], "gold": ex["gold"],
                 "prediction": ex["predictions"][0], "correct": ex["num_correct"] == 1,
                 "latent_steps": ex["latent_steps"][0]} for ex in result.pop("examples")]
        logger.samples(rows)
        if distributed.is_main():
            tqdm.write("\n".join(sample_line(row) for row in rows))
    report(args, [health.check_eval(result, name, budget_flag(algo), args.cot_steps > 0 or args.sft_steps > 0)])  # health: never left latent mode, truncated
    return result


def sample_line(row: dict, width: int = 160) -> str:
    """A sample on one line: right or wrong, gold and prediction, latent steps, the completion cut to `width`."""
    text = " ".join(row["completion"].split()) or "(empty)"
    text = text if len(text) <= width else text[:width - 3] + "..."
    answer = f"answer {row['prediction']}" if row["prediction"] else "no answer"   # None or "": the rule found none
    verdict = "right" if row["correct"] else "wrong"
    return f"  {verdict}: gold {row['gold']}, {answer}, {row['latent_steps']} latent | {text}"


def add_seconds(state: dict, name: str, seconds: float) -> None:
    """Wall time per stage, state["seconds"][name]: kept in checkpoints, so a resumed run adds up."""
    times = state.setdefault("seconds", {})
    times[name] = round(times.get(name, 0.0) + seconds, 1)


def sft_lr_factor(step: int, steps: int, schedule: str, warmup: bool = True) -> float:
    """The SFT learning rate at optimiser step `step` of a stage of `steps`, as a fraction of --sft-lr: a linear warmup
    (--sft-warmup), then constant or a cosine decay that reaches 0 after the last step."""
    warmup = max(1, min(100, steps // 10)) if warmup else 0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step + 1 - warmup) / (steps + 1 - warmup)))


def run_sft(args, algo, model, train, test, logger, state, save):
    """Latent initialisation: stage 0 (CoT), then the algorithm's latent curriculum, each with a fresh AdamW."""
    rng = random.Random(args.seed)
    for stage in range(state["sft_stage"], algo.num_stages + 1):  # resumed: earlier stages are in the checkpoint
        algo.stage = stage
        steps = args.cot_steps if stage == 0 else args.sft_steps
        if stage > 0 and steps > 0 and hasattr(algo, "sft_stage_steps"):  # an algorithm's own count per stage
            steps = algo.sft_stage_steps(stage) if algo.sft_stage_steps(stage) is not None else steps
        if stage == algo.num_stages and stage > 0 and args.sft_last_stage_steps:
            steps = args.sft_last_stage_steps
        state["sft_stage"] = stage + 1
        if steps == 0:  # e.g. GRPO straight from a trained initialisation (--model RUN/init)
            continue
        t0 = time.perf_counter()
        model.train()
        # the algorithm may train a subset, or a second network it owns (Latent-SFT's encoder), stage by stage
        params = (algo.sft_parameters(model, stage) if hasattr(algo, "sft_parameters")
                  else [p for p in model.parameters() if p.requires_grad])
        opt = torch.optim.AdamW(params, lr=args.sft_lr, weight_decay=0.01)
        schedule = args.cot_schedule if stage == 0 else args.sft_schedule
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(sft_lr_factor, steps=steps, schedule=schedule,
                                                                          warmup=args.sft_warmup))
        bar = tqdm(range(steps), desc=f"sft stage {stage}", leave=False, disable=not distributed.is_main())
        losses, warned = [], False
        for step in bar:
            if args.sft_reset_every and step and step % args.sft_reset_every == 0:   # Coconut's reset_optimizer
                opt.state.clear()
            batch = algo.sft_batch(distributed.share(rng.sample(train, args.sft_batch_size)), stage)  # torchrun: a share
            opt.zero_grad(set_to_none=True)
            weights = sft_weights(algo, batch)
            with precision(args, model), checkpointed_layers(model, args.gradient_checkpointing), \
                    distributed.gathered(model):
                terms = algo.sft_loss(model, batch)   # one mean, or named means over different counts
                terms = terms if isinstance(terms, dict) else {None: terms}
                sum(weights.get(k, 1.0) * term for k, term in terms.items()).backward()
                loss = sum(terms.values())
            distributed.average_gradients(params)  # torchrun: every trained parameter, the encoder's included
            distributed.clip_grad_norm(params, args.max_grad_norm)  # torchrun: the global norm
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps - 1:
                record = distributed.mean_metrics({"loss": loss.item()})
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                logger.log({"phase": "sft", "stage": stage, "step": step, **record})
                losses.append(record["loss"])
                problem = health.check_sft(losses, stage)  # health: SFT loss non-finite or rising (warned once)
                if problem and (problem.fatal or not warned):
                    report(args, [problem])
                    warned = True
        model.eval()
        if stage == 0:
            cot = evaluate(algo, model, test, args, "after CoT SFT (stage 0)", logger, phase="sft", stage=0)
            # the CoT model's chain: positions before </think> (the latent policy's steps), and all it generates
            state.update(cot_accuracy=cot["accuracy"], cot_chain_length=cot["mean_latent_steps"],
                         cot_length=cot["mean_length"])
        add_seconds(state, f"sft_stage_{stage}", time.perf_counter() - t0)
        save(state)


def rollout_batch(args, algo, model, train, generator, data_rng):
    """One GRPO batch of whole groups, with dynamic sampling if asked: (rollout, rewards (P, G), metrics).
    Under torchrun each rank rolls out its share of every drawn batch and trains on the same number of groups."""
    G = args.num_generations
    per_rank = args.num_prompts // distributed.world()
    # the algorithm's training reward when it names one (Latent-GRPO: verl's, on the whole response), else its eval rule
    reward_fn = evaluation.REWARDS[getattr(algo, "train_reward", algo.answer_format)]
    kept, kept_rewards, seen_rewards, num_batches = [], [], [], 0
    while True:
        batch = distributed.share(data_rng.sample(train, args.num_prompts))  # torchrun: whole groups per rank
        with precision(args, model), distributed.gathered(model):
            rollout = algo.rollout(model, [r["question"] for r in batch], G, generator)
        texts = getattr(rollout, "reward_texts", rollout.texts)
        rewards = torch.tensor([reward_fn(t, r["answer"]) for r, t in zip((r for r in batch for _ in range(G)), texts)])
        rewards = rewards.view(len(batch), G)
        seen_rewards.append(rewards)
        num_batches += 1
        keep = list(range(len(batch)))
        if args.filter_groups:
            keep = [g for g in keep if rewards[g].std() > 0]
        if keep:
            kept.append(select_rows(rollout, group_rows(keep, G)) if len(keep) < len(batch) else rollout)
            kept_rewards.append(rewards[keep])
        have = distributed.min_int(sum(len(r) for r in kept_rewards))  # torchrun: the fewest groups any rank kept
        if not args.filter_groups or have >= per_rank or num_batches >= args.max_num_gen_batches:
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
    if not have:  # torchrun: no rank trains unless every rank kept a group
        return None, None, metrics
    rollout, rewards = concat_rollouts(kept), torch.cat(kept_rewards)
    if len(rewards) > min(have, per_rank):  # torchrun: as many groups on every rank
        keep = min(have, per_rank)
        rollout, rewards = select_rows(rollout, group_rows(list(range(keep)), G)), rewards[:keep]
    return rollout, rewards, metrics


def micro_batches(rows: list[int], size: int) -> list[list[int]]:
    """`rows` in consecutive chunks of `size` (0 = one chunk): the rows of one forward / backward."""
    size = size or len(rows)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def sft_weights(algo, batch) -> dict:
    """torchrun: the SFT loss is a mean over the global batch (of tokens; Latent-SFT's stage 2 adds a mean over
    examples), so each rank's mean counts with its share of the global count, times the number of ranks since the
    gradients are averaged:  w_r = world * n_r / sum_r' n_r'.  A loss of several terms names each term's count
    (sft_normaliser returns {name: n}, sft_loss {name: mean}). {} (weight 1) in one process."""
    if distributed.world() == 1:
        return {}
    counts = algo.sft_normaliser(batch)
    counts = counts if isinstance(counts, dict) else {None: counts}
    return {k: distributed.world() * n / distributed.sum_float(n) for k, n in sorted(counts.items(), key=str)}


def batched_logprobs(args, algo, model, rollout):
    """algo.logprobs over the whole rollout, --micro-batch-size rows per forward. Column t is response step t in
    every chunk, so chunks of different widths are padded with zeros to the widest, the full batch's width."""
    chunks = micro_batches(list(range(len(rollout.texts))), args.micro_batch_size)
    if len(chunks) == 1:
        return algo.logprobs(model, rollout)
    parts = [algo.logprobs(model, select_rows(rollout, rows)) for rows in chunks]
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def grpo_step(args, algo, model, ref_model, opt, rollout, rewards) -> dict:
    """old/ref log-probs -> advantages -> num_iterations x num_mini_batches clipped updates, each accumulated over
    micro-batches of --micro-batch-size rows."""
    G = args.num_generations
    t0 = time.perf_counter()
    with torch.no_grad(), precision(args, model):
        with distributed.gathered(model):
            old = batched_logprobs(args, algo, model, rollout)  # (N, L): recomputed, never trusted from the sampler
        ref = None
        if ref_model is not None:
            with distributed.gathered(ref_model):  # torchrun + fsdp: the reference gathered after the model's release
                ref = batched_logprobs(args, algo, ref_model, rollout)
    adv = algo.advantages(rewards.to(old.device), rollout, old)  # (N, L) or (N, 1)
    t1 = time.perf_counter()
    groups = list(range(rewards.shape[0]))
    per_mb = len(groups) // args.num_mini_batches
    sums, count = {}, 0
    for _ in range(args.num_iterations):
        for i in range(args.num_mini_batches):
            rows = group_rows(groups[i * per_mb:(i + 1) * per_mb], G)
            chunks = micro_batches(rows, args.micro_batch_size)
            # the loss is normalised over the whole mini-batch, so a micro-batch's loss, normalised over its own rows,
            # counts with its share of the mini-batch's normaliser: the summed gradients are the mini-batch's
            total = algo.loss_normaliser(select_rows(rollout, rows)) if len(chunks) > 1 else None
            if distributed.world() > 1:  # torchrun: the normaliser of the global mini-batch; x world for the average
                total = distributed.sum_float(algo.loss_normaliser(select_rows(rollout, rows))) / distributed.world()
            opt.zero_grad(set_to_none=True)
            metrics = {}
            for part in chunks:
                mb = rollout if len(part) == len(old) else select_rows(rollout, part)
                weight = 1.0 if total is None else algo.loss_normaliser(mb) / total
                idx = torch.tensor(part, device=old.device)
                with precision(args, model), checkpointed_layers(model, args.gradient_checkpointing), \
                        distributed.gathered(model):
                    new = algo.logprobs(model, mb, advantages=adv[idx])
                    L = new.shape[1]  # column t is response step t, so a micro-batch is the first L columns of its rows
                    loss, stats = algo.loss(new, old[idx, :L], None if ref is None else ref[idx, :L],
                                            adv[idx, : min(L, adv.shape[1])], mb)
                    (loss * weight).backward()
                for k, v in {"loss": loss.item(), **stats}.items():  # mini-batch metrics: the same weighted sum
                    metrics[k] = metrics.get(k, 0.0) + weight * float(v)
            distributed.average_gradients([p for p in model.parameters() if p.requires_grad])  # torchrun
            trained = [p for p in model.parameters() if p.requires_grad]
            grad_norm = distributed.clip_grad_norm(trained, args.max_grad_norm)  # torchrun: the global norm
            if torch.isfinite(grad_norm):
                opt.step()
            metrics["grad_norm"] = grad_norm.item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    out = {k: v / count for k, v in sums.items()}
    out["time/logprobs"] = t1 - t0
    out["time/update"] = time.perf_counter() - t1
    return out


def reference_model(args, algo, model, out: Path):
    """The KL's reference (--beta > 0; else None): a frozen copy of the model as it is when RL starts, saved to
    RUN/reference so that --resume compares with the same one. torchrun + fsdp: sharded as the model is."""
    if getattr(algo.cfg, "beta", 0.0) <= 0:
        return None
    ref_model = distributed.ordinary_copy(model).eval().requires_grad_(False)  # copy.deepcopy; fsdp: gathered
    resumed = (out / "reference").exists()
    distributed.barrier()  # torchrun: every rank has looked before rank 0 writes
    if resumed:  # the reference is the model as it was when RL started
        ref_model.load_state_dict(torch.load(out / "reference" / "weights.pt", map_location=model.device))
    elif distributed.is_main():
        (out / "reference").mkdir()
        torch.save(ref_model.state_dict(), out / "reference" / "weights.pt")
    return distributed.wrap(ref_model, args.parallel) if distributed.fsdp(model) else ref_model  # torchrun + fsdp


def run_rl(args, algo, model, train, test, out, logger, state, save):
    model.eval()  # RL noise comes only from the algorithm (masks / Gumbel noise), never from native dropout
    if hasattr(algo, "start_rl"):
        algo.start_rl(model)
    ref_model = reference_model(args, algo, model, out)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay)
    generator = torch.Generator(device=model.device).manual_seed(distributed.seed(args.seed))  # torchrun: per rank
    data_rng = random.Random(args.seed + 1)  # the same on every rank, which take their shares of each batch
    if "optimizer" in state:
        distributed.load_optimizer_state(model, opt, state["optimizer"])
        generator.set_state(state["generator"] if distributed.world() == 1 else state["generator"][distributed.rank()])
        data_rng.setstate(state["data_rng"])
    bar = tqdm(range(state["rl_step"], args.max_steps), desc="grpo", initial=state["rl_step"], total=args.max_steps,
               disable=not distributed.is_main())
    watch = health.RLWatch()
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
        metrics = distributed.mean_metrics(metrics)  # torchrun: over ranks, before logging
        add_seconds(state, "grpo", metrics["time/step"])
        # health: zero reward variance / identical completions in every group, step after step
        report(args, watch.update(metrics["frac_reward_zero_std"], rollout and rollout.texts, args.num_generations))
        state["rl_step"] = step + 1
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            t1 = time.perf_counter()
            metrics["eval/accuracy"] = evaluate(algo, model, test, args, f"grpo step {step + 1}", logger, phase="rl",
                                                step=step + 1)["accuracy"]
            add_seconds(state, "grpo_evals", time.perf_counter() - t1)
            if args.validation and metrics["eval/accuracy"] > state["val_best_accuracy"]:   # test never selects
                state.update(val_best_accuracy=metrics["eval/accuracy"], best_step=step + 1)
                save(state, "best")
        logger.log({"phase": "rl", "step": step + 1, **metrics})
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", zero_std=f"{metrics['frac_reward_zero_std']:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 or step + 1 == args.max_steps:
            state.update(optimizer=distributed.optimizer_state(model, opt), data_rng=data_rng.getstate(),
                         generator=distributed.per_rank(generator.get_state()))  # torchrun: every rank's
            save(state)


def main(argv=None) -> dict:
    t_start = time.time()
    distributed.init()  # torchrun: join the process group (a no-op in one process)
    args, algo_cls, algo_cfg = parse_args(argv)
    check_args(args)
    tracking = tracker_module(args.report_to)   # --report-to's package, before anything is written
    if args.init_from:  # the Coconut checkpoint is the latent model: no SFT, GRPO at the last stage (run_sft)
        args = dataclasses.replace(args, cot_steps=0, sft_steps=0)
    device = pick_device(distributed.device(args.device))
    if args.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_out(out)
    resuming = args.resume and (out / "checkpoint" / "trainer_state.pt").exists()
    if out.exists() and any(out.iterdir()) and not resuming:
        raise UserError(f"--out {out} already holds a run; pass --resume true to continue it or choose another --out")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    train, test = load_data(args)
    train, val = load_validation(args, train)
    if resuming:
        model, tokenizer = build_model(args, str(out / "checkpoint"))
        state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    else:
        model, tokenizer = build_model(args, args.model)
        if args.init_from:
            load_coconut(model, tokenizer, args.init_from)
        state = {"sft_stage": 0, "rl_step": 0}
    # The algorithm adds its special tokens only when this run trains the latent initialisation, which teaches the
    # new rows. A run that starts GRPO from a checkpoint (no SFT steps, --init-from, --resume) uses the checkpoint's
    # tokenizer exactly as it is: a released Latent-SFT model splits </think> into sub-tokens and its end-of-latent id
    # is the first of them; a new single </think> token would be an untrained end id.
    trains_init = args.cot_steps > 0 or args.sft_steps > 0
    try:
        algo = algo_cls(model, tokenizer, algo_cfg, add_tokens=trains_init and not resuming)
    except ValueError as e:
        raise UserError(str(e)) from None
    # a loss that takes token means over groups of rows (Latent-GRPO's micro-token-mean) needs whole groups per chunk
    rows = getattr(algo, "rows_per_mean", 0)
    if rows and args.micro_batch_size % rows:
        raise UserError(f"--micro-batch-size ({args.micro_batch_size}) must be a multiple of the loss's rows per token "
                        f"mean (--ppo-micro-batch-size {rows})")
    model.to(device)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if resuming:
        algo.stage = json.loads((out / "checkpoint" / "algorithm.json").read_text())["stage"]
    model = distributed.wrap(model, args.parallel)  # torchrun: replicated (ddp) or sharded (fsdp), in place
    distributed.barrier()  # torchrun: every rank has checked --out before rank 0 writes into it

    # Everything the user asked for is valid: only now is anything written.
    out.mkdir(parents=True, exist_ok=True)
    config = {"args": dataclasses.asdict(args), "algo_config": dataclasses.asdict(algo_cfg),
              "environment": evaluation.environment(device), "argv": sys.argv[1:] if argv is None else list(argv)}
    if distributed.is_main():
        evaluation.write_json_atomic(out / "config.json", config)
    tracker = TRACKERS[args.report_to][2](tracking, out, config) if tracking and distributed.is_main() else None
    logger = Logger(out, state if resuming else None, tracker)
    saved = {}   # where the last checkpoint stands, for the line Ctrl-C prints

    def save(s, where="checkpoint"):
        save_checkpoint(out, model, tokenizer, algo, args.algo, algo_cfg, s, where)
        if where == "checkpoint":
            saved.update(sft_stage=s["sft_stage"], rl_step=s["rl_step"], init="init_accuracy" in s)
    if distributed.is_main():
        print(f"{args.algo} on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train)} train / {len(val)} validation / {len(test)} eval questions -> {out}")

    try:
        return pipeline(args, algo, model, tokenizer, algo_cfg, train, val, test, out, logger, state, save, config, t_start)
    except KeyboardInterrupt:
        if not saved and not resuming:
            raise Interrupted(f"interrupted before the first checkpoint; {out}/metrics.jsonl holds what was logged") from None
        where = (f"at GRPO step {saved['rl_step']}" if saved.get("rl_step") else
                 "at the latent initialisation, before GRPO" if saved.get("init") else
                 f"after SFT stage {saved['sft_stage'] - 1}" if saved else "as it was resumed")
        raise Interrupted(f"interrupted: {out}/checkpoint holds the run {where}; continue it with --resume true") from None
    finally:
        logger.close()   # the tracker's last rows too


def pipeline(args, algo, model, tokenizer, algo_cfg, train, val, test, out, logger, state, save, config, t_start) -> dict:
    """SFT, the initialisation's evaluation, GRPO, the final evaluations and the summary."""
    # init/ is written when this run made the initialisation: trained it, or converted a Coconut .pt (--init-from),
    # which exists nowhere as a Hugging Face checkpoint; a --model directory is not copied again
    writes_init = args.cot_steps > 0 or args.sft_steps > 0 or bool(args.init_from)
    run_sft(args, algo, model, train, test, logger, state, save)
    if "init_accuracy" not in state:
        t0 = time.perf_counter()
        init = evaluate(algo, model, test, args, "latent initialisation", logger, phase="init")
        add_seconds(state, "init_eval", time.perf_counter() - t0)
        state.update(init_accuracy=init["accuracy"], init_latent_steps=init["mean_latent_steps"], init_length=init["mean_length"])
        if args.validation:   # the initialisation is the first candidate for RUN/best
            v = evaluate(algo, model, val, args, "latent initialisation (validation)", logger, phase="init")["accuracy"]
            state.update(val_init_accuracy=v, val_best_accuracy=v, best_step=0)
            save(state, "best")
        # a copy of the latent initialisation this run made, so that GRPO variants can start from the very same
        # weights: python train.py --model RUN/init --cot-steps 0 --sft-steps 0 ...
        if writes_init:
            save(state, "init")
        save(state)   # last: a run resumed from here has best/ and init/ already
    run_rl(args, algo, model, train, val if args.validation else test, out, logger, state, save)
    t0 = time.perf_counter()
    end = {"phase": "final", "step": state["rl_step"]}
    final = evaluate(algo, model, test, args, "after GRPO", logger, **end)
    add_seconds(state, "final_eval", time.perf_counter() - t0)
    best = {}
    if args.validation:
        v = evaluate(algo, model, val, args, "after GRPO (validation)", logger, **end)["accuracy"]
        if v > state["val_best_accuracy"]:
            state.update(val_best_accuracy=v, best_step=state["rl_step"])
            save(state, "best")
        if state["best_step"] == state["rl_step"]:
            best_test = final["accuracy"]
        else:
            best_algo, best_model, _ = evaluation.load_checkpoint(out / "best", model.device)
            best_test = evaluate(best_algo, best_model, test, args, f"best validation (step {state['best_step']})",
                                 logger, **end)["accuracy"]
        best = {"val_init_accuracy": state["val_init_accuracy"], "val_final_accuracy": v,
                "val_best_accuracy": state["val_best_accuracy"], "best_step": state["best_step"],
                "test_best_accuracy": best_test, "val_size": len(val)}

    summary = {
        "algo": args.algo,
        "cot_accuracy": state.get("cot_accuracy"),
        "cot_chain_length": state.get("cot_chain_length"),
        "cot_length": state.get("cot_length"),
        "init_accuracy": state["init_accuracy"],
        "final_accuracy": final["accuracy"],
        "init_latent_steps": state["init_latent_steps"],
        "mean_latent_steps": final["mean_latent_steps"],
        "init_length": state["init_length"],
        "mean_length": final["mean_length"],
        "steps": state["rl_step"],
        "wall_seconds": round(time.time() - t_start, 1),
        "seconds": state.get("seconds", {}),   # per stage: SFT stages (stage 0 with its evaluation), evaluations, GRPO
        "eval_size": len(test),
        **best,
        "environment": config["environment"],
    }
    if not distributed.is_main():
        return summary
    evaluation.write_json_atomic(out / "summary.json", summary)
    width = max(map(len, summary))
    print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in summary.items()
                    if k != "environment"))
    print(f"{'environment':<{width}}  " + ", ".join(f"{k} {v}" for k, v in summary["environment"].items() if v is not None
                                                      and k not in ("platform", "processor")))
    return summary


def cli() -> None:
    """`python train.py`: main() with its two ways to stop early, a bad request (exit 2) and Ctrl-C (exit 130)."""
    try:
        main()
    except UserError as e:
        if distributed.is_main():  # torchrun: every rank stops, one says why
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        if distributed.is_main():
            print(f"\n{e}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
