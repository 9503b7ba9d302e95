"""
The README's results tables, regenerated: every row run over several seeds, reported as mean ± standard error, with
the library versions and CPU kernels that produced them.

    python results.py                          # every table, seeds 0,1,2, two runs at a time (hours on 2 CPU cores)
    python results.py --tables dropout_grpo --seeds 0,1,2,3,4 --jobs 1
    python results.py --budget tiny --out /tmp/r   # every row with a tiny budget: checks the script end to end

Each row is a `train.py` command. A row may start from another row's latent initialisation (`RUN/init`, same seed),
as the README's GRPO variants do, so that they differ from the default run only in what the row changes. Runs land in
`--out/TABLE/ROW/seedN`; a run whose summary.json exists is not run again, so an interrupted call resumes where it
stopped, and a finished one just prints its tables again. The tables go to stdout and to `--out/results.md`, every
per-seed figure to `--out/results.json`.

Standard errors are over seeds (sd / sqrt(n), Bessel sd); a gain (final - init) is averaged per seed first, so its
error is that of the paired difference. A table's numbers are exact only for the versions, CPU kernels and threads
printed beneath it (README, "What reproduces").
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    name: str          # directory name and key in results.json
    label: str         # the table's first column
    argv: tuple = ()   # train.py flags beyond the table's own
    start: str = ""    # the row whose RUN/init this row's GRPO starts from (same seed); "" = the whole pipeline


# One table per algorithm. The first row of each is the default command, `python train.py --algo ALGO`.
TABLES = {
    "dropout_grpo": [
        Row("default", "Coconut initialisation -> Dropout-GRPO (p 0.05, answers T 1)"),
        Row("no_cot", "Coconut's no-CoT (answer only, `--method no_cot`) -> GRPO (p 0.05)", ("--method", "no_cot")),
        Row("p0", "GRPO without the mask (p 0, answers T 1: Temp-GRPO)", ("--p", "0"), start="default"),
        Row("greedy", "Dropout-GRPO, near-greedy answers (p 0.05, T 0.01)", ("--temperature", "0.01"), start="default"),
        Row("greedy_p0", "GRPO, near-greedy answers, no mask (p 0, T 0.01)", ("--p", "0", "--temperature", "0.01"),
            start="default"),
    ],
    "latent_grpo": [
        Row("default", "latent initialisation -> Latent-GRPO"),
        Row("explicit", "CoT SFT -> explicit GRPO (`--latent false`)", ("--latent", "false")),
        Row("no_one_sided", "Latent-GRPO without one-sided noise", ("--one-sided", "false"), start="default"),
        Row("no_flip_grad", "Latent-GRPO without FlipGrad", ("--flip-grad", "false"), start="default"),
        Row("no_first_token", "Latent-GRPO without first-token selection", ("--first-token-selection", "false"),
            start="default"),
        Row("no_invalid_mask", "Latent-GRPO without invalid-sample masking", ("--invalid-mask", "false"),
            start="default"),
    ],
}

# The figures of a table, from each run's summary.json: (column, summary key, scale). Accuracies in %.
COLUMNS = [("CoT SFT", "cot_accuracy", 100), ("initialisation", "init_accuracy", 100),
           ("after GRPO", "final_accuracy", 100), ("gain", "gain", 100), ("latent steps", "mean_latent_steps", 1),
           ("positions", "mean_length", 1), ("wall s", "wall_seconds", 1)]

# A few steps of every stage: a model this short-trained never leaves latent mode, which train.py would stop on.
TINY = ("--cot-steps", "20", "--sft-steps", "4", "--max-steps", "2", "--eval-size", "16", "--eval-every", "0",
        "--num-prompts", "2", "--num-generations", "2", "--allow-degenerate", "true")


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (Bessel sd / sqrt(n)); the error of a single value is nan."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def run_dir(out: Path, table: str, row: Row, seed: int) -> Path:
    return out / table / row.name / f"seed{seed}"


def command(out: Path, table: str, row: Row, seed: int, budget: tuple) -> list[str]:
    argv = [sys.executable, "train.py", "--algo", table, "--seed", str(seed), *budget, *row.argv]
    if row.start:   # GRPO only, from the start row's initialisation: its flags come last, so they win over the budget
        start = next(r for r in TABLES[table] if r.name == row.start)
        argv += ["--model", str(run_dir(out, table, start, seed) / "init"), "--cot-steps", "0", "--sft-steps", "0"]
    return argv + ["--out", str(run_dir(out, table, row, seed))]


def run(out: Path, table: str, row: Row, seed: int, budget: tuple) -> dict:
    """One run (skipped when its summary.json exists): its summary, with cot / init figures taken from the start row's
    run when the row starts from one."""
    where = run_dir(out, table, row, seed)
    if not (where / "summary.json").exists():
        if where.exists():   # an interrupted run: start it again
            subprocess.run(["rm", "-rf", str(where)], check=True)
        where.parent.mkdir(parents=True, exist_ok=True)
        with open(where.parent / f"seed{seed}.log", "w") as log:
            done = subprocess.run(command(out, table, row, seed, budget), stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"{table}/{row.name} seed {seed} failed (exit {done.returncode}); see "
                               f"{where.parent / f'seed{seed}.log'}")
    summary = json.loads((where / "summary.json").read_text())
    if row.start:
        start = json.loads((run_dir(out, table, next(r for r in TABLES[table] if r.name == row.start), seed)
                            / "summary.json").read_text())
        summary["cot_accuracy"] = start["cot_accuracy"]
    summary["gain"] = summary["final_accuracy"] - summary["init_accuracy"]
    return summary


def format_table(table: str, rows: list[Row], runs: dict) -> str:
    lines = [f"| {table} | " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = []
        for _, key, scale in COLUMNS:
            values = [s[key] * scale for s in runs[row.name] if s.get(key) is not None]
            if not values:
                cells.append("")
                continue
            m, se = mean_se(values)
            cells.append(f"{m:.1f}" if math.isnan(se) else f"{m:.1f} ± {se:.1f}")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_line(summaries: list[dict]) -> str:
    """The versions, kernels and threads behind a table; more than one set is named as such."""
    keys = ("python", "torch", "transformers", "tokenizers", "datasets", "cpu_capability", "threads", "device")
    seen = sorted({tuple((k, s["environment"].get(k)) for k in keys) for s in summaries if "environment" in s})
    return "; ".join(", ".join(f"{k} {v}" for k, v in env if v is not None) for env in seen)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    p.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, of: {', '.join(TABLES)}")
    p.add_argument("--rows", default="", help="comma-separated row names to run (default: every row of the tables)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (train.py --seed)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one CPU thread)")
    p.add_argument("--budget", choices=["full", "tiny"], default="full",
                   help="full: the README's runs; tiny: every row with a few steps, to check the script")
    p.add_argument("--out", default="runs/results", help="where the runs and results.md / results.json go")
    args = p.parse_args(argv)
    for t in args.tables.split(","):
        if t not in TABLES:
            p.error(f"--tables: unknown table {t!r}; known: {', '.join(TABLES)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, budget = Path(args.out), TINY if args.budget == "tiny" else ()
    chosen = set(args.rows.split(",")) if args.rows else None
    plan = {t: [r for r in TABLES[t] if chosen is None or r.name in chosen or any(
        o.start == r.name and o.name in chosen for o in TABLES[t])] for t in args.tables.split(",")}
    results = {t: {r.name: [None] * len(args.seeds) for r in rows} for t, rows in plan.items()}
    # two waves: the rows that train an initialisation, then the rows that start from one
    for wave in (lambda r: not r.start, lambda r: bool(r.start)):
        jobs = [(t, r, i, s) for t, rows in plan.items() for r in rows if wave(r) for i, s in enumerate(args.seeds)]
        with ThreadPoolExecutor(args.jobs) as pool:
            for (t, r, i, s), summary in zip(jobs, pool.map(lambda j: run(out, j[0], j[1], j[3], budget), jobs)):
                results[t][r.name][i] = summary
                print(f"done: {t}/{r.name} seed {s}: init {summary['init_accuracy']:.3f} -> final "
                      f"{summary['final_accuracy']:.3f}", file=sys.stderr)
    text = []
    for t, rows in plan.items():
        summaries = [s for r in rows for s in results[t][r.name]]
        text += [format_table(t, rows, results[t]), "",
                 f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± standard error; "
                 f"budget {args.budget}; {environment_line(summaries)}", ""]
    report = "\n".join(text)
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"seeds": args.seeds, "budget": args.budget, "results": results},
                                                 indent=1))
    return results


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
