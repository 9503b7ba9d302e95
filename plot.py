"""
A picture of a run: reward, evaluation accuracy, chain length and latent steps against the GRPO step, and the SFT
loss of each stage, read from RUN/metrics.jsonl and drawn into one PNG.

    python plot.py runs/default                      # writes runs/default/run.png
    python plot.py RUN --out run.png

matplotlib is needed by this script alone (pip install matplotlib); train.py runs without it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (metric, panel title) of the GRPO panels, each against the GRPO step
PANELS = [("reward", "reward"), ("eval/accuracy", "eval accuracy (eval/accuracy)"),
          ("completions/mean_length", "chain length (completions/mean_length)"),
          ("latent/mean_steps", "latent steps (latent/mean_steps)")]


def fail(message: str):
    """A bad request: one line, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    """Exactly the flags --help lists (no prefix abbreviations), and errors in one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        fail(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="Draw a train.py run (RUN/metrics.jsonl) into a PNG.")
    p.add_argument("run", help="a run directory written by train.py (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN/run.png)")
    return p.parse_args(argv)


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        fail(f"{path}: no such file (is {run} a directory written by train.py?)")
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        fail(f"{path}: not JSON lines ({e})")
    if not rows:
        fail(f"{path} is empty: nothing to plot yet")
    return rows


def smooth(values: list[float], window: int) -> list[float]:
    """The running mean over the last `window` values."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def main(argv=None) -> Path:
    args = parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "run.png"
    rows = read_rows(run)
    try:
        import matplotlib
        matplotlib.use("Agg")   # a file, no display
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plot.py needs matplotlib (pip install matplotlib)")
    if not out.parent.is_dir():
        fail(f"--out: directory {out.parent} does not exist")

    rl = [r for r in rows if r.get("phase") == "rl"]
    sft = [r for r in rows if r.get("phase") == "sft"]
    panels = len(PANELS) + bool(sft)
    fig, axes = plt.subplots(2, (panels + 1) // 2, figsize=(5 * ((panels + 1) // 2), 7), squeeze=False)
    axes = axes.ravel()
    for ax, (key, title) in zip(axes, PANELS):
        points = [(r["step"], r[key]) for r in rl if r.get(key) is not None]
        ax.set(title=title, xlabel="GRPO step")
        if not points:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        steps, values = zip(*points)
        many = len(points) > 20   # a noisy per-step metric: faint, with its running mean over
        ax.plot(steps, values, "o-" if key == "eval/accuracy" else "-", alpha=0.35 if many else 1.0)
        if many and key != "eval/accuracy":
            ax.plot(steps, smooth(list(values), max(2, len(points) // 20)), color="C0")
    if sft:
        ax = axes[len(PANELS)]
        start, by_stage = 0, {}   # one axis over the whole curriculum: a stage starts where the last one ended
        for r in sft:
            if r["stage"] not in by_stage and by_stage:
                start = by_stage[max(by_stage)][-1][0] + 1   # a stage always logs its last step
            by_stage.setdefault(r["stage"], []).append((start + r["step"], r["loss"]))
        for stage, points in by_stage.items():
            ax.plot(*zip(*points), "-" if len(points) > 1 else "o", label=f"stage {stage}")
        ax.set(title="SFT loss by stage", xlabel="SFT step (all stages)", yscale="log")
        ax.legend(fontsize="small")
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(str(run))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
