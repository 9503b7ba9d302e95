"""
Data for both algorithms: one record format, the data sets read into it, one synthetic task, one tokenizer.

Every data set is normalised to GSM8K-Aug's record format (Coconut's `preprocessing/gsm_icot.py`):

    {"question": "Ann has 3 pens. ...", "steps": ["<<2*4=8>>", "<<3+8=11>>"], "answer": "11"}

`steps` are only used by the supervised initialisation; RL needs `question` and `answer`. Answers are strings; a
number stored as 8.0 becomes "8".

`load_records(data, split)` is the one entry point. `data` is one of:
- `synthetic`: the embedded task below (splits train / test / validation), no download;
- a named set, read from the Hugging Face hub (or the local `datasets` cache) by `datasets`:

      name        hub id                        our split -> hub split
      gsm8k       openai/gsm8k (config main)    train, test          steps: the rationale lines before "####"
      gsm8k-aug   whynlp/gsm8k-aug              train, valid / validation -> validation, test   (internalize-CoT's)
      svamp       ChilleD/SVAMP                 train, test          question: Body + " " + Question
      multiarith  ChilleD/MultiArith            train, test
      gsm-hard    reasoning-machines/gsm-hard   test -> train        (the hub's only split; an evaluation set)

- a local file: `.json` / `.jsonl` / `.parquet`, whose format is told from its fields (FORMATS), or `.txt` in
  internalize-CoT's format, one example per line: `question||<<step1>> <<step2>> #### answer`.
  A field map ({"question": "Body+Question", "answer": "Answer"}, `--field-map question=Body+Question,answer=Answer`)
  names the fields of any json / jsonl / parquet file instead.

The default task needs no download. It is GSM8K-Aug-shaped: a short word problem whose
quantity changes through two operations (two to four steps), each written as a `<<a op b=c>>` step. Solving it in
one shot means composing a multiplication with several additions and subtractions, which a
tiny model does badly; with the steps written out (CoT) each step is a lookup it can learn.

    python data.py            # print a few examples and the tokenizer's size
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
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


def synthetic_splits(seed: int = 0, n_train: int = 20000, n_test: int = 500,
                     n_validation: int = 500) -> dict[str, list[dict]]:
    """Train, test and validation splits with no question shared between any two. Validation comes from a stream
    of its own, drawn after the other two, so adding it left the train and test questions as they were."""
    train = synthetic_task(n_train, seed)
    seen = {r["question"] for r in train}
    splits = {"train": train}
    for name, n, stream in (("test", n_test, seed + 1_000_003), ("validation", n_validation, seed + 2_000_003)):
        rows, extra = [], random.Random(stream)
        while len(rows) < n:
            r = _problem(extra)
            if r["question"] not in seen:
                seen.add(r["question"])
                rows.append(r)
        splits[name] = rows
    return splits


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
    # Both algorithms' sequences: Coconut's `question steps ### answer` and Latent-GRPO's instruction-led prompt with a
    # boxed answer. The constant instruction then costs a few positions instead of 60 byte-level ones.
    corpus = [
        f"{r['question']}\n" + "".join(s + "\n" for s in r["steps"]) + f"### {r['answer']}"
        if i % 2 else
        f"{LATENT_GRPO_INSTRUCTION}\n{r['question']}" + "".join(s + "\n" for s in r["steps"])
        + f"The answer is \\boxed{{{r['answer']}}}"
        for i, r in enumerate(synthetic_task(4000, seed=1234))
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


# ----------------------------------------------------------------------------------------------------------------
# Reading data sets into records. Every format is a field map: record field -> source field, where "a+b" joins two
# fields with a space and "a.b" reads key b of field a. Three rules cover what the maps cannot say:
# - an answer written "rationale #### 72" (openai/gsm8k) is split: the rationale lines become the steps, the text
#   after the last "####" (commas removed) the answer;
# - a question that is a list of chat messages (Latent-GRPO's parquet) is its user message, without the official
#   instruction (latent_grpo.py adds it back to every prompt);
# - numbers become strings without a spurious ".0" (SVAMP's 8.0 -> "8"), so Coconut's exact match can be met.

# Latent-GRPO's instruction (latent_grpo.INSTRUCTION, spec 2), removed from the questions of its parquet files.
LATENT_GRPO_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Detection order matters: the first map whose top-level fields a file has is its format.
FORMATS = {
    "question/steps/answer (GSM8K-Aug, Coconut; steps optional; openai/gsm8k's 'rationale #### answer')":
        {"question": "question", "steps": "steps", "answer": "answer"},
    "Body/Question/Answer (SVAMP)": {"question": "Body+Question", "answer": "Answer"},
    "question/final_ans (MultiArith)": {"question": "question", "answer": "final_ans"},
    "input/target (GSM-Hard)": {"question": "input", "answer": "target"},
    "prompt/reward_model.ground_truth (Latent-GRPO parquet)": {"question": "prompt", "answer": "reward_model.ground_truth"},
    "problem/answer (Latent-GRPO jsonl, MATH-500)": {"question": "problem", "answer": "answer"},
}
OPTIONAL = {"steps"}  # a format still matches a file without these fields


@dataclass(frozen=True)
class HubSet:
    repo: str
    config: str | None
    splits: dict[str, str]  # our split name -> the hub's
    fields: dict[str, str]  # the field map of its rows


HUB_SETS = {
    "gsm8k": HubSet("openai/gsm8k", "main", {"train": "train", "test": "test"},
                    {"question": "question", "answer": "answer"}),
    "gsm8k-aug": HubSet("whynlp/gsm8k-aug", None, {"train": "train", "valid": "validation", "validation": "validation",
                                                   "test": "test"},
                        {"question": "question", "steps": "steps", "answer": "answer"}),
    "svamp": HubSet("ChilleD/SVAMP", None, {"train": "train", "test": "test"},
                    {"question": "Body+Question", "answer": "Answer"}),
    "multiarith": HubSet("ChilleD/MultiArith", None, {"train": "train", "test": "test"},
                         {"question": "question", "answer": "final_ans"}),
    # GSM-Hard has one split, "train", which every paper uses as a test set.
    "gsm-hard": HubSet("reasoning-machines/gsm-hard", None, {"test": "train"}, {"question": "input", "answer": "target"}),
}


def parse_field_map(text: str) -> dict[str, str] | None:
    """`question=Body+Question,answer=Answer,steps=steps` -> a field map; "" -> None (detect the format)."""
    if not text.strip():
        return None
    fields = {}
    for item in text.split(","):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value or key not in ("question", "steps", "answer") or key in fields:
            raise ValueError(f"--field-map: expected question=FIELD,answer=FIELD[,steps=FIELD] "
                             f"(FIELD may be a+b or a.b), got {text!r}")
        fields[key] = value
    if not {"question", "answer"} <= fields.keys():
        raise ValueError(f"--field-map: needs both question= and answer=, got {text!r}")
    return fields


def _roots(source: str) -> set[str]:
    """The top-level fields a source reads: "Body+Question" -> {Body, Question}, "reward_model.x" -> {reward_model}."""
    return {part.split(".")[0] for part in source.split("+")}


def _get(row: dict, source: str):
    """The value `source` names in `row`: "a+b" joins fields with a space, "a.b" reads key b of field a."""
    if "+" in source:
        parts = [_get(row, s) for s in source.split("+")]
        return None if any(p in (None, "") for p in parts) else " ".join(str(p).strip() for p in parts)
    value = row
    for key in source.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _question(value) -> str:
    """A question as text; a list of chat messages is its user message."""
    if isinstance(value, list):  # chat messages: the user's, without the instruction latent_grpo.py adds itself
        value = next((m.get("content") for m in reversed(value) if isinstance(m, dict) and m.get("role") == "user"), "")
        value = str(value or "").replace(LATENT_GRPO_INSTRUCTION, "")
    return str(value).strip()


def _answer(value) -> str:
    """An answer as text: 8.0 and "8.0" -> "8"; anything else as written."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return re.sub(r"^(-?\d+)\.0+$", r"\1", str(value).strip())


