"""eval.py: the two answer rules, unbiased pass@k, the aggregation in `evaluate`, checkpoint loading, the CLI.

Algorithms are replaced by small fakes here (the real ones are exercised end to end in test_train.py).
"""
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eval as ev

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Coconut's rule: text after the last "#", commas removed, exact string equality


@pytest.mark.parametrize("text, gold, reward", [
    ("<<2*4=8>>\n<<3+8=11>>\n### 11", "11", 1.0),
    ("### 1,234 ", "1234", 1.0),        # commas removed on both sides, spaces stripped
    ("### 1234", "1,234", 1.0),
    ("### 18.0", "18", 0.0),            # exact string: "18.0" != "18"
    ("### 18", "18.0", 0.0),
    ("### 11 apples", "11", 0.0),
    ("11", "11", 0.0),                  # no "#": no answer, wrong (Coconut's rule)
    ("<<3+8=11>>\n11", "11", 0.0),
    ("# 3 # 4", "4", 1.0),              # the last "#" counts
    ("### 4#", "4", 0.0),               # ... even when nothing follows it
    ("", "0", 0.0),
])
def test_coconut_reward(text, gold, reward):
    assert ev.coconut_reward(text, gold) == reward


def test_coconut_answer():
    assert ev.coconut_answer("step\n### 1,000,000\n") == "1000000"
    assert ev.coconut_answer("no hash here ") is None
    assert ev.coconut_answer("#") == ""


# ---------------------------------------------------------------------------------------------------------------
# Latent-GRPO's rule: last \boxed{} / "####" / last number, Hendrycks normalisation or numbers within 1e-5


@pytest.mark.parametrize("text, answer", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),           # nested braces are balanced
    (r"\boxed{a_{1}+{b}}", r"a_{1}+{b}"),
    (r"first \boxed{1}, then \boxed{2}", "2"),          # the last box counts
    (r"$\boxed 7$ apples", "7"),                        # "\boxed " form: up to the next "$"
    (r"\fbox{9}", "9"),
    (r"\boxed{12 and no closing brace, 13", "13"),      # unbalanced: falls back to the last number
    (r"\boxed{} #### 5", "5"),                          # empty box: falls back to "####"
    (r"\boxed5 then 6", "6"),                           # no brace after \boxed: no box
    ("3 plus 4 gives\n#### 7", "7"),
    ("#### 5 apples", "5 apples"),
    ("it costs 1,234.5 dollars.", "1,234.5"),           # last number, thousands separators kept
    ("from -3 down to -4.", "-4"),
    ("so .5 of it", ".5"),
    ("the total is 12.", "12"),
    ("no digits at all", ""),
])
def test_math_answer(text, answer):
    assert ev.math_answer(text) == answer


@pytest.mark.parametrize("text, gold, reward", [
    ("it is 18.0", "18", 1.0),                          # numbers within 1e-5 (Coconut's rule says 0 here)
    (r"\boxed{18}", "18.0", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),                    # commas
    ("#### 1,000", "1,000", 1.0),
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),              # \frac parses as a number
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),              # dfrac -> frac; a/b -> \frac{a}{b}
    (r"\boxed{\frac34}", "0.75", 1.0),                  # \frac34 -> \frac{3}{4}
    (r"\boxed{\frac{1}{3}}", "0.33333", 1.0),           # |1/3 - 0.33333| < 1e-5
    (r"\boxed{\frac{1}{3}}", "0.333", 0.0),
    (r"\boxed{\frac{1}{0}}", "0", 0.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),                       # a short name left of "=" is dropped
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{5 \text{ cm}}", "5", 1.0),
    (r"\boxed{\$5}", "5", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    ("the answer is 7", "#### 7", 1.0),                 # a gold in "####" form is extracted too
    ("the answer is 7", r"\boxed{7}", 1.0),
    (r"\boxed{x+1}", "x + 1", 1.0),                     # spaces do not matter
    (r"\boxed{x+1}", "x+2", 0.0),
    ("no answer", "7", 0.0),
    ("12 then 13", "12", 0.0),                          # the last number counts
])
def test_math_reward(text, gold, reward):
    assert ev.math_reward(text, gold) == reward


def test_reward_registry():
    assert ev.REWARDS == {"coconut": ev.coconut_reward, "math": ev.math_reward, "verl-math": ev.verl_math_reward}


