"""data.py: every data-set format read into records, format detection and field maps, the one-line errors, the
synthetic task.

The fixtures in tests/fixtures/ are a few rows in each real format, written by hand; the Latent-GRPO parquet file is
binary, so it is written from LATENT_GRPO_ROWS below.
"""
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

JANET = ("Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
         "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
         "egg. How much in dollars does she make every day at the farmers' market?")
ROBE = "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?"
KYLE = ("Kyle bought last year's best-selling book for $19.50. This is with a 25% discount from the original price. "
        "What was the original price of the book?")
GSM8K_AUG = [
    {"question": JANET, "steps": ["<<16-3-4=9>>", "<<9*2=18>>"], "answer": "18"},
    {"question": ROBE, "steps": ["<<2/2=1>>", "<<2+1=3>>"], "answer": "3"},
    {"question": KYLE, "steps": [], "answer": "26"},  # internalize-CoT's test set has rows with no steps
]


def load(name, split="test", **kwargs):
    return data.load_records(str(FIXTURES / name), split, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Each format, checked by hand


def test_openai_gsm8k_rationale_lines_become_steps():
    records = load("gsm8k.jsonl")
    assert records[0] == {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                    "How many clips did Natalia sell altogether in April and May?",
        "steps": ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May."],
        "answer": "72",
    }
    assert [r["answer"] for r in records] == ["72", "10", "57500"]  # "#### 57,500": commas removed
    assert len(records[2]["steps"]) == 4 and records[2]["steps"][-1].endswith("57,500/year")


@pytest.mark.parametrize("name", ["gsm8k_aug.json", "gsm8k_aug.txt"])
def test_gsm8k_aug_json_and_internalize_cot_text(name):
    assert load(name) == GSM8K_AUG


def test_svamp_question_is_body_then_question_and_float_answers_lose_the_zero():
    records = load("svamp.json")
    assert records[0] == {"question": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on "
                                      "each pack How much do you have to pay to buy each pack?",
                          "steps": [], "answer": "51"}
    assert [r["answer"] for r in records] == ["51", "1", "3"]


def test_multiarith():
    records = load("multiarith.json")
    assert records[0]["question"].startswith("For Halloween Debby")  # the leading space of the hub rows is dropped
    assert [(r["steps"], r["answer"]) for r in records] == [([], "39"), ([], "8")]


def test_gsm_hard_float_targets():
    records = load("gsm_hard.jsonl")
    assert records[0]["question"].startswith("Janet\u2019s ducks lay 16 eggs") and "4933828" in records[0]["question"]
    assert [r["answer"] for r in records] == ["-9867630", "3", "5", "2.5"]


LATENT_GRPO_ROWS = [  # the verl schema of DJCheng/Latent-GRPO-Data (spec 2): GSM style, then MATH style
    {"data_source": "lighteval/MATH", "ability": "math",
     "prompt": [{"role": "user", "content": "Please reason step by step, and put your final answer within "
                                            "\\boxed{}.\n" + JANET}],
     "reward_model": {"ground_truth": "18", "style": "rule"}, "extra_info": {"index": 0, "split": "test"}},
    {"data_source": "lighteval/MATH", "ability": "math",
     "prompt": [{"role": "system", "content": "Please reason step by step, and put your final answer within "
                                              "\\boxed{}."},
                {"role": "user", "content": "What is $\\frac{1}{4} + \\frac{1}{4}$?"}],
     "reward_model": {"ground_truth": "\\frac{1}{2}", "style": "rule"}, "extra_info": {"index": 1, "split": "test"}},
]


@pytest.fixture
def latent_grpo_parquet(tmp_path):
    from datasets import Dataset

    path = tmp_path / "latent_grpo.parquet"
    Dataset.from_list(LATENT_GRPO_ROWS).to_parquet(path)
    return path


def test_latent_grpo_parquet(latent_grpo_parquet):
    assert data.load_records(str(latent_grpo_parquet), "train") == [
        {"question": JANET, "steps": [], "answer": "18"},  # the instruction is gone: latent_grpo.py adds it itself
        {"question": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "steps": [], "answer": "\\frac{1}{2}"},
    ]


def test_the_stripped_instruction_is_latent_grpos():
    import latent_grpo

    assert latent_grpo.INSTRUCTION.strip() == data.LATENT_GRPO_INSTRUCTION


def test_problem_answer_jsonl(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2", "level": 1}) + "\n")
    assert data.load_records(str(path), "test") == [{"question": "What is 1+1?", "steps": [], "answer": "2"}]


# ---------------------------------------------------------------------------------------------------------------
# Field maps


def test_field_map_overrides_detection():
    fields = data.parse_field_map("question=Question, answer=Equation")
    assert fields == {"question": "Question", "answer": "Equation"}
    records = load("svamp.json", field_map=fields)
    assert records[1] == {"question": "How much did the candy bar cost?", "steps": [], "answer": "( 4.0 - 3.0 )"}


def test_field_map_joins_nested_and_string_steps(latent_grpo_parquet):
    records = load("gsm_hard.jsonl", field_map=data.parse_field_map("question=input,answer=target,steps=code"))
    assert records[1]["steps"] == ["def solution():", "blue = 2", "white = blue / 2", "result = blue + white",
                                   "return result"]
    records = data.load_records(str(latent_grpo_parquet), "test",
                                field_map=data.parse_field_map("question=data_source+ability,answer=extra_info.index"))
    assert [(r["question"], r["answer"]) for r in records] == [("lighteval/MATH math", "0"), ("lighteval/MATH math", "1")]


@pytest.mark.parametrize("text", ["question=Body", "answer=Answer", "question", "question=,answer=x", "foo=a,answer=b",
                                  "question=a,question=b,answer=c"])
def test_bad_field_map(text):
    with pytest.raises(ValueError, match="--field-map") as e:
        data.parse_field_map(text)
    assert "\n" not in str(e.value)


def test_empty_field_map_means_detect():
    assert data.parse_field_map("") is None and data.parse_field_map("  ") is None


def test_field_map_naming_a_missing_field():
    with pytest.raises(ValueError) as e:
        load("svamp.json", field_map={"question": "Body+Problem", "answer": "Answer"})
    assert "['Problem']" in str(e.value) and "'Body'" in str(e.value) and "\n" not in str(e.value)


def test_field_map_on_a_text_file():
    with pytest.raises(ValueError, match="--field-map"):
        load("gsm8k_aug.txt", field_map={"question": "q", "answer": "a"})


# ---------------------------------------------------------------------------------------------------------------
# One-line errors


def one_line_error(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        data.load_records(*args, **kwargs)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_unknown_format_names_the_fields_found(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"foo": 1, "bar": "x"}\n')
    message = one_line_error(str(path), "test")
    assert str(path) in message and "['bar', 'foo']" in message
    assert "question/final_ans" in message and "--field-map question=" in message


def test_missing_file_and_unknown_name_and_suffix(tmp_path):
    message = one_line_error(str(tmp_path / "nope.jsonl"), "test")
    assert "no such file" in message and "gsm8k-aug" in message
    assert "gsm9k" in one_line_error("gsm9k", "test")
    (tmp_path / "x.csv").write_text("question,answer\nq,1\n")
    assert ".csv" in one_line_error(str(tmp_path / "x.csv"), "test")


def test_malformed_file():
    assert "malformed.jsonl: not a JSON file" in one_line_error(str(FIXTURES / "malformed.jsonl"), "test")


def test_malformed_row_names_the_row_and_the_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2"}\n')
    assert "row 1 has no answer" in one_line_error(str(path), "test")
    path = tmp_path / "svamp.jsonl"
    path.write_text('{"Body": "Ann has 3.", "Question": "How many?", "Answer": 3.0}\n{"Body": "Ben has 2.", "Answer": 2}\n')
    assert "row 1 has no question" in one_line_error(str(path), "test")


def test_malformed_text_line(tmp_path):
    path = tmp_path / "icot.txt"
    path.write_text("q1||<<1+1=2>> #### 2\nq2 with no separator #### 3\n")
    assert "line 2" in one_line_error(str(path), "test")


def test_split_errors():
    assert "'valid'" in one_line_error("synthetic", "valid")
    assert "no 'train' split" in one_line_error("gsm-hard", "train")  # an evaluation set: checked before the hub


def test_hub_unreachable_is_one_quick_line(tmp_path):
    """Offline, with an empty cache: every named set fails at once, in one line that says what to do instead."""
    script = ("import time, data\n"
              "for name, hub in data.HUB_SETS.items():\n"
              "    split = next(iter(hub.splits))\n"
              "    t = time.perf_counter()\n"
              "    try:\n"
              "        data.load_records(name, split)\n"
              "    except ValueError as e:\n"
              "        print(round(time.perf_counter() - t, 3), e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == len(data.HUB_SETS), proc.stdout + proc.stderr
    for line, (name, hub) in zip(lines, data.HUB_SETS.items()):
        seconds, message = line.split(" ", 1)
        assert float(seconds) < 5, line
        assert message.startswith(f"{name}: the Hugging Face hub is unreachable") and hub.repo in message, line
        assert f"path/to/{name}_" in message, line


# ---------------------------------------------------------------------------------------------------------------
# Round trips: records written in each local format load back equal


TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="#|"), max_size=30)
RECORD = st.fixed_dictionaries({
    "question": TEXT.map(str.strip).filter(bool),
    "steps": st.lists(st.from_regex(r"<<[0-9][0-9+*/-]{0,6}=-?[0-9]{1,4}>>", fullmatch=True), max_size=4),
    "answer": st.one_of(st.integers(-10**7, 10**7).map(str), TEXT.map(str.strip).filter(lambda s: s and "." not in s)),
})


def write(records, kind, path):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "txt":
        path.write_text("".join(f"{r['question']}||{' '.join(r['steps'])} #### {r['answer']}\n" for r in records))
    else:
        from datasets import Dataset

        Dataset.from_list(records).to_parquet(path)


@settings(deadline=None, max_examples=25)
@given(records=st.lists(RECORD, min_size=1, max_size=5), kind=st.sampled_from(["jsonl", "json", "txt", "parquet"]))
def test_round_trip(tmp_path_factory, records, kind):
    path = tmp_path_factory.mktemp("round_trip") / f"{uuid.uuid4().hex}.{kind}"  # a new name: no stale cache
    write(records, kind, path)
    assert data.load_records(str(path), "train") == records


# ---------------------------------------------------------------------------------------------------------------
# The synthetic task


STEP = re.compile(r"<<(\d+)([+*-])(\d+)=(\d+)>>")


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**32 - 1))
def test_synthetic_task_is_seeded_and_its_answer_is_the_last_step(seed):
    records = data.synthetic_task(30, seed)
    assert records == data.synthetic_task(30, seed)
    assert records != data.synthetic_task(30, seed + 1)
    for r in records:
        assert 2 <= len(r["steps"]) <= 4
        for step in r["steps"]:
            a, op, b, c = STEP.fullmatch(step).groups()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
            assert 1 <= int(c) <= 99
        assert r["answer"] == STEP.fullmatch(r["steps"][-1]).group(4)