def _record(row: dict, fields: dict[str, str], where: str, i: int) -> dict:
    """One row as a record, or a one-line error naming the row and the fields it lacks."""
    values = {k: _get(row, src) for k, src in fields.items()}
    values["question"] = _question(values["question"]) if values["question"] is not None else None
    # `datasets` fills a field missing from some rows with None, so check values, not keys
    missing = [k for k in ("question", "answer") if values.get(k) in (None, "")]
    if missing:
        present = sorted(k for k, v in row.items() if v is not None)
        raise ValueError(f"{where}: row {i} has no {' or '.join(missing)} (fields present: {present})")
    steps, answer = values.get("steps"), values["answer"]
    if isinstance(answer, str) and "####" in answer:  # openai/gsm8k: "rationale lines\n#### 1,234"
        rationale, _, answer = answer.rpartition("####")
        answer = answer.replace(",", "")
        if steps is None:
            steps = rationale
    if isinstance(steps, str):
        steps = [line.strip() for line in steps.splitlines() if line.strip()]
    return {"question": values["question"], "steps": [str(s) for s in steps or []], "answer": _answer(answer)}


def _detect(where: str, columns: list[str]) -> dict[str, str]:
    for fields in FORMATS.values():
        if all(_roots(src) <= set(columns) or k in OPTIONAL for k, src in fields.items()):
            return fields
    raise ValueError(f"{where}: cannot tell the format from fields {sorted(columns)}; known: "
                     f"{'; '.join(FORMATS)}; or pass --field-map question=...,answer=...")


