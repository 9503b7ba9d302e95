"""
Data for both algorithms: one record format, one synthetic task, one tokenizer built in code.

Every data set is normalised to GSM8K-Aug's record format (Coconut's `preprocessing/gsm_icot.py`):

    {"question": "Ann has 3 pens. ...", "steps": ["<<2*4=8>>", "<<3+8=11>>"], "answer": "11"}

`steps` are only used by the supervised initialisation; RL needs `question` and `answer`.

The default task needs no download. It is GSM8K-Aug-shaped: a short word problem whose
quantity changes through two operations (two to four steps), each written as a `<<a op b=c>>` step. Solving it in
one shot means composing a multiplication with several additions and subtractions, which a
tiny model does badly; with the steps written out (CoT) each step is a lookup it can learn.

    python data.py            # print a few examples and the tokenizer's size
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import PreTrainedTokenizerFast

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ivy", "Jack", "Kim", "Leo"]
ITEMS = ["apples", "pens", "cards", "books", "coins", "shells", "stamps", "marbles"]
EOS = "<|endoftext|>"


def _problem(rng: random.Random) -> dict:
    """One problem: a start amount, then two operations. Every intermediate value stays in 1..99."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(2, 20)
    sentences, steps = [f"{name} has {x} {item}."], []
    for _ in range(2):
        ops = [op for op, ok in (("buy", x <= 90), ("lose", x >= 2), ("boxes", x <= 81)) if ok]
        op = rng.choice(ops)
        if op == "boxes":  # two steps: b*c, then the running total plus it
            b = rng.randint(2, min(5, (99 - x) // 2))
            c = rng.randint(2, min(5, (99 - x) // b))
            sentences.append(f"{name} buys {b} boxes of {c}.")
            steps += [f"<<{b}*{c}={b * c}>>", f"<<{x}+{b * c}={x + b * c}>>"]
            x += b * c
        elif op == "buy":
            b = rng.randint(1, min(9, 99 - x))
            sentences.append(f"{name} finds {b} more.")
            steps.append(f"<<{x}+{b}={x + b}>>")
            x += b
        else:
            b = rng.randint(1, min(9, x - 1))
            sentences.append(f"{name} gives {b} away.")
            steps.append(f"<<{x}-{b}={x - b}>>")
            x -= b
    sentences.append(f"How many {item} now?")
    return {"question": " ".join(sentences), "steps": steps, "answer": str(x)}


def synthetic_task(n: int, seed: int) -> list[dict]:
    """`n` problems from a seeded generator: the same (n, seed) always gives the same list."""
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


def synthetic_splits(seed: int = 0, n_train: int = 20000, n_test: int = 500) -> dict[str, list[dict]]:
    """Train and test splits with no question shared between them."""
    train = synthetic_task(n_train, seed)
    seen = {r["question"] for r in train}
    test, extra = [], random.Random(seed + 1_000_003)
    while len(test) < n_test:
        r = _problem(extra)
        if r["question"] not in seen:
            seen.add(r["question"])
            test.append(r)
    return {"train": train, "test": test}


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE, trained in code on the synthetic task.

    Digits are always single tokens (as in Llama and Qwen), so arithmetic is done digit by digit.
    Byte-level means any text round-trips through encode/decode, including questions from real data sets.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [
        f"{r['question']}\n" + "".join(s + "\n" for s in r["steps"]) + f"### {r['answer']}"
        for r in synthetic_task(4000, seed=1234)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def load_jsonl_records(path: str | Path) -> list[dict]:
    """Read a local GSM8K-Aug-style JSON / JSONL file through `datasets`, checking every row's fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    import datasets  # imported here: the rest of the project runs without `datasets`

    datasets.disable_progress_bars()  # so that an error stays one line on stderr
    try:
        rows = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # a malformed file: say which, in one line
        raise ValueError(f"{path}: not a JSON / JSONL file of records ({type(e).__name__})") from None
    out = []
    for i, row in enumerate(rows):
        # `datasets` fills a field missing from some rows with None, so check values, not keys
        missing = [k for k in ("question", "answer") if row.get(k) in (None, "")]
        if missing:
            present = sorted(k for k, v in row.items() if v is not None)
            raise ValueError(f"{path}: row {i} has no {' or '.join(missing)} (fields present: {present})")
        steps = row.get("steps") or []
        out.append({"question": str(row["question"]), "steps": [str(s) for s in steps], "answer": str(row["answer"])})
    return out


def load_records(data: str, split: str, seed: int = 0) -> list[dict]:
    """The one entry point: `synthetic` (the embedded task) or a path to a local JSON / JSONL file."""
    if data == "synthetic":
        splits = synthetic_splits(seed)
        if split not in splits:
            raise ValueError(f"--data synthetic has splits {sorted(splits)}, not {split!r}")
        return splits[split]
    return load_jsonl_records(data)


def as_dataset(records: list[dict]):
    """Wrap records in a `datasets.Dataset` when the package is installed (it is optional at run time)."""
    try:
        from datasets import Dataset
    except ImportError:
        return records
    return Dataset.from_list(records)


if __name__ == "__main__":
    splits = synthetic_splits()
    for r in splits["train"][:3]:
        print(json.dumps(r))
    tok = build_tokenizer()
    ex = splits["train"][0]
    print(len(tok), "tokens;", len(tok(ex["question"]).input_ids), "question tokens;", tok.tokenize(ex["steps"][0]))
