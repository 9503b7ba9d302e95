"""
bench.py items 5 and 6: the peak memory of one RL step, per row, and the largest micro-batch that fits a GPU.

    python bench.py --items 5 --sizes llama-49k     # peak per row at a real (49k) vocabulary, both algorithms
    python bench.py --items 6                        # each preset's per-row peak at its own model shape -> micro-batch

Memory is measured, not counted: on CPU the profiler's allocation tracking (every allocation and free of the step,
with the running total), on CUDA torch.cuda.max_memory_allocated. "Resident" is what lives between steps (weights,
gradients, AdamW state); a phase's peak is the most allocated above that while it runs. The rollout (all rows at once)
and the update (old log-probs, loss, backward and AdamW step over the rows of one micro-batch) are measured on their
own, each at 8 and 16 rows of one prompt: peak = fixed + rows x per_row, per_row the slope.

Why 8 and 16 rows, not fewer: the update's peak is the larger of two. grpo_step frees the gradients
(zero_grad(set_to_none)) before the forward and the backward allocates them again as it frees the activations, so one
peak is near the end (gradients back, AdamW's temporaries) and hardly grows with rows, the other at the start of the
backward (every activation and the logits' gradient, less the freed gradients) and grows by the full per-row cost. At
2 and 4 rows of the 49k-vocabulary model the first one is the peak: the slope was 11.8 MiB/row, the per-row cost of
that late peak only; from 8 rows the second one is (Latent-GRPO, 2, 4, 8, 16 rows, 2026-12-07, while bench.forbid
still copied the logits: 26, 50, 331, 1067 MiB, slopes 12, 70, 92 MiB/row).
"""
from __future__ import annotations

import gc
import random
import resource

import torch
from transformers import GPT2Config, LlamaConfig

import bench
import data
import train

GB = 1e9

# Item 6: each preset (train.PRESETS) as measured: its model's shape (random weights), its lengths, float32. A
# 1.24B-parameter Llama with AdamW does not fit this benchmark's CPU, so its shape is measured at 1 and 2 decoder layers
# and every figure extrapolated linearly to its 16 (weights and per-layer activations are linear in the layers; the
# logits, the embeddings and the LM head are not per-layer and are measured whole).
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True)
PRESET_SHAPES = {
    # Coconut GPT-2: 6 thoughts (c 2 x 3 stages) + 64 answer tokens (max_new_tokens), measured whole
    "dropout-grpo-gsm8k": dict(algo="dropout_grpo", model=("gpt2", GPT2Config().to_dict()), layers=None,
                               T=6, answer_tokens=64),
    # Latent-SFT LLaMA-3.2-1B: max_response_length 128 positions, here 64 latent + 64 answer
    "latent-grpo-gsm8k-llama": dict(algo="latent_grpo", model=("llama", LLAMA_1B), layers=(1, 2), T=64,
                                    answer_tokens=64),
}


def profiler_peak_bytes(fn) -> int:
    """Peak bytes allocated on the CPU while fn() runs, above what was live before: the profiler's allocation
    tracking (every CPU allocation and free, with the allocator's running total).

    The running total is the process's since the first profiled allocation, and a block allocated while no profiler
    ran is never counted, nor is its free: so the peak is taken above the total at the first event, and the memory
    freed during fn() must have been allocated under a profiler too (`profiled`) to be subtracted."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.tag == _EventType.Allocation and str(n.extra_fields.device) == "cpu"),
                    key=lambda n: n.start_time_ns)
    if not events:
        return 0
    # the total before the first event = its total less its own size (negative for a free)
    base = events[0].extra_fields.total_allocated - events[0].extra_fields.alloc_size
    return max(0, max(n.extra_fields.total_allocated for n in events) - base)


def profiled(fn):
    """fn() with the CPU allocation tracking on (the result is not read): what it allocates and keeps (AdamW state,
    gradients, a rollout) is then known to the tracker, so a later measured step that frees it is credited."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        return fn()


def peak_bytes(fn, device: torch.device) -> tuple[int, str]:
    """(peak bytes above the live ones while fn() runs, how it was measured)."""
    if device.type == "cuda":
        bench.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        bench.sync(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    try:
        return profiler_peak_bytes(fn), "torch.profiler CPU allocations (profile_memory)"
    except Exception:            # the profiler's event tree is a private API: fall back to the process's max RSS
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
                "ru_maxrss increase (a lower bound: 0 when an earlier step peaked higher)")


def resident_bytes(model, opt) -> int:
    """Weights, gradients and AdamW state: what lives between steps."""
    tensors = [*model.parameters(), *(q.grad for q in model.parameters() if q.grad is not None),
               *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_memory(name, size, device, P, G, answer_tokens) -> dict:
    """Item 5 (as before): peak memory of one whole RL step (rollout + update) of P x G rows at T = THOUGHTS."""
    step, model, opt = bench.rl_stepper(name, size, device, P, G, bench.THOUGHTS, answer_tokens)
    profiled(step)                                       # warm-up: AdamW state and gradients exist from here on
    peak, method = peak_bytes(step, device)
    resident = resident_bytes(model, opt)
    del step, model, opt
    gc.collect()                     # the model and its algorithm reference each other (hooks): free them now
    return {"algo": name, "size": size, "rows": P * G, "T": bench.THOUGHTS, "answer_tokens": answer_tokens,
            "resident_mb": resident / 2**20, "step_peak_mb": peak / 2**20, "total_peak_mb": (resident + peak) / 2**20,
            "method": method}


def phase_peaks(model, algo, device, rows: int) -> dict:
    """One prompt x `rows` generations: after a warm-up step (AdamW state, gradients), the peak bytes above the
    resident ones of the rollout and of the update (train.rollout_batch, train.grpo_step), each measured alone."""
    args = train.Args(num_prompts=1, num_generations=rows)
    records = data.synthetic_task(200, seed=0)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.learning_rate)
    generator = torch.Generator(device=device).manual_seed(0)
    out = {}

    def rollout():   # the same question every time (a fresh data RNG): every measurement sees one prompt length
        out["rollout"] = train.rollout_batch(args, algo, model, records, generator, random.Random(1))

    def update():
        ro, rewards, _ = out["rollout"]
        train.grpo_step(args, algo, model, None, opt, ro, rewards)

    profiled(lambda: (rollout(), update()))              # warm-up: AdamW state and gradients exist from here on
    rollout_peak, method = peak_bytes(rollout, device)
    update_peak, _ = peak_bytes(update, device)
    ro = out["rollout"][0]
    return {"rows": rows, "resident": resident_bytes(model, opt), "rollout": rollout_peak, "update": update_peak,
            "positions": int(ro.lengths[0]), "prompt_tokens": len(ro.prompt_ids[0]), "method": method}