def _read_text(path: Path) -> list[dict]:
    """internalize-CoT's text format, as Coconut's gsm_icot.py reads it: `question||step step ... #### answer`."""
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        question, sep, rest = line.partition("||")
        answer = rest.split("##")[-1].strip()
        if not sep or "##" not in rest or not question.strip() or not answer:
            raise ValueError(f"{path}: line {i + 1} is not 'question||<<step>> <<step>> #### answer'")
        out.append({"question": question.strip(), "steps": rest.split("##")[0].split(), "answer": _answer(answer)})
    return out


def _datasets():
    """`datasets`, imported only here (the rest of the project runs without it), quiet: no progress bars and no log
    lines, because every failure is reported as one line of ours."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def load_file(path: str | Path, field_map: dict[str, str] | None = None) -> list[dict]:
    """A local .json / .jsonl / .parquet file (format detected, or `field_map`) or an internalize-CoT .txt file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file, and not a named data set ({', '.join(['synthetic', *HUB_SETS])})")
    if path.suffix == ".txt":
        if field_map:
            raise ValueError(f"{path}: --field-map applies to .json / .jsonl / .parquet files, not to .txt")
        return _read_text(path)
    kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected .json, .jsonl, .parquet or .txt")
    try:
        rows = _datasets().load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # a malformed file: say which, in one line
        raise ValueError(f"{path}: not a {kind.upper()} file of records ({type(e).__name__})") from None
    if field_map:
        absent = sorted(set().union(*map(_roots, field_map.values())) - set(rows.column_names))
        if absent:
            raise ValueError(f"{path}: --field-map names {absent}, not fields of this file {sorted(rows.column_names)}")
    fields = field_map or _detect(str(path), rows.column_names)
    return [_record(row, fields, str(path), i) for i, row in enumerate(rows.to_list())]  # to_list: one bulk read


def load_hub(name: str, split: str) -> list[dict]:
    """A named set (HUB_SETS) from the Hugging Face hub or the local `datasets` cache."""
    hub = HUB_SETS[name]
    if split not in hub.splits:
        raise ValueError(f"{name} has no {split!r} split; it has {', '.join(hub.splits)}")
    try:
        rows = _datasets().load_dataset(hub.repo, hub.config, split=hub.splits[split])
    except Exception as e:  # offline (HF_HUB_OFFLINE=1 fails at once), no network, or the hub set changed
        raise ValueError(f"{name}: the Hugging Face hub is unreachable (offline?) or cannot serve {hub.repo} "
                         f"({type(e).__name__}); download it elsewhere and pass the local file instead, "
                         f"e.g. path/to/{name}_{split}.jsonl") from None
    return [_record(row, hub.fields, f"{name} ({hub.repo})", i) for i, row in enumerate(rows.to_list())]


def load_records(data: str, split: str, seed: int = 0, field_map: dict[str, str] | None = None) -> list[dict]:
    """The one entry point: `synthetic`, a named set (HUB_SETS) or a local file (see the module docstring)."""
    if data == "synthetic":
        splits = synthetic_splits(seed)
        if split not in splits:
            raise ValueError(f"synthetic has splits {', '.join(splits)}, not {split!r}")
        return splits[split]
    if data in HUB_SETS:
        return load_hub(data, split)
    return load_file(data, field_map)


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