def test_synthetic_splits_share_no_question():
    splits = data.synthetic_splits(seed=3, n_train=300, n_test=50)
    assert len(splits["test"]) == 50
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["test"]}
    val = {r["question"] for r in splits["validation"]}
    assert len(splits["validation"]) == len(val) == 500 and not val & {r["question"] for r in splits["train"]}
    assert not val & {r["question"] for r in splits["test"]}
    # validation is drawn after train and test: without it they are the same lists
    without = data.synthetic_splits(seed=3, n_train=300, n_test=50, n_validation=0)
    assert without["train"] == splits["train"] and without["test"] == splits["test"]
    assert data.load_records("synthetic", "test", seed=0) == data.synthetic_splits(0)["test"]


# ---------------------------------------------------------------------------------------------------------------
# train.load_data: field maps pass through; a named set's own test split is the default held-out data


def test_train_load_data(monkeypatch):
    import train

    asked = []

    def fake_hub(name, split):
        asked.append((name, split))
        return [{"question": f"{name} {split} {i}", "steps": [], "answer": str(i)} for i in range(3)]

    monkeypatch.setattr(data, "load_hub", fake_hub)
    tr, te = train.load_data(train.Args(data="gsm8k", eval_size=2))
    assert asked == [("gsm8k", "train"), ("gsm8k", "test")] and len(tr) == 3 and te[1]["question"] == "gsm8k test 1"

    svamp = str(FIXTURES / "svamp.json")
    tr, te = train.load_data(train.Args(data=svamp, eval_data="multiarith", field_map="question=Question,answer=Answer",
                                        eval_size=5))
    assert tr[0]["question"] == "How much do you have to pay to buy each pack?" and te[0]["question"] == "multiarith test 0"
    monkeypatch.undo()  # the real loader: an evaluation set refuses to train before it asks the hub
    with pytest.raises(train.UserError, match="gsm-hard has no 'train' split"):
        train.load_data(train.Args(data="gsm-hard"))
