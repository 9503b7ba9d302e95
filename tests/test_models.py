"""Real models through train.py's own loading path: GPT-2, Llama and Qwen2 directories, a Coconut checkpoint
(--init-from), Latent-SFT-style tokenizers, the memory flags (--bf16, --gradient-checkpointing, --micro-batch-size),
the presets and the errors. Every model is tiny and built here; nothing is downloaded."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

import data
import dropout_grpo
import eval as evaluation
import latent_grpo
import train

ROOT = Path(__file__).resolve().parent.parent
# one GRPO step after one step of each SFT stage, on the smallest batches
LOOP = ["--cot-steps", "1", "--sft-steps", "1", "--sft-batch-size", "2", "--max-steps", "1", "--num-prompts", "2",
        "--num-generations", "2", "--eval-size", "2", "--eval-every", "0", "--batch-size-eval", "2"]
ALGO = {"dropout_grpo": ["--max-new-tokens", "6", "--max-latent-stage", "1"],
        "latent_grpo": ["--max-response-length", "8", "--latent-stages", "1"]}
QUESTIONS = ["Ann has 3 pens. How many pens now?", "Ben has 2 cards. How many cards now?"]

# Minimal chat templates in the style of the two Latent-SFT families. Qwen's generation prompt already ends with
# <think> (as the released checkpoints' templates must, spec 2); Llama's does not, so prompt_text appends it.
TEMPLATES = {
    "llama": "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
             "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "qwen2": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>' }}{% endif %}",
}
SPECIALS = {"llama": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "qwen2": ["<|im_start|>", "<|im_end|>"]}


def make_tokenizer(family: str):
    """The byte-level BPE of data.py; Llama / Qwen2 get their chat tokens, a template and, like a Latent-SFT
    checkpoint, <think> as one token while </think> stays split into sub-tokens."""
    tokenizer = data.build_tokenizer()
    if family != "gpt2":
        tokenizer.add_tokens(SPECIALS[family] + ["<think>"], special_tokens=True)
        tokenizer.chat_template = TEMPLATES[family]
        tokenizer.eos_token = SPECIALS[family][-1]
    return tokenizer


def make_model(family: str, vocab_size: int):
    config = {
        "gpt2": lambda: GPT2Config(vocab_size=vocab_size, n_positions=256, n_layer=1, n_embd=16, n_head=2),
        "llama": lambda: LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256),
        "qwen2": lambda: Qwen2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256),
    }[family]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved directory per family, loadable by AutoModelForCausalLM / AutoTokenizer.from_pretrained."""
    dirs = {}
    for family in ("gpt2", "llama", "qwen2"):
        tokenizer = make_tokenizer(family)
        path = tmp_path_factory.mktemp(family)
        make_model(family, len(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[family] = path
    return dirs


def load(path: Path):
    """Exactly train.py's loading path for --model."""
    args, _, _ = train.parse_args(["--model", str(path)])
    return train.build_model(args, args.model)


def raises_one_line(argv, out: Path, message: str):
    with pytest.raises(train.UserError) as e:
        train.main([*argv, "--out", str(out)])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# --model: any causal LM


@pytest.mark.parametrize("algo", ["dropout_grpo", "latent_grpo"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_every_family_trains_with_both_algorithms(model_dirs, family, algo, tmp_path):
    """SFT, rollout, old log-probs, one update and a reloadable checkpoint for each model family."""
    out = tmp_path / "run"
    summary = train.main(["--model", str(model_dirs[family]), "--algo", algo, "--out", str(out), *LOOP, *ALGO[algo]])
    assert summary["steps"] == 1
    rl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"rl"' in line]
    assert len(rl) == 1 and torch.isfinite(torch.tensor(rl[0]["loss"])) and rl[0]["grad_norm"] >= 0
    method, model, _ = evaluation.load_checkpoint(out, "cpu")
    assert type(method).__name__ == {"dropout_grpo": "DropoutGRPO", "latent_grpo": "LatentGRPO"}[algo]
    assert model.config.model_type == family


def test_a_bfloat16_checkpoint_is_loaded_in_float32(tmp_path):
    """The optimiser needs float32 weights (an lr 1e-6 step is below bfloat16's resolution); --bf16 is autocast."""
    tokenizer = make_tokenizer("llama")
    make_model("llama", len(tokenizer)).to(torch.bfloat16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("family, start", [("llama", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"),
                                           ("qwen2", "<|im_start|>user\n")])
def test_latent_prompt_goes_through_the_chat_template(model_dirs, family, start):
    model, tokenizer = load(model_dirs[family])
    method = latent_grpo.LatentGRPO(model, tokenizer, latent_grpo.Config(), add_tokens=False)
    text = method.prompt_text("What is 2 + 3?")
    assert text.startswith(start) and latent_grpo.INSTRUCTION in text
    assert text.endswith("<think>") and text.count("<think>") == 1   # appended for Llama, already there for Qwen


# ---------------------------------------------------------------------------------------------------------------
# Latent-SFT tokenizers: <think> one token, </think> split


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_latent_sft_tokenizer_is_used_as_it_is(model_dirs, family, tmp_path):
    """GRPO straight from a checkpoint adds no token: the end id is the first sub-token of the split </think>."""
    _, tokenizer = load(model_dirs[family])
    sub = tokenizer.encode("</think>", add_special_tokens=False)
    assert len(sub) > 1 and "</think>" not in tokenizer.get_vocab() and "<think>" in tokenizer.get_vocab()
    out = tmp_path / "run"
    train.main(["--model", str(model_dirs[family]), "--algo", "latent_grpo", "--out", str(out), *LOOP,
                *ALGO["latent_grpo"], "--cot-steps", "0", "--sft-steps", "0",
                "--allow-degenerate", "true"])  # a random model never predicts the split end id: health.py stops it
    saved = AutoTokenizer.from_pretrained(out / "checkpoint")
    assert len(saved) == len(tokenizer) and "</think>" not in saved.get_vocab()
    method, _, _ = evaluation.load_checkpoint(out, "cpu")
    assert method.end_id == sub[0]
    # a run that trains the initialisation adds </think> as one token, whose row the SFT then trains
    model, tokenizer = load(model_dirs[family])
    method = latent_grpo.LatentGRPO(model, tokenizer, latent_grpo.Config(), add_tokens=True)
    assert method.end_id == tokenizer.convert_tokens_to_ids("</think>") == len(tokenizer) - 1


def word_level_gpt2(path: Path) -> Path:
    """A GPT-2 whose word-level tokenizer maps anything unknown, </think> included, to [UNK]."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|endoftext|>", "Ann", "has", "3", "pens", "."])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|endoftext|>")
    tokenizer.add_tokens(["<think>"], special_tokens=True)
    make_model("gpt2", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_tokenizer_without_an_end_id_is_refused(tmp_path):
    ckpt = word_level_gpt2(tmp_path / "model")
    raises_one_line(["--model", str(ckpt), "--algo", "latent_grpo", "--cot-steps", "0", "--sft-steps", "0"],
                    tmp_path / "out", "cannot encode </think>")


# ---------------------------------------------------------------------------------------------------------------
# --init-from: a Coconut checkpoint


class CoconutLike(nn.Module):
    """The two submodules of facebookresearch/coconut's `Coconut` that reach its state_dict: the wrapped LM and
    `embedding`, its alias of the input embeddings (coconut.py)."""

    def __init__(self, base):
        super().__init__()
        self.base_causallm = base
        self.embedding = base.transformer.get_input_embeddings()


def coconut_checkpoint(base_dir: Path, path: Path, n_embd: int = 16):
    """What Coconut's run.py saves: GPT-2 + <|start-latent|> <|end-latent|> <|latent|> (added one by one, not as
    special tokens), trained (here: perturbed), `torch.save(model.state_dict())`. Returns the source model."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    for token in train.COCONUT_TOKENS:
        tokenizer.add_tokens(token)
    source = make_model("gpt2", len(tokenizer)) if n_embd == 16 else AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_layer=1, n_embd=n_embd, n_head=2))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(CoconutLike(source).state_dict(), path)
    return source.eval()


@pytest.fixture(scope="module")
def coconut(model_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("coconut") / "checkpoint_15"
    return path, coconut_checkpoint(model_dirs["gpt2"], path)


def test_a_coconut_checkpoint_loads_exactly(model_dirs, coconut):
    path, source = coconut
    state = torch.load(path, weights_only=True)
    assert "base_causallm.transformer.h.0.attn.c_attn.weight" in state and "embedding.weight" in state
    model, tokenizer = load(model_dirs["gpt2"])
    n = len(tokenizer)
    train.load_coconut(model, tokenizer, str(path))
    assert tokenizer.convert_tokens_to_ids(list(train.COCONUT_TOKENS)) == [n, n + 1, n + 2]
    method = dropout_grpo.DropoutGRPO(model, tokenizer, dropout_grpo.Config(), add_tokens=False)
    assert (method.bot_id, method.eot_id, method.latent_id) == (n, n + 1, n + 2)
    ids = torch.tensor([tokenizer.encode(QUESTIONS[0] + "\n") + [n, n + 2, n + 2, n + 1]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def test_init_from_starts_grpo_at_the_last_stage(model_dirs, coconut, tmp_path):
    path, source = coconut
    out = tmp_path / "run"
    summary = train.main(["--model", str(model_dirs["gpt2"]), "--init-from", str(path), "--out", str(out),
                          *LOOP, "--max-new-tokens", "6"])   # LOOP's --cot-steps 1 --sft-steps 1 are overridden
    assert summary["steps"] == 1 and summary["cot_accuracy"] is None
    assert not [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"sft"' in line]
    config = json.loads((out / "config.json").read_text())["args"]
    assert config["cot_steps"] == config["sft_steps"] == 0
    stage = json.loads((out / "init" / "algorithm.json").read_text())["stage"]
    assert stage == dropout_grpo.Config().max_latent_stage + 1   # the last stage: all steps replaced by 6 thoughts
    init = AutoModelForCausalLM.from_pretrained(out / "init")
    assert torch.equal(init.lm_head.weight, source.lm_head.weight)


def bad_checkpoints(tmp_path: Path, base_dir: Path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], a_list)
    plain = tmp_path / "plain.pt"
    torch.save(make_model("gpt2", 10).state_dict(), plain)
    wide = tmp_path / "wide.pt"
    coconut_checkpoint(base_dir, wide, n_embd=32)
    return {"missing": tmp_path / "nope.pt", "text": text, "list": a_list, "plain": plain, "wide": wide}


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("text", "not a state dict"),
    ("list", "not a state dict"),
    ("plain", "not a Coconut state dict: keys look like transformer."),
    ("wide", "base_causallm.transformer.wte.weight has shape"),
])
def test_bad_coconut_checkpoints_are_one_line_errors(model_dirs, tmp_path, case, message):
    path = bad_checkpoints(tmp_path, model_dirs["gpt2"])[case]
    raises_one_line(["--model", str(model_dirs["gpt2"]), "--init-from", str(path)], tmp_path / "out", message)


def test_init_from_is_for_dropout_grpo_only(coconut, tmp_path):
    raises_one_line(["--algo", "latent_grpo", "--init-from", str(coconut[0])], tmp_path / "out", "--init-from")


# ---------------------------------------------------------------------------------------------------------------
# Memory: --micro-batch-size, --gradient-checkpointing, --bf16


def tiny_method(algo: str, extra=()):
    """A float64 tiny model at its last stage with its algorithm, and the loop's args."""
    more = ["--invalid-mask", "false"] if algo == "latent_grpo" else []   # untrained rows never stop: keep them
    args, algo_cls, cfg = train.parse_args(["--algo", algo, "--n-layer", "2", "--n-embd", "16", "--n-head", "2",
                                            "--num-prompts", "4", "--num-generations", "2", "--num-mini-batches", "2",
                                            "--learning-rate", "1e-2", *ALGO[algo], *more, *extra])
    torch.manual_seed(0)
    model, tokenizer = train.build_model(args, args.model)
    method = algo_cls(model, tokenizer, cfg, add_tokens=True)
    method.stage = method.num_stages
    return args, method, model.double().eval()


@pytest.mark.parametrize("algo, extra", [("dropout_grpo", []), ("dropout_grpo", ["--norm", "tokens"]),
                                         ("latent_grpo", [])])
def test_micro_batches_give_the_same_update(algo, extra):
    args, method, model = tiny_method(algo, extra)
    rollout = method.rollout(model, QUESTIONS * 2, 2, torch.Generator().manual_seed(0))
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    full = train.batched_logprobs(args, method, model, rollout)
    split = train.batched_logprobs(train.dataclasses.replace(args, micro_batch_size=3), method, model, rollout)
    assert torch.allclose(full, split, atol=1e-10)   # chunks of 3, 3 and 2 rows, padded to the full width
    results = []
    for micro in (0, 3):   # each mini-batch of 4 rows as one forward, and as 3 + 1 rows
        copy_ = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in copy_.parameters() if p.requires_grad], lr=args.learning_rate)
        metrics = train.grpo_step(train.dataclasses.replace(args, micro_batch_size=micro), method, copy_, None, opt,
                                  rollout, rewards)
        results.append((copy_, metrics))
    (a, ma), (b, mb) = results
    assert ma["grad_norm"] > 0 and abs(ma["grad_norm"] - mb["grad_norm"]) < 1e-9 and abs(ma["loss"] - mb["loss"]) < 1e-9
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradient(model_dirs, family):
    """Latent-GRPO's update with every decoder layer recomputed in the backward pass: the gradient is unchanged,
    and the layers really are recomputed (their MLP runs twice), with frozen embeddings as in RL (5.4)."""
    model, tokenizer = load(model_dirs[family])
    method = latent_grpo.LatentGRPO(model, tokenizer, latent_grpo.Config(max_response_length=8, invalid_mask=False),
                                    add_tokens=True)
    model = model.double().eval()
    method.start_rl(model)
    rollout = method.rollout(model, QUESTIONS, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = method.logprobs(model, rollout)
    adv = method.advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), rollout, old)
    calls = []
    # a pre-hook: the recomputation stops as soon as the last saved tensor is rebuilt, before a forward hook would run
    model.base_model.get_submodule("h.0.mlp" if family == "gpt2" else "layers.0.mlp").register_forward_pre_hook(
        lambda *_: calls.append(1))
    grads = []
    for on in (False, True):
        if on:
            train.enable_gradient_checkpointing(model)
        model.zero_grad()
        calls.clear()
        with train.checkpointed_layers(model, on):
            new = method.logprobs(model, rollout, advantages=adv)
            method.loss(new, old, None, adv, rollout)[0].backward()
        assert len(calls) == (2 if on else 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert not any(m.training for m in model.modules())   # back in eval() for the next rollout
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-12), name


def test_gradient_checkpointing_is_refused_for_dropout_grpo(tmp_path):
    raises_one_line(["--gradient-checkpointing", "true"], tmp_path / "out", "KV cache")


class AdamWOutsideAutocast(torch.optim.AdamW):
    """autocast keeps bfloat16 copies of the weights until its region ends: a step inside one would be unseen."""

    def step(self, *args, **kwargs):
        assert not torch.is_autocast_enabled("cpu"), "an optimiser step inside an autocast region"
        return super().step(*args, **kwargs)


@pytest.mark.parametrize("algo", ["dropout_grpo", "latent_grpo"])
def test_bf16_and_micro_batches_run_end_to_end(algo, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", AdamWOutsideAutocast)
    out = tmp_path / "run"
    extra = ["--gradient-checkpointing", "true"] if algo == "latent_grpo" else []
    summary = train.main(["--algo", algo, "--out", str(out), "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                          *LOOP, *ALGO[algo], "--bf16", "true", "--micro-batch-size", "3", *extra])
    rl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"rl"' in line]
    assert summary["steps"] == 1 and torch.isfinite(torch.tensor(rl[0]["loss"]))
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint").dtype == torch.float32   # weights stay float32


# ---------------------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name, required", [("dropout-grpo-gsm8k", ["--init-from", "ckpt.pt"]),
                                            ("latent-grpo-gsm8k-llama", ["--model", "sft-ckpt"]),
                                            ("latent-grpo-math-qwen", ["--model", "sft-ckpt", "--data", "train.parquet",
                                                                       "--eval-data", "test.parquet"])])
def test_a_preset_sets_its_values_and_explicit_flags_win(name, required):
    args, algo_cls, cfg = train.parse_args(["--preset", name, *required])
    for key, value in train.PRESETS[name]["defaults"].items():
        assert getattr(args, key, getattr(cfg, key, None)) == value, key
    args, _, cfg = train.parse_args(["--preset", name, *required, "--learning-rate", "0.5", "--temperature", "0.7"])
    assert args.learning_rate == 0.5 and cfg.temperature == 0.7


@pytest.mark.parametrize("argv, message", [
    (["--preset", "no-such-preset"], "unknown --preset 'no-such-preset'"),
    (["--preset", "dropout-grpo-gsm8k"], "needs --init-from"),
    (["--preset", "latent-grpo-gsm8k-llama"], "needs --model"),
    (["--preset", "latent-grpo-math-qwen", "--model", "m"], "needs --data: DAPO-Math-17k"),
    (["--preset", "latent-grpo-gsm8k-llama", "--model", "m", "--algo", "dropout_grpo"], "runs --algo latent_grpo"),
])
def test_preset_errors_are_one_line(argv, message):
    with pytest.raises(train.UserError, match=message):
        train.parse_args(argv)


def test_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in train.PRESETS) and "--micro-batch-size" in text and "--init-from" in text


# ---------------------------------------------------------------------------------------------------------------
# --model that cannot be had


def test_an_unreachable_hub_model_is_a_one_line_error(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "train.py", "--model", "no-such-org/no-such-model", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --model no-such-org/no-such-model") and "hub is unreachable" in lines[0]
    assert "local directory" in lines[0] and not out.exists()
