"""
Evaluate a checkpoint written by train.py on one or more data sets: accuracy over N runs, unbiased pass@k, chain
length, one table row per data set.

    python eval.py --checkpoint runs/dropout                      # synthetic test split, the paper's protocol
    python eval.py --checkpoint runs/latent --data gsm8k-aug,gsm-hard,svamp,multiarith   # Latent-GRPO's low tasks
    python eval.py --checkpoint runs/latent --runs 8 --k 1,4,8 --explore true   # pass@k under the training policy
    python eval.py --checkpoint runs/dropout/checkpoint --data gsm_test.json,svamp.json --limit 200 --out d.json

`--checkpoint` is a checkpoint directory (it holds `algorithm.json`) or a run directory holding `checkpoint/`.
`--data` is a comma-separated list of data sets, each `synthetic`, a named hub set (gsm8k, gsm8k-aug, svamp,
multiarith, gsm-hard; `--split` picks the split) or a local file (.json / .jsonl / .parquet / .txt; data.py lists the
formats; `--field-map` names the fields of files it cannot tell). Every data set is loaded before the model, so a bad
one stops the run at once. The results are printed as one table, a row per data set named by its name or file stem,
and written as JSON to `--out` (default: `<checkpoint>/eval.json`):
{"checkpoint": ..., "protocol": ..., "runs": ..., "explore": ..., "results": {name: {"data": ..., "accuracy": ...}}}.

Protocols (`--protocol`), each paper's own; `auto` (default) takes the checkpoint's algorithm's:
- `coconut` (Dropout-GRPO's, from Coconut; dropout spec 3.11): 1 run, greedy, no dropout mask (`--explore false`).
  The default for dropout_grpo checkpoints and any algorithm without a protocol of its own.
- `latent-grpo` (Latent-GRPO's low tasks; latent spec 8): 5 runs, deterministic latent phase, answer sampled at
  T 0.6 / top-p 0.95 (`--explore false`); pass@1 = the mean accuracy over the 5 runs. The default for latent_grpo.
An explicit `--runs` or `--explore` overrides the protocol's. The decoding itself is each algorithm's `generate`.

What is measured, and how each paper measures it:
- Each algorithm names its scoring rule (`answer_format`). "coconut" is Coconut's run.py: the text after the
  last "#", commas removed, compared as strings ("18.0" is wrong when the gold is "18"). "math" is Latent-GRPO's
  low-task script: the last \\boxed{}, else the text after "####", else the last number, compared after
  Hendrycks-MATH normalisation or as numbers within 1e-5. Latent-GRPO's text is its whole output decoded with special
  tokens (latent top-1 ids included, the stop token left out), as the official script decodes it.
- `--explore false` is each paper's own evaluation policy (above). `--explore true` is the training rollout
  policy, which is what pass@k under "Gumbel sampling" / "mask sampling" refers to; for latent_grpo it runs at the
  official evaluation-with-noise settings, `--noise-scale` 1.0 and no answer top-k (`--answer-top-k` 0), unless given.
- accuracy = pass@1 = mean accuracy over `--runs` runs, each run seeded `seed + run`. pass@k uses the unbiased
  estimator 1 - C(n-c, k)/C(n, k) with n = runs, averaged over problems; only k <= runs is reported.
- mean_length counts generated positions (latent and token) over non-truncated outputs, averaged per run and
  then over runs, as the Latent-GRPO low-task script does; Latent-GRPO's truncated = length == the budget.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import distributed
from data import load_records, parse_field_map

# ----------------------------------------------------------------------------------------------------------------
# Coconut's scoring (run.py): the whole decoded output, the text after its last "#" ("### 18"); exact string match
# after removing commas. An output with no "#" is wrong: run.py decodes the question with the output, so its split
# then keeps question and output together, which never equals a gold answer.


def coconut_answer(text: str) -> str | None:
    """The text after the last "#", commas removed; None when there is no "#"."""
    return text.split("#")[-1].replace(",", "").strip() if "#" in text else None


def coconut_reward(text: str, gold: str) -> float:
    answer = coconut_answer(text)
    return float(answer is not None and answer == gold.replace(",", "").strip())


# ----------------------------------------------------------------------------------------------------------------
# Latent-GRPO's scoring (eval/eval_low_tasks_sglang.py, itself the Hendrycks-MATH `strip_string` normalisation).


def _fix_sqrt(s: str) -> str:
    """\\sqrt2 -> \\sqrt{2}."""
    head, *tails = s.split("\\sqrt")
    for t in tails:
        head += "\\sqrt" + (t if t.startswith("{") or not t else "{" + t[0] + "}" + t[1:])
    return head


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}."""
    head, *tails = s.split("\\frac")
    out = head
    for t in tails:
        out += "\\frac"
        if t.startswith("{"):
            out += t
        elif len(t) < 2:  # a dangling "\frac": leave the whole string alone, as the original does
            return s
        elif t[1] == "{":
            out += "{" + t[0] + "}" + t[1:]
        else:
            out += "{" + t[0] + "}{" + t[1] + "}" + t[2:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """3/4 -> \\frac{3}{4}, only for two plainly written integers."""
    if s.count("/") != 1:
        return s
    a, b = s.split("/")
    try:
        if f"{int(a)}/{int(b)}" == s:
            return f"\\frac{{{int(a)}}}{{{int(b)}}}"
    except ValueError:
        pass
    return s


def strip_string(s: str, remove_commas: bool = True) -> str:
    """Hendrycks et al.'s MATH answer normalisation, step for step as in Latent-GRPO's eval script
    (remove_commas=False: verl's math.strip_string, which keeps them)."""
    s = str(s).replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = s.split("\\text{ ")[0]  # units, "5 \text{ cm}" (the original crashes on two of them; we keep the first part)
    s = s.replace("\\%", "")  # a bare "%" stays: "50%" != "50", as in the original
    if remove_commas:
        s = s.replace(",", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs_rhs = s.split("=")
    if len(lhs_rhs) == 2 and len(lhs_rhs[0]) <= 2:  # "x = 5" -> "5": a short name on the left is dropped
        s = lhs_rhs[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces) or "\\boxed ..." (up to "$"); \\fbox{} if no \\boxed.

    (The official script lets any "\\boxed " win over a later "\\boxed{}", and drops \\fbox answers when it strips
    the wrapper; here the last one of either form counts, and \\fbox works.)
    """
    start = text.rfind("\\boxed")
    name = "\\boxed"
    if start < 0:
        start, name = text.rfind("\\fbox"), "\\fbox"
        if start < 0:
            return None
    rest = text[start + len(name):]
    if rest.startswith(" "):
        return rest[1:].split("$")[0]
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: no boxed answer


_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\d*\.?\d+"


def math_answer(text: str) -> str:
    """The last \\boxed{} answer, else the text after the last "####", else the last number; "" if none."""
    pred = _last_boxed(text) or ""
    if not pred and "####" in text:
        pred = text.split("####")[-1].strip()
    if not pred:
        numbers = re.findall(_NUMBER, text)
        pred = numbers[-1] if numbers else ""
    pred = re.sub(r"\n\s*", "", pred).strip().strip("$ ")
    pred = pred.removeprefix(":")
    return pred[:-1] if pred.endswith((".", "/")) else pred


def _as_number(s: str) -> float | None:
    """A normalised answer as a number: "18", "-2.5", "\\frac{3}{4}"; None if it is not one."""
    s = strip_string(s)  # once more, as the official script does (strip_string is not idempotent on odd input)
    frac = re.fullmatch(r"\\frac\{([+-]?\d+(?:\.\d+)?)\}\{([+-]?\d+(?:\.\d+)?)\}", s)
    if frac:
        den = float(frac.group(2))
        return float(frac.group(1)) / den if den else None
    try:
        return float(s)
    except ValueError:
        return None


def _normalise(answer: str) -> str:
    answer = str(answer).strip()
    if "boxed" in answer or "####" in answer:  # a gold written as "#### 18" or "\boxed{18}"
        answer = math_answer(answer)
    return strip_string(answer)


def math_equal(pred: str, gold: str) -> bool:
    """Equal after `strip_string`, or both numbers within 1e-5 ("18.0" == "18", "0.75" == "\\frac{3}{4}")."""
    a, b = _normalise(pred), _normalise(gold)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and abs(x - y) <= 1e-5


def math_reward(text: str, gold: str) -> float:
    return float(math_equal(math_answer(text), gold))


# ----------------------------------------------------------------------------------------------------------------
# Latent-GRPO's training reward (the official verl fork's utils/reward_score/math.py, compute_score): the last
# \boxed{} only, equal after strip_string (commas kept); no "####" or last-number fallback, no numeric tolerance.


def verl_math_reward(text: str, gold: str) -> float:
    """1.0 when the last \\boxed{...} (or "\\boxed x" up to "$") of `text` equals `gold` after verl's strip_string."""
    if "\\boxed " in text:   # verl: any "\boxed " wins, up to the next "$"
        pred = text.split("\\boxed ")[-1].split("$")[0]
    else:
        start = text.rfind("\\boxed")
        if start < 0:   # verl then looks for \fbox, whose answer its remove_boxed rejects: 0
            return 0.0
        depth, pred = 0, None
        for i in range(start, len(text)):
            depth += (text[i] == "{") - (text[i] == "}")
            if text[i] == "}" and depth == 0:
                pred = text[start:i + 1]
                break
        if pred is None or not pred.startswith("\\boxed{"):   # unbalanced, or "\boxedx": remove_boxed fails
            return 0.0
        pred = pred[len("\\boxed{"):-1]
    if max(pred.count("\\text{ "), str(gold).count("\\text{ ")) > 1:   # verl's unit removal fails: raw strings
        return float(pred == gold)
    return float(strip_string(pred, remove_commas=False) == strip_string(gold, remove_commas=False))


# An algorithm class names its evaluation rule in `answer_format` (and may name another for training in
# `train_reward`).
REWARDS = {"coconut": coconut_reward, "math": math_reward, "verl-math": verl_math_reward}
ANSWERS = {"coconut": coconut_answer, "math": math_answer}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k).

    Written as a product, C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i), so it never overflows.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ----------------------------------------------------------------------------------------------------------------