@settings(deadline=None, max_examples=60)
@given(v=st.integers(-10**7, 10**7))
def test_integer_formats_under_each_rule(v):
    gold = str(v)
    # Latent-GRPO's rule: "1,234", "1234.0" and a boxed answer are all the same number.
    for text in (f"{v:,}", f"{v}.0", f"\\boxed{{{v:,}}}", f"#### {v}", f"so {v}."):
        assert ev.math_reward(text, gold) == 1.0, text
    assert ev.math_reward(f"\\boxed{{{v + 1}}}", gold) == 0.0
    # Coconut's rule: commas are fine, "1234.0" is not.
    assert ev.coconut_reward(f"### {v:,}", gold) == 1.0
    assert ev.coconut_reward(f"### {v}.0", gold) == 0.0


@settings(deadline=None, max_examples=60)
@given(a=st.integers(-999, 999), b=st.integers(1, 999))
def test_fractions_match_their_decimal(a, b):
    decimal = f"{a / b:.9f}"
    assert ev.math_reward(f"\\boxed{{\\frac{{{a}}}{{{b}}}}}", decimal) == 1.0
    other = Fraction(a, b) + Fraction(1, 1000)
    assert ev.math_reward(f"\\boxed{{\\frac{{{a}}}{{{b}}}}}", f"{float(other):.9f}") == 0.0


MATHY = st.text(alphabet="0123456789-.,/{}=$% x\\fracboxedtext#", max_size=24)


@settings(deadline=None, max_examples=200)
@given(a=MATHY, b=MATHY)
def test_math_equal_symmetric_and_reflexive(a, b):
    assert ev.math_equal(a, b) == ev.math_equal(b, a)
    assert ev.math_equal(a, a)


@settings(deadline=None, max_examples=200)
@given(text=st.text(max_size=60), gold=MATHY)
def test_math_reward_never_raises(text, gold):
    assert ev.math_reward(text, gold) in (0.0, 1.0)
    assert ev.coconut_reward(text, gold) in (0.0, 1.0)


# Answers as people write them: strip_string should be idempotent on these, and scoring a pre-normalised answer
# must give the same verdict as scoring the raw one.
NUMBER = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.integers(-10**6, 10**6).map(lambda v: f"{v:,}"),
    st.tuples(st.integers(0, 999), st.integers(0, 999)).map(lambda t: f"{t[0]}.{t[1]}"),
    st.integers(0, 999).map(lambda v: f".{v}"),
    st.tuples(st.integers(-99, 99), st.integers(1, 99)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.sampled_from(["frac", "dfrac", "tfrac"]), st.integers(-99, 99), st.integers(1, 99))
    .map(lambda t: f"\\{t[0]}{{{t[1]}}}{{{t[2]}}}"),
    st.tuples(st.integers(1, 9), st.integers(1, 9)).map(lambda t: f"\\frac{t[0]}{t[1]}"),
)
DECORATED = st.tuples(st.sampled_from(["@", "x = @", "@\\%", "\\$@", "@^\\circ", "@ \\text{ cm}",
                                       "\\left( @ \\right)", " @ "]), NUMBER).map(lambda t: t[0].replace("@", t[1]))


@settings(deadline=None, max_examples=200)
@given(s=DECORATED, other=DECORATED)
def test_strip_string_idempotent_on_answers(s, other):
    once = ev.strip_string(s)
    assert ev.strip_string(once) == once
    assert ev.math_equal(s, once)
    assert ev.math_equal(s, other) == ev.math_equal(once, other)


# ---------------------------------------------------------------------------------------------------------------
# Unbiased pass@k


