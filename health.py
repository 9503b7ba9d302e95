"""
Degenerate states of a run, each told in one line with its cause and its fix, instead of a run that goes on doing
nothing. train.py calls `check_eval` after every evaluation, `RLWatch.update` after every GRPO step and `check_sft`
on every logged SFT loss.

Each check returns None or a `Problem`; `fatal` problems stop the run (train.UserError) unless --allow-degenerate
true, the others are printed as warnings. Fatal are the states in which GRPO cannot learn at all: no row leaves latent
mode from a checkpoint's initialisation (every advantage of a truncated row is masked, the gradient is 0) and a non-finite SFT loss (the weights are
NaN). Every-row-truncated evaluations, a rising SFT loss, and long runs of zero-variance or identical groups are
warnings: they can recover, and on a hard task at the start of RL they are expected for a while.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Problem:
    message: str
    fatal: bool


def check_eval(result: dict, name: str, budget_flag: str, trained_here: bool = False) -> Problem | None:
    """An evaluation's result (eval.evaluate): never-exited latent rows, then every / most rows truncated. Never
    exiting is fatal for a run that starts GRPO from a checkpoint (its end id is what it is); a run that trains its
    initialisation may be short of SFT steps, and is warned."""
    never, truncated = result.get("frac_never_exited", 0.0), result.get("frac_truncated", 0.0)
    if result["mean_latent_steps"] > 0 and never == 1.0 and truncated == 1.0:
        return Problem(
            f"{name}: no output left latent mode (every position latent, every row truncated): the model never "
            f"predicts the end-of-latent id. A tokenizer that splits </think> on a model without latent training "
            f"does this; train the latent initialisation here (--cot-steps/--sft-steps > 0, which add the tokens) or "
            f"start from a latent checkpoint", fatal=not trained_here)
    if truncated == 1.0:
        return Problem(f"{name}: every output was truncated: no answer reached EOS within {budget_flag}; raise "
                       f"{budget_flag} (GSM8K needs ~256 tokens for an explicit chain of thought)", fatal=False)
    if truncated > 0.5:
        return Problem(f"{name}: {truncated:.0%} of the outputs were truncated at {budget_flag}: the budget is short "
                       f"for this task; raise {budget_flag}", fatal=False)
    return None


def check_sft(losses: list[float], stage: int) -> Problem | None:
    """SFT losses logged so far in one stage: non-finite (fatal), or the last clearly above the first (warning)."""
    if not losses:
        return None
    if not math.isfinite(losses[-1]):
        return Problem(f"sft stage {stage}: the loss is {losses[-1]}: the weights diverged; lower --sft-lr "
                       f"(1e-4 suits a pretrained model) or use float32 (no --bf16)", fatal=True)
    if len(losses) >= 3 and losses[-1] > 1.5 * losses[0]:
        return Problem(f"sft stage {stage}: the loss rose from {losses[0]:.3f} to {losses[-1]:.3f}: --sft-lr is too "
                       f"high for this model (1e-4 suits a pretrained one)", fatal=False)
    return None


class RLWatch:
    """Counts consecutive GRPO steps in which every group has zero reward variance, or every group's completions
    are identical; warns once per streak when it reaches `patience` steps. No learning signal either way."""

    def __init__(self, patience: int = 10):
        self.patience = patience
        self.zero_std = self.identical = 0

    def update(self, frac_reward_zero_std: float, texts: list[str] | None, group_size: int) -> list[Problem]:
        problems = []
        self.zero_std = self.zero_std + 1 if frac_reward_zero_std == 1.0 else 0
        if self.zero_std == self.patience:
            problems.append(Problem(
                f"grpo: for {self.patience} steps every group had one reward for all its rollouts (zero advantage, no "
                f"gradient): the task is too hard or too easy for this model; raise --num-generations or "
                f"--temperature, use --filter-groups true, or train the initialisation longer", fatal=False))
        same = texts is not None and all(len(set(texts[i:i + group_size])) == 1 for i in range(0, len(texts), group_size))
        self.identical = self.identical + 1 if same else 0
        if self.identical == self.patience:
            problems.append(Problem(
                f"grpo: for {self.patience} steps every group's rollouts were identical: the policy does not explore; "
                f"raise --temperature (or the algorithm's noise: --p, --noise-scale)", fatal=False))
        return problems