def per_row(name: str, size: str, device, T: int, answer_tokens: int, rows=(8, 16)) -> dict:
    """Item 5, per row: peak = fixed + rows x per_row for the rollout and the update, from two numbers of rows."""
    points = []
    for n in rows:
        model, algo = bench.forced_algo(name, size, device, T, answer_tokens)
        points.append(phase_peaks(model, algo, device, n))
        del model, algo
        gc.collect()                 # the model and its algorithm reference each other (hooks): free them now
    return fit(name, size, points, T, answer_tokens)


def fit(name, size, points, T, answer_tokens) -> dict:
    (a, b), dr = points, points[1]["rows"] - points[0]["rows"]
    result = {"algo": name, "size": size, "T": T, "answer_tokens": answer_tokens, "positions": a["positions"],
              "prompt_tokens": a["prompt_tokens"], "resident_mb": a["resident"] / 2**20, "method": a["method"],
              "points": points}
    for phase in ("rollout", "update"):
        slope = (b[phase] - a[phase]) / dr
        result[f"{phase}_per_row_mb"] = slope / 2**20
        result[f"{phase}_fixed_mb"] = (a[phase] - a["rows"] * slope) / 2**20
    return result


def preset_model(spec: dict, layers: int | None):
    """The preset's model shape with random weights (`layers` decoder layers when given), and the tokenizer."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    kind, config = spec["model"]
    tokenizer = data.build_tokenizer()
    eos = tokenizer.eos_token_id
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**{**config, "bos_token_id": eos, "eos_token_id": eos})), tokenizer
    config = {**config, **({"num_hidden_layers": layers} if layers else {}), "bos_token_id": eos, "eos_token_id": eos}
    return LlamaForCausalLM(LlamaConfig(**config)), tokenizer


def preset_micro_batches(name: str, device, gpus_gb=(24, 80), rows=(8, 16)) -> dict:
    """Item 6: one preset's per-row peak at its own shape (extrapolated over decoder layers where measured at
    fewer), and from it the largest --micro-batch-size whose update fits each GPU, next to the rollout's peak for the
    preset's whole batch (the rollout is not split into micro-batches)."""
    spec = PRESET_SHAPES[name]
    preset = train.PRESETS[name]["defaults"]
    fits = {}
    for layers in spec["layers"] or (None,):
        points = []
        for n in rows:
            torch.manual_seed(0)
            model, tokenizer = preset_model(spec, layers)
            model, algo = bench.forced_algo(spec["algo"], (model, tokenizer), device, spec["T"], spec["answer_tokens"])
            points.append(phase_peaks(model, algo, device, n))
            del model, algo
            gc.collect()
        fits[layers] = fit(spec["algo"], name, points, spec["T"], spec["answer_tokens"])
    keys = ("resident_mb", "rollout_per_row_mb", "rollout_fixed_mb", "update_per_row_mb", "update_fixed_mb")
    if spec["layers"]:
        # linear in the number of decoder layers: f(L) = f(l1) + (L - l1) (f(l2) - f(l1)) / (l2 - l1)
        (l1, f1), (l2, f2) = fits.items()
        L = spec["model"][1]["num_hidden_layers"]
        est = {k: f1[k] + (L - l1) * (f2[k] - f1[k]) / (l2 - l1) for k in keys}
        measured_layers = f"{l1} and {l2} of {L} decoder layers, extrapolated linearly"
    else:
        est = {k: fits[None][k] for k in keys}
        measured_layers = "the whole model"
    first = next(iter(fits.values()))
    total_rows = preset["num_prompts"] * preset["num_generations"]
    result = {"preset": name, "algo": spec["algo"], "measured": measured_layers, "T": spec["T"],
              "answer_tokens": spec["answer_tokens"], "positions": first["positions"],
              "prompt_tokens": first["prompt_tokens"], "method": first["method"], "dtype": "float32",
              "rows_per_batch": total_rows, "preset_micro_batch_size": preset.get("micro_batch_size", 0), **est,
              "rollout_peak_gb": (est["resident_mb"] + est["rollout_fixed_mb"] + total_rows * est["rollout_per_row_mb"])
              * 2**20 / GB, "fits": fits}
    for gb in gpus_gb:
        # the largest m with resident + update_fixed + m x update_per_row <= the GPU's memory
        room = gb * GB / 2**20 - est["resident_mb"] - est["update_fixed_mb"]
        result[f"micro_batch_{gb}gb"] = max(0, int(room // est["update_per_row_mb"]))
    return result
