"""bench.py: a quick run writes every headline number, and its port of Coconut's generate gives the same greedy answer
tokens as our batched rollout (the port's correctness check). No assertion depends on a timing's value."""
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import bench
import bench_memory
import data
from dropout_grpo import Config, DropoutGRPO

# Times, ratios and memory: positive and finite. Fitted slopes and exponents: finite (on a busy machine one quick
# measurement per point can give any sign).
POSITIVE = ["latent_step_over_token_step", "soft_latent_step_over_token_step", "speedup_vs_coconut_reference",
            "speedup_vs_coconut_reference_greedy", "rl_step_seconds_dropout_grpo", "rl_step_seconds_latent_grpo",
            "peak_memory_mb_dropout_grpo", "peak_memory_mb_latent_grpo", "soft_latent_step_over_token_step_tiny",
            "soft_full_draw_over_token_step_tiny", "soft_latent_step_over_token_step_s1_tiny",
            "soft_full_draw_over_token_step_s1_tiny",
            "peak_memory_mb_per_row_dropout_grpo_tiny", "peak_memory_mb_per_row_latent_grpo_tiny",
            "peak_memory_mb_per_row_rollout_dropout_grpo_tiny", "peak_memory_mb_per_row_rollout_latent_grpo_tiny"]
FINITE = ["rl_step_seconds_per_latent_step_dropout_grpo",
          "rl_step_seconds_per_latent_step_latent_grpo", "rl_step_group_size_exponent_dropout_grpo",
          "rl_step_group_size_exponent_latent_grpo"]


def test_quick_run_reports_every_item(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in POSITIVE:
        assert math.isfinite(written[key]) and written[key] > 0, key
    for key in FINITE:
        assert math.isfinite(written[key]), key
    assert written["reference_answers_match"] == 1.0          # greedy answers identical to Coconut's generate
    for key in ("device", "torch", "date"):
        assert written[key]
    # compiled vs eager: a speedup and compile seconds, or the reason compiling failed (no C++ compiler, ...)
    compiled = written["items"]["3"]["rows"]
    assert [r["key"] for r in compiled][:1] == ["dropout_grpo_clipped_loss"]
    for r in compiled:
        if "error" in r:
            assert r["error"] and f"compile_speedup_{r['key']}" not in written
        else:
            assert written[f"compile_speedup_{r['key']}"] == r["speedup"] > 0 and r["compile_s"] >= 0
    rows = written["items"]["4"]["dropout_grpo"]["vs_T"]
    assert [r["T"] for r in rows] == [0, 2, bench.THOUGHTS]
    assert all(r["step_s"] > 0 and r["rollout_s"] > 0 and r["update_s"] > 0 for r in rows)


@pytest.mark.parametrize("thoughts", [0, 3])
def test_coconut_reference_port_gives_our_greedy_answers(thoughts):
    """Float64, so that no argmax is a near-tie; questions of different lengths, so that our batch is left-padded.
    An untied LM head and large random weights: a tied GPT-2 at its small default init greedily repeats its last
    input token whatever the thoughts are, which would hide a wrong thought; this one's answers depend on them."""
    tokenizer = data.build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=len(tokenizer), n_positions=128, initializer_range=0.3,
        tie_word_embeddings=False, attn_implementation="eager", bos_token_id=0, eos_token_id=0))
    algo = DropoutGRPO(model, tokenizer, Config(c_thought=1, max_latent_stage=3, max_new_tokens=6), add_tokens=True)
    model.double().eval()
    algo.stage = thoughts
    bench.forbid(model, tokenizer, bench.answer_banned(algo))
    questions = ["Ann has 3 pens.", "Ben has 12 cards. Then Ben finds 4 more cards.", "Kim has 7 coins."]
    with torch.no_grad():
        ours = algo.generate(model, questions, explore=False, generator=torch.Generator().manual_seed(0))
        for question, answer in zip(questions, ours.answer_ids):
            ids = bench.coconut_input_ids(algo, question, thoughts, model.device)
            assert int((ids == algo.latent_id).sum()) == thoughts
            reference = bench.coconut_reference_generate(model, ids, algo.latent_id, algo.eos_id, 6)
            assert len(reference) == 6                            # EOS is forbidden: every answer has 6 tokens
            assert answer.tolist() == reference
    assert len({tuple(a.tolist()) for a in ours.answer_ids}) == len(questions)   # not a degenerate model


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the section runs")
def test_gpu_section_is_skipped_with_a_note_on_cpu(tmp_path):
    result = bench.main(["--items", "gpu", "--out", str(tmp_path / "bench.json")])
    assert result["items"]["gpu"] == {"skipped": "no CUDA device"}


def test_per_row_fit_is_the_slope_over_rows():
    """peak = fixed + rows x per_row from two measured points (bench_memory.fit), in MiB."""
    MiB = 2**20
    points = [{"rows": r, "resident": 100 * MiB, "rollout": (10 + 3 * r) * MiB, "update": (50 + 7 * r) * MiB,
               "positions": 22, "prompt_tokens": 9, "method": "m"} for r in (2, 6)]
    f = bench_memory.fit("latent_grpo", "tiny", points, 6, 16)
    assert (f["rollout_per_row_mb"], f["rollout_fixed_mb"], f["update_per_row_mb"], f["update_fixed_mb"]) == \
           (3, 10, 7, 50)