def pass_at_k_enumerated(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@settings(deadline=None, max_examples=100)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_enumeration(nck):
    n, c, k = nck
    assert ev.pass_at_k(n, c, k) == pytest.approx(pass_at_k_enumerated(n, c, k), abs=1e-12)
    assert ev.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


@settings(deadline=None, max_examples=100)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_monotone_and_bounded(nck):
    n, c, k = nck
    p = ev.pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    if k < n:
        assert ev.pass_at_k(n, c, k + 1) >= p - 1e-12
    if c < n:
        assert ev.pass_at_k(n, c + 1, k) >= p - 1e-12
    assert (p == 0.0) == (c == 0)


def test_pass_at_k_large_n_and_bad_args():
    assert ev.pass_at_k(10**6, 1, 1) == pytest.approx(1e-6, rel=1e-9)   # no overflow, no cancellation to 0
    assert ev.pass_at_k(200, 100, 150) == 1.0                           # n - c < k
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------------------------
# evaluate() with a fake algorithm


@dataclass
class FakeRollout:
    texts: list
    num_latent: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor


class FakeModel(torch.nn.Linear):
    """Stands in for an HF model: an nn.Module with a `.device`."""

    def __init__(self):
        super().__init__(1, 1)

    @property
    def device(self):
        return self.weight.device


class TableAlgo:
    """The r-th time question q is asked, generate() answers table[q][r] = (text, num_latent, length, truncated)."""

    def __init__(self, table, answer_format="coconut"):
        self.table, self.answer_format = table, answer_format
        self.asked, self.calls = Counter(), []

    def generate(self, model, questions, explore, generator):
        self.calls.append({"n": len(questions), "explore": explore, "seed": generator.initial_seed(),
                           "training": model.training})
        rows = []
        for q in questions:
            rows.append(self.table[q][self.asked[q]])
            self.asked[q] += 1
        texts, num_latent, lengths, truncated = zip(*rows)
        return FakeRollout(list(texts), torch.tensor(num_latent), torch.tensor(lengths), torch.tensor(truncated))


def test_evaluate_by_hand():
    records = [{"question": f"q{i}", "steps": [], "answer": str(i + 1)} for i in range(3)]
    table = {  # run 0, run 1
        "q0": [("### 1", 6, 10, False), ("### 1", 6, 12, False)],   # right, right
        "q1": [("### 5", 6, 20, True), ("### 2", 6, 8, False)],     # wrong (truncated), right
        "q2": [("", 6, 6, False), ("### 4", 4, 20, True)],          # wrong (never left latent mode), wrong
    }
    algo, model = TableAlgo(table), FakeModel()
    assert model.training
    res = ev.evaluate(algo, model, records, runs=2, explore=True, batch_size=2, seed=7, ks=(1, 2, 4),
                      keep_examples=True)

    # batches of 2 then 1, per run; one generator per run seeded seed + r; the model in eval mode; explore passed
    assert [(c["n"], c["seed"], c["explore"], c["training"]) for c in algo.calls] == [
        (2, 7, True, False), (1, 7, True, False), (2, 8, True, False), (1, 8, True, False)]
    assert res["accuracy_per_run"] == pytest.approx([1 / 3, 2 / 3])
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["accuracy_std_over_runs"] == pytest.approx(1 / 6)
    assert res["pass@1"] == pytest.approx(0.5)                # (2/2 + 1/2 + 0/2) / 3
    assert res["pass@2"] == pytest.approx(2 / 3)              # (1 + 1 + 0) / 3
    assert "pass@4" not in res                                # k > runs is not reported
    assert res["mean_latent_steps"] == pytest.approx(34 / 6)
    assert res["mean_length"] == pytest.approx(9.0)           # run 0: (10 + 6) / 2, run 1: (12 + 8) / 2
    assert res["frac_truncated"] == pytest.approx(2 / 6)
    assert res["frac_never_exited"] == pytest.approx(1 / 6)
    assert res["num_examples"] == 3 and res["runs"] == 2
    assert res["examples"][1] == {"question": "q1", "gold": "2", "completions": ["### 5", "### 2"],
                                  "predictions": ["5", "2"], "latent_steps": [6, 6], "num_correct": 1}
    json.dumps(res, allow_nan=False)                          # JSON-ready


def test_evaluate_keeps_the_first_examples_only_when_asked():
    records = [{"question": f"q{i}", "steps": [], "answer": "1"} for i in range(3)]
    def kept(n):
        algo = TableAlgo({f"q{i}": [("### 1", 2, 4, False)] for i in range(3)})
        res = ev.evaluate(algo, FakeModel(), records, keep_examples=True, keep_first=n)
        assert res["num_examples"] == 3
        return [ex["question"] for ex in res["examples"]]
    assert kept(2) == ["q0", "q1"] and kept(5) == kept(None) == ["q0", "q1", "q2"]


def test_evaluate_without_examples_and_all_truncated():
    records = [{"question": "q", "steps": [], "answer": "3"}]
    algo = TableAlgo({"q": [(r"\boxed{3.0}", 2, 128, True)]}, answer_format="math")
    res = ev.evaluate(algo, FakeModel(), records)
    assert "examples" not in res
    assert res["accuracy"] == 1.0 and res["mean_length"] is None and res["frac_truncated"] == 1.0
    json.dumps(res, allow_nan=False)


@settings(deadline=None, max_examples=40)
@given(data=st.data())
def test_evaluate_matches_plain_loops(data):
    P = data.draw(st.integers(1, 5))
    runs = data.draw(st.integers(1, 4))
    fmt = data.draw(st.sampled_from(["coconut", "math"]))
    golds = [data.draw(st.sampled_from(["1", "2"])) for _ in range(P)]
    row = st.tuples(st.sampled_from(["### 1", "### 2", r"\boxed{2}", "1", ""]), st.integers(0, 4),
                    st.integers(0, 4), st.booleans()).map(lambda t: (t[0], t[1], t[1] + t[2], t[3]))
    table = {f"q{i}": [data.draw(row) for _ in range(runs)] for i in range(P)}
    records = [{"question": f"q{i}", "steps": [], "answer": golds[i]} for i in range(P)]
    res = ev.evaluate(TableAlgo(table, fmt), FakeModel(), records, runs=runs,
                      batch_size=data.draw(st.integers(1, 4)), ks=(1, 2, 3))

    reward = ev.REWARDS[fmt]
    cells = [(table[f"q{i}"][r], golds[i], r) for i in range(P) for r in range(runs)]
    acc = [sum(reward(table[f"q{i}"][r][0], golds[i]) for i in range(P)) / P for r in range(runs)]
    mean = sum(acc) / runs
    assert res["accuracy"] == pytest.approx(mean)
    assert res["accuracy_std_over_runs"] == pytest.approx((sum((a - mean) ** 2 for a in acc) / runs) ** 0.5)
    for k in (1, 2, 3):
        if k <= runs:
            c = [sum(reward(table[f"q{i}"][r][0], golds[i]) for r in range(runs)) for i in range(P)]
            expect = sum(pass_at_k_enumerated(runs, int(ci), k) for ci in c) / P
            assert res[f"pass@{k}"] == pytest.approx(expect)
        else:
            assert f"pass@{k}" not in res
    assert res["pass@1"] == pytest.approx(res["accuracy"])
    assert res["mean_latent_steps"] == pytest.approx(sum(cell[0][1] for cell in cells) / len(cells))
    per_run = []
    for r in range(runs):
        ended = [cell[0][2] for cell in cells if cell[2] == r and not cell[0][3]]
        if ended:
            per_run.append(sum(ended) / len(ended))
    assert res["mean_length"] == (pytest.approx(sum(per_run) / len(per_run)) if per_run else None)
    assert res["frac_truncated"] == pytest.approx(sum(cell[0][3] for cell in cells) / len(cells))
    assert res["frac_never_exited"] == pytest.approx(sum(cell[0][1] == cell[0][2] for cell in cells) / len(cells))


class MaskTableAlgo:
    """generate_masked answers question q's m-th mask with table[q][m] (group-major rows, as DropoutGRPO)."""
    answer_format = "coconut"

    def __init__(self, table):
        self.table, self.batches = table, []

    def generate_masked(self, model, questions, num_masks, generator):
        self.batches.append(len(questions))
        texts = [self.table[q][m] for q in questions for m in range(num_masks)]
        n = len(texts)
        return FakeRollout(texts, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long),
                           torch.zeros(n, dtype=torch.bool))


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_evaluate_mc_by_hand(batch_size):
    records = [{"question": f"q{i}", "steps": [], "answer": "7"} for i in range(4)]
    table = {"q0": ["### 7", "### 7", "### 3", "### 7"],     # vote 7: right; mean 3/4
             "q1": ["### 3", "7", "7", "### 7"],             # no "#" twice: the vote is no answer, wrong; mean 1/4
             "q2": ["### 3", "### 7", "### 7", "### 3"],     # tie: the first reached (3) wins, wrong; mean 2/4
             "q3": ["### 3", "### 3", "### 3", "### 3"]}     # wrong; mean 0
    algo = MaskTableAlgo(table)
    res = ev.evaluate_mc(algo, FakeModel(), records, masks=4, batch_size=batch_size)
    assert res == {"mc_masks": 4, "mc_mean_reward": pytest.approx((3 + 1 + 2 + 0) / 16),
                   "mc_vote_accuracy": pytest.approx(1 / 4)}
    assert sum(algo.batches) == 4 and max(algo.batches) == max(1, min(4, batch_size // 4))
    with pytest.raises(ValueError, match="no dropout masks"):
        ev.evaluate_mc(CoinAlgo(), FakeModel(), records, masks=2)


class CoinAlgo:
    """Right with probability 1/2, drawn from the generator it is given."""
    answer_format = "coconut"

    def generate(self, model, questions, explore, generator):
        right = torch.rand(len(questions), generator=generator, device=model.device) < 0.5
        n = len(questions)
        return FakeRollout([f"### {1 if ok else 0}" for ok in right.tolist()], torch.zeros(n, dtype=torch.long),
                           torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))


def test_evaluate_is_seeded():
    records = [{"question": f"q{i}", "steps": [], "answer": "1"} for i in range(64)]
    run = lambda seed: ev.evaluate(CoinAlgo(), FakeModel(), records, runs=3, seed=seed, batch_size=10,  # noqa: E731
                                   ks=(1, 3), keep_examples=True)
    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a["examples"] != c["examples"]
    per_run = [[ex["completions"][r] for ex in a["examples"]] for r in range(3)]
    assert per_run[0] != per_run[1]          # each run has its own seed


def test_evaluate_rejects_bad_arguments():
    records = [{"question": "q", "steps": [], "answer": "1"}]
    algo = TableAlgo({"q": [("### 1", 0, 1, False)]})
    for kwargs in [{"runs": 0}, {"batch_size": 0}, {"ks": (0,)}]:
        with pytest.raises(ValueError):
            ev.evaluate(algo, FakeModel(), records, **kwargs)
    with pytest.raises(ValueError):
        ev.evaluate(algo, FakeModel(), [])
    algo.answer_format = "latex"
    with pytest.raises(ValueError, match="answer_format"):
        ev.evaluate(algo, FakeModel(), records)


# ---------------------------------------------------------------------------------------------------------------
# The algorithm registry and load_checkpoint, with a fake algorithm registered under "fake"


def test_algorithm_class_unknown_name():
    with pytest.raises(ValueError, match="dropout_grpo.*latent_grpo"):
        ev.algorithm_class("ppo")


@dataclass
class FakeConfig:
    x: int = 1


class CheckpointAlgo:
    Config = FakeConfig
    answer_format = "coconut"

    def __init__(self, model, tokenizer, cfg, add_tokens):
        self.model, self.tokenizer, self.cfg, self.add_tokens = model, tokenizer, cfg, add_tokens
        self.stage = 0

    def generate(self, model, questions, explore, generator):
        n = len(questions)
        return FakeRollout(["### 0"] * n, torch.full((n,), 3), torch.full((n,), 5), torch.zeros(n, dtype=torch.bool))


@pytest.fixture
def fake_registry(monkeypatch):
    monkeypatch.setitem(ev.ALGORITHMS, "fake", f"{__name__}:CheckpointAlgo")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as train.py writes it: run/checkpoint/{model, tokenizer, algorithm.json}."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import data

    tok = data.build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=len(tok), n_positions=128))
    ckpt = tmp_path_factory.mktemp("run") / "checkpoint"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    (ckpt / "algorithm.json").write_text(json.dumps({"algo": "fake", "config": {"x": 3}, "stage": 2}))
    return ckpt.parent, model


