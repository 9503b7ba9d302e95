"""
The spread of Dropout-GRPO's gradient estimate at fixed weights (dropout spec §4.6, the "variance reduction" claim):
from one checkpoint, R independent rollout batches per mask mode (shared, per_step) at the same p, one gradient of
the loss at θ_old per batch (`DropoutGRPO.gradient_variance`). Prints and writes one JSON object per mode:
tr Cov[g], ||E g||², the fraction of non-degenerate groups and the mean |A|.

    python grad_variance.py --checkpoint runs/dropout/init --p 0.1 --repeats 32 --out var.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

import data
import eval as evaluation


def parse_args(argv=None):
    p = evaluation._Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--checkpoint", required=True, help="a dropout_grpo checkpoint dir or run dir (e.g. RUN/init)")
    p.add_argument("--data", default="synthetic", help="questions: synthetic or a named set (default: synthetic)")
    p.add_argument("--split", default="validation", help="split of --data (default: validation)")
    p.add_argument("--p", type=float, default=None, help="drop probability for every mode (default: the checkpoint's)")
    p.add_argument("--modes", default="shared,per_step", help="mask modes to compare (default: shared,per_step)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--repeats", type=int, default=32, help="rollout batches per mode (>= 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output JSON (default: print only)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        algo, model, _ = evaluation.load_checkpoint(args.checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
        if not hasattr(algo, "gradient_variance"):
            raise ValueError(f"{args.checkpoint}: {type(algo).__name__} has no dropout masks")
        records = data.load_records(args.data, args.split)[:args.num_prompts]
        cfgs = {m: dataclasses.replace(algo.cfg, mask_mode=m, **({} if args.p is None else {"p": args.p}))
                for m in args.modes.split(",")}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    reward = evaluation.REWARDS[algo.answer_format]
    report = {"checkpoint": str(args.checkpoint), "questions": len(records), "G": args.num_generations,
              "repeats": args.repeats, "results": {}}
    for mode, cfg in cfgs.items():
        algo.cfg = cfg
        generator = torch.Generator(device=model.device).manual_seed(args.seed)   # the same draws for every mode
        report["results"][mode] = {"p": cfg.p, **algo.gradient_variance(model, records, reward, args.num_generations,
                                                                         args.repeats, generator)}
        print(mode, json.dumps(report["results"][mode]))
    if args.out:
        evaluation.write_json_atomic(Path(args.out), report)
    return report


if __name__ == "__main__":
    main()