# Algorithms, imported only when asked for (train.py uses this registry too). A new method is one line here.

ALGORITHMS = {"dropout_grpo": "dropout_grpo:DropoutGRPO", "latent_grpo": "latent_grpo:LatentGRPO"}


def algorithm_class(name: str) -> type:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}")
    module, cls = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def checkpoint_dir(path: str | Path) -> Path:
    """The directory holding `algorithm.json`: `path` itself, or `path/checkpoint` for a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory not found: {path}")
    if (path / "checkpoint" / "algorithm.json").is_file():
        return path / "checkpoint"
    if not (path / "algorithm.json").is_file():
        raise ValueError(f"{path} is not a checkpoint: no algorithm.json in it or in {path / 'checkpoint'}")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device):
    """(algo, model, tokenizer) from a directory written by train.py; the model is on `device`, in eval mode."""
    path = checkpoint_dir(path)
    try:
        meta = json.loads((path / "algorithm.json").read_text())
        name, config, stage = meta["algo"], meta["config"], int(meta["stage"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / 'algorithm.json'}: not a valid algorithm file ({type(e).__name__}: {e})") from e
    cls = algorithm_class(name)
    try:
        cfg = cls.Config(**config)
    except TypeError as e:
        raise ValueError(f"{path / 'algorithm.json'}: config does not fit {name}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
    except OSError as e:
        raise ValueError(f"cannot load the model or tokenizer from {path}: {str(e).splitlines()[0]}") from e
    model.eval()
    algo = cls(model, tokenizer, cfg, add_tokens=False)  # the special tokens must already be there
    algo.stage = stage
    return algo, model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(algo, model, records: list[dict], *, runs: int = 1, explore: bool = False, batch_size: int = 64,
             seed: int = 0, ks=(1,), keep_examples: bool = False, keep_first: int | None = None) -> dict:
    """Generate `runs` completions per record with `algo.generate` and score them; returns a JSON-ready dict.

    Run r draws from a generator seeded `seed + r`, so runs differ only where the policy samples (with a
    deterministic policy all runs are identical and pass@k == pass@1). `keep_examples`: the result's "examples" hold
    each record's completions, those of the first `keep_first` records only when it is given.
    """
    if runs < 1 or batch_size < 1 or not records or any(k < 1 for k in ks):
        raise ValueError(f"need runs >= 1, batch_size >= 1, k >= 1 and some records "
                         f"(got runs={runs}, batch_size={batch_size}, ks={list(ks)}, {len(records)} records)")
    if algo.answer_format not in REWARDS:
        raise ValueError(f"unknown answer_format {algo.answer_format!r}; known: {', '.join(REWARDS)}")
    reward, answer = REWARDS[algo.answer_format], ANSWERS[algo.answer_format]
    model.eval()
    questions = [r["question"] for r in records]
    golds = [r["answer"] for r in records]
    P = len(records)

    # One entry per run; inside, one entry per problem: texts[r][i] is run r's completion of problem i.
    # torchrun: each rank generates its share of the problems (all of them in one process), then all are gathered
    mine = distributed.share(questions)
    texts, num_latent, lengths, truncated = [], [], [], []
    bar = tqdm(total=runs * len(mine), desc="eval", leave=False, disable=not distributed.is_main())
    for r in range(runs):
        generator = torch.Generator(device=model.device)
        generator.manual_seed(distributed.seed(seed + r))
        outs = []
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            outs.append(algo.generate(model, batch, explore, generator))
            if len(outs[-1].texts) != len(batch):
                raise RuntimeError(f"{type(algo).__name__}.generate gave {len(outs[-1].texts)} rows for {len(batch)}")
            bar.update(len(batch))
        per_row = zip([t for o in outs for t in o.texts], *(torch.cat([getattr(o, f).cpu() for o in outs]).tolist()
                                                          for f in ("num_latent", "lengths", "truncated")))
        run_texts, run_latent, run_len, run_truncated = zip(*distributed.gather_shares(list(per_row), P))
        texts.append(list(run_texts))
        num_latent.append(torch.tensor(run_latent))
        lengths.append(torch.tensor(run_len))
        truncated.append(torch.tensor(run_truncated))
    bar.close()
    num_latent, lengths, truncated = torch.stack(num_latent), torch.stack(lengths), torch.stack(truncated)  # (runs, P)

    correct = torch.tensor([[reward(texts[r][i], golds[i]) == 1.0 for i in range(P)] for r in range(runs)])
    per_run_acc = correct.double().mean(1)  # (runs,)
    n_correct = correct.sum(0).tolist()  # c_i of n = runs samples, per problem
    # Length over the outputs that ended (Latent-GRPO's low-task script): per run, then averaged over runs.
    ended = ~truncated
    run_lengths = [lengths[r][ended[r]].double().mean().item() for r in range(runs) if ended[r].any()]
    pass_k = {f"pass@{k}": statistics.fmean(pass_at_k(runs, c, k) for c in n_correct)
              for k in sorted(set(ks)) if k <= runs}

    result = {
        "accuracy": per_run_acc.mean().item(),
        "accuracy_std_over_runs": per_run_acc.std(correction=0).item(),  # population std: 0 for one run
        "accuracy_per_run": per_run_acc.tolist(),
        **pass_k,
        "mean_latent_steps": num_latent.double().mean().item(),
        "mean_length": statistics.fmean(run_lengths) if run_lengths else None,  # None: every output truncated
        "frac_truncated": truncated.double().mean().item(),
        "frac_never_exited": (num_latent == lengths).double().mean().item(),  # every position was latent
        "num_examples": P,
        "runs": runs,
    }
    if keep_examples:
        result["examples"] = [
            {"question": questions[i], "gold": golds[i],
             "completions": [texts[r][i] for r in range(runs)],
             "predictions": [answer(texts[r][i]) for r in range(runs)],
             "latent_steps": num_latent[:, i].tolist(), "num_correct": int(n_correct[i])}
            for i in range(P if keep_first is None else min(keep_first, P))
        ]
    return result


def evaluate_mc(algo, model, records: list[dict], *, masks: int, batch_size: int = 64, seed: int = 0) -> dict:
    """MC-dropout evaluation (dropout spec 3.11, the policy Dropout-GRPO optimises): every problem answered greedily
    under `masks` masks drawn from a generator seeded `seed`. mc_mean_reward: the mean reward over problems and
    masks (the BMA's expected reward); mc_vote_accuracy: the accuracy of the majority answer over the masks (ties:
    the answer reached first; no answer, e.g. no "#" under Coconut's rule, is a candidate and is wrong)."""
    if not hasattr(algo, "generate_masked"):
        raise ValueError(f"--mc-masks: {type(algo).__name__} has no dropout masks")
    if masks < 1 or batch_size < 1 or not records:
        raise ValueError(f"need masks >= 1, batch_size >= 1 and some records (got {masks}, {batch_size}, "
                         f"{len(records)} records)")
    reward, answer = REWARDS[algo.answer_format], ANSWERS[algo.answer_format]
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    per_batch = max(1, batch_size // masks)                       # questions per call: masks rows each
    mean_rewards, votes = [], []
    for start in range(0, len(records), per_batch):
        batch = records[start:start + per_batch]
        texts = algo.generate_masked(model, [r["question"] for r in batch], masks, generator).texts
        for i, r in enumerate(batch):
            group = texts[i * masks:(i + 1) * masks]              # group-major: problem i's masks
            rewards = [reward(t, r["answer"]) for t in group]
            answers = [answer(t) for t in group]
            winner = max(answers, key=answers.count)              # max keeps the first of equal counts
            mean_rewards.append(statistics.fmean(rewards))
            votes.append(rewards[answers.index(winner)])
    return {"mc_masks": masks, "mc_mean_reward": statistics.fmean(mean_rewards),
            "mc_vote_accuracy": statistics.fmean(votes)}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation protocols: each paper's, as presets of runs and explore (see the module docstring). The decoding they
# imply (greedy and no mask; deterministic latent phase, answer T 0.6 / top-p 0.95) is each algorithm's `generate`.

PROTOCOLS = {
    "coconut": {"runs": 1, "explore": False},  # dropout spec 3.11: greedy, no mask
    "latent-grpo": {"runs": 5, "explore": False},  # latent spec 8, low tasks: pass@1 = mean of 5 runs
}


def resolve_protocol(protocol: str, algo_cls: type, runs: int | None = None,
                     explore: bool | None = None) -> tuple[str, int, bool]:
    """(protocol, runs, explore): `auto` is the protocol the algorithm class names (`eval_protocol`, else coconut);
    a `runs` / `explore` given explicitly wins."""
    if protocol == "auto":
        protocol = getattr(algo_cls, "eval_protocol", "coconut")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: auto, {', '.join(PROTOCOLS)}")
    preset = PROTOCOLS[protocol]
    return (protocol, preset["runs"] if runs is None else runs, preset["explore"] if explore is None else explore)


def load_data_sets(data: str, split: str, seed: int = 0, field_map: dict | None = None,
                   limit: int | None = None) -> dict[str, tuple[str, list[dict]]]:
    """`a,b,c` -> {table name: (as given, first `limit` records)}; a set is named by its file stem (or its name)
    unless two stems clash, then by what was given."""
    given = [d.strip() for d in data.split(",") if d.strip()]
    if not given:
        raise ValueError("--data: no data set given")
    twice = sorted({d for d in given if given.count(d) > 1})
    if twice:
        raise ValueError(f"--data: {', '.join(twice)} listed twice")
    names = [Path(d).stem for d in given]
    if len(set(names)) < len(names):
        names = given
    sets = {}
    for name, d in zip(names, given):
        try:
            records = load_records(d, split, seed, field_map)[:limit]
        except ValueError as e:
            raise ValueError(f"--data {e}") from None
        if not records:
            raise ValueError(f"--data {d}: no examples")
        sets[name] = (d, records)
    return sets


def format_table(results: dict[str, dict]) -> str:
    """One row per data set: accuracy (= pass@1, +- std over runs), pass@k for 1 < k <= runs, mean latent steps,
    mean length, fraction truncated, number of problems."""
    pass_k = [k for k in next(iter(results.values())) if k.startswith("pass@") and k != "pass@1"]
    header = ["data", "accuracy", *pass_k, "latent steps", "length", "truncated", "n"]
    rows = [header]
    for name, r in results.items():
        acc = f"{r['accuracy']:.4f}" + (f" +- {r['accuracy_std_over_runs']:.4f}" if r["runs"] > 1 else "")
        length = "-" if r["mean_length"] is None else f"{r['mean_length']:.2f}"  # every output truncated
        rows.append([name, acc, *(f"{r[k]:.4f}" for k in pass_k), f"{r['mean_latent_steps']:.2f}", length,
                     f"{r['frac_truncated']:.3f}", str(r["num_examples"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


# ----------------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """Exactly the flags --help lists (no prefix abbreviations), and errors in one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, no usage dump: every user error looks the same
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_bool(s: str) -> bool:
    """Booleans are parsed, never truth-tested: the official scripts' `--flag False` was the truthy string."""
    if s.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if s.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _ks(s: str) -> list[int]:
    try:
        ks = [int(k) for k in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,8, got {s!r}") from None
    if any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"every k must be >= 1, got {s!r}")
    return ks


def _positive(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="Evaluate a checkpoint written by train.py on one or more data sets "
                            "(see the module docstring).")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (holds algorithm.json) or run dir")
    p.add_argument("--data", default="synthetic",
                   help="comma-separated data sets, each 'synthetic', a named hub set (gsm8k, gsm8k-aug, svamp, "
                        "multiarith, gsm-hard) or a local .json/.jsonl/.parquet/.txt file (default: synthetic)")
    p.add_argument("--field-map", default="",
                   help="fields of local files whose format is not detected: question=Body+Question,answer=Answer"
                        "[,steps=...] (a+b joins fields, a.b reads a nested key)")
    p.add_argument("--split", default="test", help="split of synthetic and the named sets (default: test)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic splits: train.py's --data-seed")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate the first N examples of each set only")
    p.add_argument("--protocol", choices=["auto", *PROTOCOLS], default="auto",
                   help="coconut: 1 greedy run, no mask (Coconut, Dropout-GRPO); latent-grpo: pass@1 = mean of 5 "
                        "runs, deterministic latent phase, answer at T 0.6 / top-p 0.95; auto (default): the "
                        "checkpoint's algorithm's (latent_grpo: latent-grpo, otherwise coconut)")
    p.add_argument("--runs", type=_positive, default=None, help="completions per problem (default: the protocol's)")
    p.add_argument("--k", type=_ks, default=[1, 4, 8, 16, 32, 64], help="pass@k to report (only k <= runs)")
    p.add_argument("--explore", type=parse_bool, default=None,
                   help="true: sample with the training policy, for pass@k (default: the protocol's, false)")
    p.add_argument("--noise-scale", type=float, default=None,
                   help="--explore true, latent_grpo: Gumbel noise scale of the latent steps (default: 1.0, the "
                        "official evaluation with noise)")
    p.add_argument("--answer-top-k", type=int, default=None,
                   help="--explore true, latent_grpo: top-k of answer sampling, 0 = none (default: 0, the official)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--seed", type=int, default=0, help="run r is seeded seed + r")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch, as train.py's --threads (1: fastest for the tiny default; 0: torch's)")
    p.add_argument("--keep-examples", type=parse_bool, default=False, help="store every completion in the JSON")
    p.add_argument("--mc-masks", type=int, default=0,
                   help="dropout_grpo: also answer greedily under M dropout masks (MC dropout): majority-vote "
                        "accuracy and mean reward over the masks, beside the no-mask evaluation (default 0: off)")
    p.add_argument("--out", default=None, help="output JSON (default: CHECKPOINT/eval.json)")
    return p.parse_args(argv)


def environment(device=None) -> dict:
    """What produced a number: library versions, the device, and the CPU kernels torch dispatches to. The last matters
    on CPU: the same wheel takes AVX2 or AVX-512 code paths (and MKL its own) by the processor it finds, and their
    float sums differ in the last bits, so one run's numbers are exact only on the same versions, kernels and threads."""
    import platform
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
           **{name: version(name) for name in ("torch", "transformers", "tokenizers", "datasets")},
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "device": str(device) if device is not None else None}
    if device is not None and torch.device(device).type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# The official evaluation with noise (Latent-GRPO's Gumbel pass@k): noise scale 1.0, no answer top-k, whatever the
# checkpoint was trained with.
EXPLORE_DEFAULTS = {"noise_scale": 1.0, "answer_top_k": 0}


def explore_policy(algo, explore: bool, **given) -> dict:
    """Set the exploring policy's knobs on algo.cfg: the given ones (None = not given), else EXPLORE_DEFAULTS for the
    fields the algorithm's Config has. Returns what was set. Given ones need --explore true and such a field."""
    given = {k: v for k, v in given.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(algo.cfg)} if dataclasses.is_dataclass(algo.cfg) else set()
    for name in given:
        flag = "--" + name.replace("_", "-")
        if not explore:
            raise ValueError(f"{flag} applies to the exploring policy only: add --explore true")
        if name not in fields:
            raise ValueError(f"{flag}: {type(algo).__name__} has no such setting")
    if not explore:
        return {}
    values = {k: given.get(k, v) for k, v in EXPLORE_DEFAULTS.items() if k in fields}
    algo.cfg = dataclasses.replace(algo.cfg, **values)   # its own checks: a bad value is a ValueError
    return values


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> dict:
    distributed.init()  # torchrun: the questions are shared out over the ranks (a no-op in one process)
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    try:
        ckpt = checkpoint_dir(args.checkpoint)
        if not out.parent.is_dir():
            raise ValueError(f"--out: directory {out.parent} does not exist")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0 (got {args.threads})")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = distributed.device(args.device)
        device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        sets = load_data_sets(args.data, args.split, args.data_seed, parse_field_map(args.field_map), args.limit)
        algo, model, _ = load_checkpoint(ckpt, device)
        protocol, runs, explore = resolve_protocol(args.protocol, type(algo), args.runs, args.explore)
        if args.mc_masks < 0 or (args.mc_masks and not hasattr(algo, "generate_masked")):
            raise ValueError(f"--mc-masks {args.mc_masks}: needs M >= 0 and an algorithm with dropout masks "
                             f"(dropout_grpo), got {type(algo).__name__}")
        policy = explore_policy(algo, explore, noise_scale=args.noise_scale, answer_top_k=args.answer_top_k)
    except ValueError as e:
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    results = {
        name: {"data": given, **evaluate(algo, model, records, runs=runs, explore=explore, batch_size=args.batch_size,
                                         seed=args.seed, ks=args.k, keep_examples=args.keep_examples)}
        for name, (given, records) in sets.items()
    }
    if args.mc_masks:
        for name, (_, records) in sets.items():
            results[name].update(evaluate_mc(algo, model, records, masks=args.mc_masks, batch_size=args.batch_size,
                                             seed=args.seed))
    report = {"checkpoint": str(ckpt), "algorithm": type(algo).__name__, "stage": algo.stage,
              "answer_format": algo.answer_format, "protocol": protocol, "runs": runs, "explore": explore,
              **policy, "seed": args.seed, "split": args.split, "limit": args.limit, "environment": environment(device),
              "results": results}
    if not distributed.is_main():  # torchrun: rank 0 alone reports and writes
        return report

    print(f"{ckpt}: {report['algorithm']} stage {algo.stage}, {algo.answer_format} scoring; protocol {protocol}: "
          f"{runs} run{'s' * (runs > 1)}, explore {str(explore).lower()}")
    print(format_table(results))
    for name, r in results.items():
        if "mc_masks" in r:
            print(f"{name}: MC dropout over {r['mc_masks']} masks: vote accuracy {r['mc_vote_accuracy']:.4f}, "
                  f"mean reward {r['mc_mean_reward']:.4f}")
    write_json_atomic(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