def test_load_checkpoint(fake_registry, run_dir):
    run, original = run_dir
    for path in (run, run / "checkpoint"):  # a run directory or the checkpoint directory itself
        algo, model, tok = ev.load_checkpoint(path, "cpu")
        assert isinstance(algo, CheckpointAlgo)
        assert algo.cfg == FakeConfig(x=3) and algo.stage == 2 and algo.add_tokens is False
        assert algo.model is model and algo.tokenizer is tok
        assert not model.training and model.device.type == "cpu"
        assert len(tok) == original.config.vocab_size
        for (name, p), q in zip(model.state_dict().items(), original.state_dict().values()):
            assert torch.equal(p, q), name


def test_load_checkpoint_errors(fake_registry, run_dir, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ev.load_checkpoint(tmp_path / "missing", "cpu")
    with pytest.raises(ValueError, match="algorithm.json"):
        ev.load_checkpoint(tmp_path, "cpu")
    for meta, message in [({"algo": "ppo", "config": {}, "stage": 0}, "dropout_grpo"),
                          ({"algo": "fake", "config": {"y": 1}, "stage": 0}, "config"),
                          ({"algo": "fake"}, "algorithm.json")]:
        (tmp_path / "algorithm.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=message):
            ev.load_checkpoint(tmp_path, "cpu")


def test_main_writes_json(fake_registry, run_dir, capsys):
    run, _ = run_dir
    res = ev.main(["--checkpoint", str(run), "--limit", "3", "--runs", "2", "--k", "1,2,8", "--device", "cpu"])
    written = json.loads((run / "eval.json").read_text())
    assert written == res
    assert res["algorithm"] == "CheckpointAlgo" and res["stage"] == 2 and res["runs"] == 2
    assert list(res["results"]) == ["synthetic"]
    r = res["results"]["synthetic"]
    assert r["data"] == "synthetic" and r["num_examples"] == 3
    assert r["accuracy"] == 0.0 and "pass@2" in r and "pass@8" not in r and r["mean_length"] == 5.0
    assert sorted(os.listdir(run)) == ["checkpoint", "eval.json"]   # no temporary file left behind
    assert "accuracy" in capsys.readouterr().out
    (run / "eval.json").unlink()


FIXTURES = ROOT / "tests" / "fixtures"


def test_main_several_data_sets_one_table(fake_registry, run_dir, tmp_path, capsys):
    run, _ = run_dir
    data = f"synthetic,{FIXTURES / 'gsm8k_aug.txt'},{FIXTURES / 'svamp.json'},{FIXTURES / 'multiarith.json'}"
    res = ev.main(["--checkpoint", str(run), "--data", data, "--limit", "2", "--runs", "3", "--k", "1,2",
                   "--device", "cpu", "--out", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text()) == res
    assert list(res["results"]) == ["synthetic", "gsm8k_aug", "svamp", "multiarith"]   # names: given, or file stems
    assert res["results"]["svamp"]["data"] == str(FIXTURES / "svamp.json")
    for r in res["results"].values():
        assert r["num_examples"] == 2 and r["runs"] == 3 and r["accuracy"] == 0.0 and r["pass@2"] == 0.0
        assert r["mean_latent_steps"] == 3.0 and r["mean_length"] == 5.0 and r["frac_truncated"] == 0.0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(next(line for line in out if line.startswith("data "))):-1]
    assert table[0].split() == ["data", "accuracy", "pass@2", "latent", "steps", "length", "truncated", "n"]
    assert [line.split()[0] for line in table[1:]] == ["synthetic", "gsm8k_aug", "svamp", "multiarith"]
    assert table[2].split() == ["gsm8k_aug", "0.0000", "+-", "0.0000", "0.0000", "3.00", "5.00", "0.000", "2"]


def test_main_names_clashing_stems_by_path(fake_registry, run_dir, tmp_path):
    run, _ = run_dir
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    paths = [str(tmp_path / d / "test.jsonl") for d in ("a", "b")]
    res = ev.main(["--checkpoint", str(run), "--data", ",".join(paths), "--device", "cpu",
                   "--out", str(tmp_path / "e.json")])
    assert list(res["results"]) == paths


@pytest.mark.parametrize("protocol, algo, runs, explore, expected", [
    ("auto", "dropout_grpo", None, None, ("coconut", 1, False)),
    ("auto", "latent_grpo", None, None, ("latent-grpo", 5, False)),
    ("auto", None, None, None, ("coconut", 1, False)),               # no protocol of its own: greedy, one run
    ("coconut", "latent_grpo", None, None, ("coconut", 1, False)),
    ("latent-grpo", "dropout_grpo", None, None, ("latent-grpo", 5, False)),
    ("auto", "latent_grpo", 8, True, ("latent-grpo", 8, True)),       # explicit flags win
    ("coconut", "dropout_grpo", None, True, ("coconut", 1, True)),
])
def test_resolve_protocol(protocol, algo, runs, explore, expected):
    cls = ev.algorithm_class(algo) if algo else type("MyMethod", (), {})
    assert ev.resolve_protocol(protocol, cls, runs, explore) == expected


def test_resolve_protocol_unknown():
    with pytest.raises(ValueError, match="latent-grpo"):
        ev.resolve_protocol("pal", ev.algorithm_class("latent_grpo"))


@pytest.fixture
def latent_run(monkeypatch, run_dir, tmp_path):
    """The fake algorithm, naming Latent-GRPO's protocol, in a checkpoint that says latent_grpo."""
    import shutil

    monkeypatch.setattr(CheckpointAlgo, "eval_protocol", "latent-grpo", raising=False)
    monkeypatch.setitem(ev.ALGORITHMS, "latent_grpo", f"{__name__}:CheckpointAlgo")
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(run_dir[0] / "checkpoint", ckpt)
    (ckpt / "algorithm.json").write_text(json.dumps({"algo": "latent_grpo", "config": {"x": 3}, "stage": 2}))
    return ckpt


@pytest.mark.parametrize("flags, expected", [
    ([], ("latent-grpo", 5, False)),
    (["--protocol", "coconut"], ("coconut", 1, False)),
    (["--runs", "2", "--explore", "true"], ("latent-grpo", 2, True)),
])
def test_main_protocol(latent_run, tmp_path, flags, expected):
    res = ev.main(["--checkpoint", str(latent_run), "--limit", "2", "--k", "1,4", "--device", "cpu",
                   "--out", str(tmp_path / "e.json"), *flags])
    assert (res["protocol"], res["runs"], res["explore"]) == expected
    r = res["results"]["synthetic"]
    assert r["runs"] == expected[1] and len(r["accuracy_per_run"]) == expected[1]
    assert ("pass@4" in r) == (expected[1] >= 4)


@pytest.mark.parametrize("value, expected", [("false", False), ("0", False), ("No", False), ("False", False),
                                             ("true", True), ("1", True), ("yes", True), ("True", True)])
def test_boolean_flags_are_parsed(value, expected):
    assert ev.parse_args(["--checkpoint", "x", "--explore", value]).explore is expected


# ---------------------------------------------------------------------------------------------------------------
# CLI user errors: one line on stderr, exit code 2, no traceback, nothing written


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_user_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0]


def test_cli_missing_checkpoint(tmp_path):
    out = tmp_path / "out.json"
    proc = run_cli("--checkpoint", str(tmp_path / "nope"), "--out", str(out))
    assert_user_error(proc, str(tmp_path / "nope"))
    assert os.listdir(tmp_path) == []


def test_cli_bad_flag_value(tmp_path):
    assert_user_error(run_cli("--checkpoint", str(tmp_path), "--explore", "maybe"), "--explore", "maybe")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("data, words", [
    ("synthetic,gsm9k", ["--data gsm9k", "not a named data set"]),
    ("synthetic,synthetic", ["synthetic listed twice"]),
    ("gsm-hard", ["--data gsm-hard has no 'valid' split"]),
])
def test_cli_bad_data_set(tmp_path, data, words):
    (tmp_path / "algorithm.json").write_text(json.dumps({"algo": "dropout_grpo", "config": {}, "stage": 0}))
    split = ["--split", "valid"] if data == "gsm-hard" else []
    assert_user_error(run_cli("--checkpoint", str(tmp_path), "--data", data, *split), *words)
    assert os.listdir(tmp_path) == ["algorithm.json"]


def test_cli_threads(tmp_path):
    (tmp_path / "algorithm.json").write_text(json.dumps({"algo": "dropout_grpo", "config": {}, "stage": 0}))
    assert_user_error(run_cli("--checkpoint", str(tmp_path), "--threads", "-1"), "--threads must be >= 0")
    assert ev.parse_args(["--checkpoint", "x"]).threads == 1 and ev.parse_args(["--checkpoint", "x", "--threads", "0"]).threads == 0


def test_cli_hub_unreachable(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))  # an empty cache: the hub is the only source
    (tmp_path / "algorithm.json").write_text(json.dumps({"algo": "dropout_grpo", "config": {}, "stage": 0}))
    proc = run_cli("--checkpoint", str(tmp_path), "--data", "synthetic,gsm8k")
    assert_user_error(proc, "--data gsm8k: the Hugging Face hub is unreachable", "path/to/gsm8k_test.jsonl")
    assert os.listdir(tmp_path) == ["algorithm.json"]


def test_cli_data_file_with_missing_field(tmp_path):
    (tmp_path / "algorithm.json").write_text(json.dumps({"algo": "dropout_grpo", "config": {}, "stage": 0}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    before = sorted(os.listdir(tmp_path))
    assert_user_error(run_cli("--checkpoint", str(tmp_path), "--data", str(bad)), "answer")
    assert sorted(os.listdir(tmp_path)) == before
