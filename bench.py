"""
Benchmarks: the latent rollouts and one GRPO step of both algorithms, on random weights.

    python bench.py                                  # every item, tiny + GPT-2-124M sizes (about 5-10 min, 2-core CPU)
    python bench.py --quick                          # under a minute, tiny size only (tests/test_bench.py runs it)
    python bench.py --items 1,2 --sizes tiny         # chosen items and sizes
    python bench.py --device cuda --out bench.json   # on a GPU, which adds the memory-bandwidth section

Each item prints a table as it finishes; every number goes into one JSON file (--out, default bench.json), with the
headline ratios as top-level keys.

  1   One batched latent step against one batched token-decode step of the same model and batch, warm KV cache:
      token (latent_grpo.sample_token), Coconut thought (the last hidden state fed back, Dropout-GRPO), soft step
      (latent_grpo.sample_latent_step: Gumbel noise where it can matter, nucleus + top-K, the soft embedding,
      Latent-GRPO) at the default noise scale and at s = 1, and at s = 1 with the noise drawn over the whole
      vocabulary (the sampler before). At the tiny, GPT-2-124M and SmolLM2-135M (49k vocabulary) sizes.
      -> latent_step_over_token_step, soft_latent_step_over_token_step[_SIZE]    (target: <= 1.1)
  2   Rollouts per second of DropoutGRPO.rollout / .generate (batched, KV cache) against a port of Coconut's own
      generation (facebookresearch/coconut, coconut.py `Coconut.generate`: batch 1, the multi-pass latent forward,
      then the whole sequence re-run without a cache for every answer token). Same model, prompts, thoughts and answer
      length; greedy answers must agree token for token (reference_answers_match).
      -> speedup_vs_coconut_reference                                            (target: >= 20)
  3   Compiled against eager, compile (warm-up) seconds apart, from an empty inductor cache: the pure loss functions
      under torch.compile (dropout_grpo.clipped_loss, LatentGRPO.loss, latent_grpo.latent_logprob), and the
      rollout and the update's loss path with the algorithms' `--compile` "true" against "false".
  4   Seconds per RL step through train.py's own functions (train.rollout_batch, train.grpo_step), split into
      rollout / old+ref log-probs / update, against the number of latent steps T and the group size G, with fits.
  5   Peak memory of one RL step (CUDA: torch.cuda.max_memory_allocated; CPU: the profiler's allocation tracking),
      and per row: the rollout's and the update's peak at 8 and 16 rows, at the 49k vocabulary (bench_memory.py).
      -> peak_memory_mb_*, peak_memory_mb_per_row_*
  6   Each preset (train.PRESETS) at its model's shape: per-row peak -> the largest --micro-batch-size that fits a
      24 GB and an 80 GB GPU (bench_memory.py; minutes on a CPU).              -> micro_batch_{24,80}gb_*
  gpu Fraction of the memory-bandwidth floor reached by one decode step at GPT-2-124M and Llama-1B sizes, bf16
      (CUDA only; the floor comes from a measured device-to-device copy, no spec sheet).

Models. "tiny" is train.py's default model, built by train.build_model with the default train.Args();
"gpt2-124m" is GPT-2's configuration (12 x 768, vocabulary 50257) with random weights and the same tokenizer;
"llama-49k" SmolLM2-135M's (30 x 576, vocabulary 49152), likewise. Random weights never end an answer by themselves,
so lengths are forced: a hook on the LM head sets to -inf the logits of EOS,
of every id the tokenizer cannot decode, of `</think>` for Latent-GRPO, and of Coconut's three tokens for Dropout-GRPO
(untrained, their rows are copies of "<<", an exact tie that rounding breaks differently in batches of 1 and of N).
Every rollout then has exactly T latent steps and --answer-tokens answer tokens. Random weights also earn reward 0, so
the RL step's gradient is 0; its cost is not (the same forwards, backward and AdamW step). Timings are medians after a
warm-up, the compared variants taking turns; on a shared CPU they are rough.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import compat
import data
import dropout_grpo
import eval as evaluation
import latent_grpo
import train
from dropout_grpo import DropoutGRPO
from latent_grpo import LatentGRPO

ALGOS = {"dropout_grpo": DropoutGRPO, "latent_grpo": LatentGRPO}
ITEMS = ("1", "2", "3", "4", "5", "6", "gpu")

# Per size: decode batch (item 1); prompts x generations of a rollout batch and prompts run through the batch-1
# reference (item 2); prompts x generations of the RL step whose memory is measured (item 5). GPT-2-124M on a CPU is
# slow, hence its smaller batches and capped repeats.
SIZES = {
    "tiny": dict(decode_batch=128, prompts=16, generations=8, ref_prompts=16, mem_prompts=16, mem_generations=8,
                 max_repeats=None),
    "gpt2-124m": dict(decode_batch=32, prompts=4, generations=8, ref_prompts=2, mem_prompts=2, mem_generations=4,
                      max_repeats=2),
    "llama-49k": dict(decode_batch=32, prompts=4, generations=8, ref_prompts=2, mem_prompts=2, mem_generations=4,
                      max_repeats=2),
}
QUICK = dict(decode_batch=8, prompts=2, generations=4, ref_prompts=2, mem_prompts=2, mem_generations=2, max_repeats=2)
# "llama-49k": SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), a real 49,152-token vocabulary
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
CONTEXT = 64           # item 1: tokens already in the KV cache
THOUGHTS = 6           # latent steps at the default size: Coconut's c_thought 2 x max_latent_stage 3 (item 2, 4, 5)


# ------------------------------------------------------------------------------------------------------------------
# Models, forced lengths, timing
# ------------------------------------------------------------------------------------------------------------------

def make_algo(name: str, size: str, device: torch.device, compile: str | None = None, **cfg):
    """(model, algo) built as train.main builds them: model and tokenizer, the algorithm (which adds its tokens), then
    the device, eval mode. Seeded, so every call gives the same weights."""
    torch.manual_seed(0)
    if isinstance(size, tuple):                      # a (model, tokenizer) built by the caller
        model, tokenizer = size
    elif size == "tiny":
        model, tokenizer = train.build_model(train.Args(), "tiny")
    else:
        tokenizer = data.build_tokenizer()
        eos = tokenizer.eos_token_id
        if size == "llama-49k":
            model = LlamaForCausalLM(LlamaConfig(bos_token_id=eos, eos_token_id=eos, **SMOLLM2_135M))
        else:
            model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos))   # GPT-2's own sizes
    cls = ALGOS[name]
    if compile is not None:
        cfg["compile"] = compile
    algo = cls(model, tokenizer, cls.Config(**cfg), add_tokens=True)
    model.to(device).eval()
    if hasattr(algo, "start_rl"):
        algo.start_rl(model)
    return model, algo


def forbid(model, tokenizer, ids):
    """Force rollout lengths: the logits of `ids`, and of every id past the tokenizer (GPT-2's 50257 rows against our
    few hundred tokens), become -inf. A hook on the LM head, so every code path (ours and the reference) sees it."""
    head = model.get_output_embeddings()
    banned = torch.zeros(head.weight.shape[0], dtype=torch.bool, device=head.weight.device)
    banned[list(ids)] = True
    banned[len(tokenizer):] = True
    # in place: the LM head's backward does not read its output, and a copy would add one (rows, positions, V)
    # tensor to every peak that bench_memory.py measures, which no real run has
    return head.register_forward_hook(lambda module, args, out: out.masked_fill_(banned, -math.inf))


def truncate(cache, length: int):
    """Keep the first `length` positions of a DynamicCache. crop(-n) removes n positions in every transformers 5.x
    (a positive argument was an absolute length in early 5.x and is an error in later ones)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device, warmup: int = 3) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    return timed_in_turns({"fn": fn}, repeats, device, warmup)["fn"]


def timed_in_turns(fns: dict, repeats: int, device: torch.device, warmup: int = 3) -> dict:
    """Medians of several functions timed in turns (a, b, c, a, b, c, ...): on a shared machine a burst of load from
    elsewhere then hits all of them alike, and their ratio stays fair."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def first_and_steady(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, median of the next `repeats`): the first call of a compiled function compiles."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, timed(fn, repeats, device, warmup=1)


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """Least squares y = a + b x: (b, a, R^2)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss if ss > 0 else 1.0
    return b, a, r2


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]):
    """columns: (header, key, format). A missing key prints as '-'."""
    print(f"\n== {title}")
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for _, k, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for c in cells:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))


def questions(n: int, seed: int = 0) -> list[str]:
    return [r["question"] for r in data.synthetic_task(n, seed)]


# ------------------------------------------------------------------------------------------------------------------
# 1. One latent step against one token step
# ------------------------------------------------------------------------------------------------------------------

def bench_step(size: str, batch: int, repeats: int, device: torch.device) -> dict:
    """One batched decode position with a warm KV cache of CONTEXT tokens, three ways; the new position is cropped
    after each call, so every repeat sees the same context."""
    model, _ = make_algo("dropout_grpo", size, device)
    vocab = model.get_output_embeddings().weight.shape[0]
    E = model.get_input_embeddings().weight
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(vocab, (batch, CONTEXT), device=device, generator=generator)
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=ids, **compat.cache_arg(model, cache), use_cache=True, output_hidden_states=True)
        state = {"z": out.logits[:, -1].float(), "h": out.hidden_states[-1][:, -1]}
        position = torch.full((batch, 1), CONTEXT, device=device)

        def step(**inputs):
            out = model(**inputs, position_ids=position, **compat.cache_arg(model, cache), use_cache=True,
                        output_hidden_states="inputs_embeds" in inputs)
            truncate(cache, CONTEXT)
            return out

        def token_step():       # Latent-GRPO's answer sampler: temperature, top-k, top-p
            y = latent_grpo.sample_token(state["z"], 0.6, 0.95, 30, generator)
            step(input_ids=y[:, None])

        def coconut_step():     # Dropout-GRPO's thought: h_t = last hidden state of the previous step
            state["h"] = step(inputs_embeds=state["h"][:, None]).hidden_states[-1][:, -1]

        def soft_step(s):       # Latent-GRPO's rollout step at noise scale s: candidates, top-K, mix of K embeddings
            ids_k, _, w = latent_grpo.sample_latent_step(state["z"], 10, 0.95, 1.0, True, s, generator)
            step(inputs_embeds=latent_grpo.soft_embedding(E, ids_k, w)[:, None])

        def soft_full_draw(s):  # the same step with the noise drawn over the whole vocabulary (the sampler before)
            noise = latent_grpo.gumbel_noise(state["z"].shape, True, s, generator)
            ids_k, _, w = latent_grpo.latent_step(state["z"], noise, 10, 0.95, 1.0)
            step(inputs_embeds=latent_grpo.soft_embedding(E, ids_k, w)[:, None])

        s0 = latent_grpo.Config().noise_scale
        t = timed_in_turns({"token": token_step, "coconut": coconut_step, "soft": lambda: soft_step(s0),
                            "soft_full": lambda: soft_full_draw(s0), "soft_s1": lambda: soft_step(1.0),
                            "soft_full_s1": lambda: soft_full_draw(1.0)}, repeats, device)
        token = t["token"]
    row = {"size": size, "batch": batch, "context": CONTEXT, "vocab": vocab, "noise_scale": s0,
           "token_ms": 1e3 * token, "coconut_latent_ms": 1e3 * t["coconut"], "soft_latent_ms": 1e3 * t["soft"],
           "coconut_latent_over_token": t["coconut"] / token, "soft_latent_over_token": t["soft"] / token}
    for key in ("soft_full", "soft_s1", "soft_full_s1"):   # soft_full_draw_over_token, soft_s1_over_token, ...
        name = key.replace("soft_full", "soft_full_draw")
        row[f"{name}_ms"], row[f"{name}_over_token"] = 1e3 * t[key], t[key] / token
    return row


# ------------------------------------------------------------------------------------------------------------------
# 2. Our batched rollout against Coconut's reference generation
# ------------------------------------------------------------------------------------------------------------------

def coconut_reference_generate(model, input_ids, latent_id: int, eos_id: int, max_new_tokens: int) -> list[int]:
    """A plain port of facebookresearch/coconut `Coconut.generate` (coconut.py), batch 1, greedy.

    input_ids (1, L): question, <bot>, <latent> x T, <eot>, as Coconut's evaluation set lays a question out.
    The latent phase is Coconut's multi-pass forward: pass k runs the positions up to the k-th <latent> (reusing the
    cache of the earlier ones), then that <latent>'s input embedding is replaced by the last hidden state just before
    it; a final pass runs the rest, whose last logits give the first answer token. Every further answer token
    re-runs the WHOLE sequence of embeddings (thoughts included) through the model without a cache. Stops at EOS
    (not kept) or after max_new_tokens tokens. Returns the answer token ids.
    """
    assert input_ids.shape[0] == 1, "Coconut's generate supports batch size 1 only"
    embedding = model.get_input_embeddings()
    L = input_ids.shape[1]
    attention_mask = torch.ones_like(input_ids)
    position_ids = torch.arange(L, device=input_ids.device)[None]
    latents = (input_ids[0] == latent_id).nonzero()[:, 0].tolist()
    inputs_embeds = embedding(input_ids)

    # ---- Coconut.forward ----
    compute_range = (0, latents[0]) if latents else (0, L)      # before the first latent position
    cache, logits = None, []
    for pass_idx in range(len(latents)):
        r0, r1 = compute_range
        if cache is not None:
            truncate(cache, r0)                                  # Coconut keeps the cache's first r0 positions
        out = model(inputs_embeds=inputs_embeds[:, r0:r1], attention_mask=attention_mask[:, :r1],
                    position_ids=position_ids[:, r0:r1], **compat.cache_arg(model, cache), use_cache=True,
                    output_hidden_states=True)
        logits.append(out.logits)
        compute_range = (r1, L if pass_idx + 1 >= len(latents) else r1 + 1)
        hidden, cache = out.hidden_states[-1], compat.output_cache(out)
        # Coconut rebuilds inputs_embeds from per-position rows (no in-place write), this latent's row replaced by
        # the hidden state of the position before it (hidden holds positions r0.., hence the offset)
        rows = list(inputs_embeds[0])
        rows[latents[pass_idx]] = hidden[0, latents[pass_idx] - 1 - r0]
        inputs_embeds = torch.stack(rows)[None]
    r0, r1 = compute_range
    if cache is not None:
        truncate(cache, r0)
    out = model(inputs_embeds=inputs_embeds[:, r0:r1], attention_mask=attention_mask[:, :r1],
                position_ids=position_ids[:, r0:r1], **compat.cache_arg(model, cache), use_cache=True, output_hidden_states=True)
    logits.append(out.logits)
    logits = torch.cat(logits, dim=-2)
    F.cross_entropy(logits[0, :-1], input_ids[0, 1:])           # forward's loss on generate's placeholder labels

    # ---- Coconut.generate: the first token from the forward, then no cache ----
    tokens = [int(logits[0, -1].argmax())]
    new_inputs_embeds = torch.cat([inputs_embeds, embedding(input_ids.new_tensor(tokens[-1:]))[None]], 1)
    for _ in range(max_new_tokens - 1):
        next_token = int(model(inputs_embeds=new_inputs_embeds).logits[0, -1].argmax())
        if next_token == eos_id:
            break
        tokens.append(next_token)
        new_inputs_embeds = torch.cat([new_inputs_embeds, embedding(input_ids.new_tensor([next_token]))[None]], 1)
    return tokens


def answer_banned(algo: DropoutGRPO) -> list[int]:
    """EOS (fixed lengths), and the three Coconut tokens: untrained, their rows are all copies of "<<" (§2.1), so
    their logits tie exactly with it, and an exact tie is broken by rounding, differently in a batch of 1 and of N."""
    return [algo.eos_id, algo.bot_id, algo.eot_id, algo.latent_id]


def coconut_input_ids(algo: DropoutGRPO, question: str, T: int, device) -> torch.Tensor:
    """Coconut's evaluation layout of our prompt: question "\\n" <bot>, then <latent> x T and <eot>."""
    ids = algo._prompt(question).tolist() + [algo.latent_id] * T + [algo.eot_id]
    return torch.tensor([ids], device=device)


def bench_reference(size: str, p: dict, answer_tokens: int, repeats: int, device: torch.device) -> dict:
    model, algo = make_algo("dropout_grpo", size, device, max_new_tokens=answer_tokens)
    algo.stage = algo.num_stages                        # the last curriculum stage: c_thought x max_latent_stage thoughts
    T = algo.num_thoughts(algo.stage)
    forbid(model, algo.tokenizer, answer_banned(algo))
    P, G, n_ref = p["prompts"], p["generations"], p["ref_prompts"]
    qs = questions(P * G)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        # the reference, one question at a time (after one untimed call)
        refs = [coconut_reference_generate(model, coconut_input_ids(algo, qs[0], T, device), algo.latent_id,
                                           algo.eos_id, answer_tokens)]
        sync(device)
        t0 = time.perf_counter()
        inputs = [coconut_input_ids(algo, q, T, device) for q in qs[:n_ref]]
        refs = [coconut_reference_generate(model, ids, algo.latent_id, algo.eos_id, answer_tokens) for ids in inputs]
        sync(device)
        ref_s = (time.perf_counter() - t0) / n_ref
        # positions each side runs through the model per rollout: the reference re-runs the whole sequence for every
        # answer token after the first; we run each position once. speedup = this saved work x what batching adds
        n_in = [ids.shape[1] for ids in inputs]
        position_ratio = statistics.mean((n + sum(n + k for k in range(1, answer_tokens))) / (n + answer_tokens - 1)
                                         for n in n_in)
        # the port's correctness check: our greedy evaluation policy gives the same tokens
        ours = algo.generate(model, qs[:n_ref], explore=False, generator=generator)
        match = sum(a.tolist() == r for a, r in zip(ours.answer_ids, refs)) / n_ref
        lengths = {len(a) for a in ours.answer_ids} | {len(r) for r in refs}
        # ours, batched: greedy evaluation of P*G different questions, and training rollouts (P questions x G)
        gen_s = timed(lambda: algo.generate(model, qs, explore=False, generator=generator), repeats, device, 1)
        roll_s = timed(lambda: algo.rollout(model, qs[:P], G, generator), repeats, device, 1)
    n = P * G
    return {"size": size, "thoughts": T, "answer_tokens": answer_tokens, "batch": n, "ref_prompts": n_ref,
            "reference_rollouts_per_s": 1 / ref_s, "generate_rollouts_per_s": n / gen_s,
            "rollout_rollouts_per_s": n / roll_s, "speedup_rollout": ref_s * n / roll_s,
            "speedup_generate": ref_s * n / gen_s, "answers_match": match, "lengths": sorted(lengths),
            "position_ratio": position_ratio, "batching_gain": ref_s * n / roll_s / position_ratio}


# ------------------------------------------------------------------------------------------------------------------
# 3. Compiled against eager
# ------------------------------------------------------------------------------------------------------------------

def lengths_cfg(name: str, T: int, answer_tokens: int) -> dict:
    """Config fields that give T latent steps and answer_tokens answer tokens once EOS / </think> are forbidden."""
    if name == "dropout_grpo":
        # T = c_thought x stage (set on the algorithm); room for the largest T of the curve
        return dict(c_thought=2, max_latent_stage=max(THOUGHTS, T) // 2, max_new_tokens=answer_tokens)
    # Latent-GRPO: the cap ends the latent phase (</think> never wins), then answer_tokens ordinary tokens
    return dict(max_latent_steps=T, max_response_length=T + answer_tokens)


def forced_algo(name, size, device, T, answer_tokens, compile=None):
    """A model and algorithm whose rollouts all have T latent steps and answer_tokens answer tokens."""
    model, algo = make_algo(name, size, device, compile=compile, **lengths_cfg(name, T, answer_tokens))
    if name == "dropout_grpo":
        algo.stage = T // 2
        forbid(model, algo.tokenizer, answer_banned(algo))
    else:
        forbid(model, algo.tokenizer, [algo.eos_id, algo.end_id])
    return model, algo


def update_inputs(name, model, algo, P, G, device):
    """A real rollout batch and what the loss needs: (rollout, old log-probs, advantages from random rewards)."""
    generator = torch.Generator(device=device).manual_seed(0)
    ro = algo.rollout(model, questions(P), G, generator)
    with torch.no_grad():
        old = algo.logprobs(model, ro)
    rewards = torch.randint(2, (P, G), generator=torch.Generator().manual_seed(0)).float()
    return ro, old, algo.advantages(rewards.to(old.device), ro, old)


def fwd_bwd(fn, x):
    """A call that takes a leaf x and returns a scalar (or a loss, stats pair): forward + backward."""
    def run():
        x.grad = None
        out = fn(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    return run


@contextlib.contextmanager
def cold_compile_cache():
    """An empty inductor cache directory (and cleared in-memory caches) for the duration: the compile seconds are
    then those of a first compile, not of a cache hit left by an earlier run."""
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as directory:
        try:
            from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
        except ImportError:                  # an older torch: the compile seconds may include cache hits
            temporary_cache_dir = None
        with temporary_cache_dir(directory) if temporary_cache_dir else contextlib.nullcontext():
            yield


def compare_compiled(key: str, label: str, fn, args_fn, repeats: int, device) -> dict:
    """Eager against torch.compile(fn) on the same inputs. `args_fn(f)` returns the callable to time for f."""
    eager_first, eager = first_and_steady(args_fn(fn), repeats, device)
    torch._dynamo.reset()     # each function's compile time on its own
    try:
        # the losses read .item() for their statistics: capture it in the graph instead of breaking it there
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled_fn = torch.compile(fn)
            first, steady = first_and_steady(args_fn(compiled_fn), repeats, device)
    except Exception as e:                  # no compiler on this machine, or an op inductor cannot take
        return {"key": key, "what": label, "eager_ms": 1e3 * eager,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    return {"key": key, "what": label, "eager_ms": 1e3 * eager, "compiled_ms": 1e3 * steady,
            "compile_s": max(first - steady, 0.0), "speedup": eager / steady}


def bench_compile(p: dict, answer_tokens: int, repeats: int, device: torch.device, quick: bool) -> tuple[list, list]:
    rows, notes = [], []
    P, G, T = p["prompts"], p["generations"], THOUGHTS
    # (a) the pure loss functions compiled directly, on the shapes of a real rollout batch at this size
    model, algo = forced_algo("dropout_grpo", "tiny", device, T, answer_tokens, compile="false")
    ro, old, adv = update_inputs("dropout_grpo", model, algo, P, G, device)
    lengths = torch.tensor([len(a) for a in ro.answer_ids], device=old.device)
    mask = torch.arange(old.shape[1], device=old.device) < lengths[:, None]
    denom = len(lengths) * algo.cfg.max_new_tokens
    logp = (old + 0.01 * torch.randn_like(old)).requires_grad_()
    rows.append(compare_compiled(
        "dropout_grpo_clipped_loss", "dropout_grpo.clipped_loss", dropout_grpo.clipped_loss,
        lambda f: fwd_bwd(lambda x: f(x, old, None, adv, mask, algo.cfg.epsilon, algo.cfg.beta, denom), logp),
        repeats, device))
    if not quick:
        model, algo = forced_algo("latent_grpo", "tiny", device, T, answer_tokens, compile="false")
        ro, old, adv = update_inputs("latent_grpo", model, algo, P, G, device)
        logp = (old + 0.01 * torch.randn_like(old)).requires_grad_()
        rows.append(compare_compiled("latent_grpo_loss", "LatentGRPO.loss", algo.loss,
                                     lambda f: fwd_bwd(lambda x: f(x, old, None, adv, ro), logp), repeats, device))
        # the latent steps' log-density (its log-softmax over the vocabulary is the loss path's heavy part)
        ids, scores = torch.cat(ro.topk_ids).to(device), torch.cat(ro.topk_scores).to(device)
        z = torch.randn(len(ids), model.get_output_embeddings().weight.shape[0], device=device, requires_grad=True)
        A = torch.randn(len(ids), device=device)
        rows.append(compare_compiled("latent_grpo_latent_logprob", "latent_grpo.latent_logprob",
                                     latent_grpo.latent_logprob,
                                     lambda f: fwd_bwd(lambda x: f(x, ids, scores, A), z), repeats, device))
    # (b) the algorithms' own switch (Config.compile): rollout and the update's loss path, both settings
    for name in ALGOS:
        if quick:
            notes.append(f"{name}: --quick skips compiling the rollout")
            continue
        result = {}
        for flag in ("false", "true"):
            torch._dynamo.reset()
            model, algo = forced_algo(name, "tiny", device, T, answer_tokens, compile=flag)
            generator = torch.Generator(device=device).manual_seed(0)
            with torch.no_grad():
                result[flag, "rollout"] = first_and_steady(lambda: algo.rollout(model, questions(P), G, generator),
                                                           repeats, device)
            ro, old, adv = update_inputs(name, model, algo, P, G, device)

            def loss_path():
                loss, _ = algo.loss(algo.logprobs(model, ro, adv), old, None, adv, ro)
                loss.backward()
            result[flag, "loss path"] = first_and_steady(loss_path, repeats, device)
        for what in ("rollout", "loss path"):
            (_, eager), (first, steady) = result["false", what], result["true", what]
            rows.append({"key": f"{name}_{what.replace(' ', '_')}", "what": f"{name} {what} (Config.compile)",
                         "eager_ms": 1e3 * eager,
                         "compiled_ms": 1e3 * steady, "compile_s": max(first - steady, 0.0), "speedup": eager / steady})
    return rows, notes


# ------------------------------------------------------------------------------------------------------------------
# 4, 5. One RL step through train.py's functions; its time split and peak memory
# ------------------------------------------------------------------------------------------------------------------

def rl_stepper(name: str, size: str, device: torch.device, P: int, G: int, T: int, answer_tokens: int):
    """A closure running one GRPO step exactly as train.run_rl does (train.rollout_batch, then train.grpo_step on a
    fresh AdamW), returning its seconds split. Lengths are forced: T latent steps, answer_tokens answer tokens."""
    model, algo = forced_algo(name, size, device, T, answer_tokens)
    args = train.Args(num_prompts=P, num_generations=G)
    records = data.synthetic_task(max(200, 4 * P), seed=0)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.learning_rate)
    generator = torch.Generator(device=device).manual_seed(0)
    data_rng = random.Random(1)

    def step() -> dict:
        sync(device)
        t0 = time.perf_counter()
        rollout, rewards, _ = train.rollout_batch(args, algo, model, records, generator, data_rng)
        sync(device)
        t1 = time.perf_counter()
        metrics = train.grpo_step(args, algo, model, None, opt, rollout, rewards)   # beta 0: no reference model
        sync(device)
        return {"rollout_s": t1 - t0, "logprobs_s": metrics["time/logprobs"], "update_s": metrics["time/update"],
                "step_s": time.perf_counter() - t0}

    return step, model, opt


def median_steps(steppers: list, steps: int) -> list[dict]:
    """Median phase times of each stepper over `steps` rounds, the steppers taking turns within a round (a burst of
    load from elsewhere then hits every point of a curve alike), after one warm-up step each (AdamW state, first-call
    costs)."""
    for step in steppers:
        step()
    runs = [[step() for step in steppers] for _ in range(steps)]
    return [{k: statistics.median(r[i][k] for r in runs) for k in runs[0][i]} for i in range(len(steppers))]


def bench_rl_curves(name, device, P, G0, Ts, Gs, answer_tokens, steps) -> dict:
    """Seconds per step against T (at G0) and against G (at T = THOUGHTS, the same P prompts)."""
    points = [(T, G0) for T in Ts] + [(THOUGHTS, G) for G in Gs]
    times = median_steps([rl_stepper(name, "tiny", device, P, G, T, answer_tokens)[0] for T, G in points], steps)
    rows = [{"algo": name, "T": T, "G": G, **t} for (T, G), t in zip(points, times)]
    t_rows, g_rows = rows[:len(Ts)], rows[len(Ts):]
    slope, intercept, r2 = linear_fit(Ts, [r["step_s"] for r in t_rows])
    phases = ("rollout_s", "logprobs_s", "update_s")
    # t ~ G^alpha: alpha < 1 is sub-linear (the batch grows, the number of sequential forward calls does not)
    exponent = {k: linear_fit([math.log(G) for G in Gs], [math.log(r[k]) for r in g_rows])[0]
                for k in ("step_s", *phases)}
    return {"vs_T": t_rows, "vs_G": g_rows, "seconds_per_latent_step": slope, "intercept_s": intercept, "r2_T": r2,
            "seconds_per_latent_step_by_phase": {k: linear_fit(Ts, [r[k] for r in t_rows])[0] for k in phases},
            "group_size_exponent": exponent["step_s"],
            "group_size_exponent_by_phase": {k: exponent[k] for k in phases}}


# ------------------------------------------------------------------------------------------------------------------
# GPU: fraction of the memory-bandwidth floor of one decode step
# ------------------------------------------------------------------------------------------------------------------

def gpu_models():
    return {
        "gpt2-124m": lambda: GPT2LMHeadModel(GPT2Config()),
        # Llama-3.2-1B's shape (tied embeddings, as that model)
        "llama-1b": lambda: LlamaForCausalLM(LlamaConfig(
            hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)),
    }


def peak_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the practical floor of a memory-bound step."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), repeats, device)


def bench_bandwidth(device: torch.device, repeats: int, batches=(1, 32), context: int = 512) -> dict:
    bandwidth = peak_bandwidth(device, repeats)
    rows = []
    for name, build in gpu_models().items():
        torch.manual_seed(0)
        with torch.device(device):
            model = build().to(torch.bfloat16).eval()
        rows += decode_vs_floor(name, model, bandwidth, batches, context, repeats, device)
        del model
        torch.cuda.empty_cache()
    return {"peak_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}


def decode_vs_floor(name, model, bandwidth: float, batches, context: int, repeats: int, device) -> list[dict]:
    """One greedy decode step per batch size, warm KV cache of `context` tokens, against bytes read / bandwidth."""
    rows = []
    cfg = model.config
    # bytes every decode step reads: all weights, except an untied input embedding (only B rows are gathered)
    weights = sum(q.numel() * q.element_size() for q in model.parameters())
    E, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if E.data_ptr() != head.data_ptr():
        weights -= E.numel() * E.element_size()
    n_layer = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for B in batches:
        kv = 2 * n_layer * B * context * kv_heads * head_dim * 2            # keys + values, bf16
        ids = torch.randint(cfg.vocab_size, (B, context), device=device)
        with torch.no_grad():
            cache = DynamicCache()
            z = model(input_ids=ids, **compat.cache_arg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
            position = torch.full((B, 1), context, device=device)

            def decode():
                y = z.argmax(-1, keepdim=True)
                model(input_ids=y, position_ids=position, **compat.cache_arg(model, cache), use_cache=True)
                truncate(cache, context)
            seconds = timed(decode, repeats, device)
        floor = (weights + kv) / bandwidth
        rows.append({"model": name, "batch": B, "context": context, "step_ms": 1e3 * seconds,
                     "bytes_read_mb": (weights + kv) / 2**20, "floor_ms": 1e3 * floor,
                     "fraction_of_floor": floor / seconds})
    return rows


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------

def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} thread(s)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default=None, help=f"comma-separated, from {','.join(ITEMS)} (default: all)")
    parser.add_argument("--sizes", default=None, help=f"for items 1, 2, 5, from {','.join(SIZES)} "
                        "(default: all; --quick: tiny)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1, as train.py: the tiny model is overhead-bound; 0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 10; quick 2)")
    parser.add_argument("--rl-steps", type=int, default=None, help="timed RL steps per point (default 3; quick 1)")
    parser.add_argument("--answer-tokens", type=int, default=None,
                        help="answer tokens of every rollout (default 16, Coconut's generate default; quick 4)")
    parser.add_argument("--quick", action="store_true", help="tiny size, small batches, few repeats: under a minute")
    parser.add_argument("--out", default="bench.json", help="the JSON file written (rewritten after each item)")
    args = parser.parse_args(argv)
    q = args.quick
    args.items = (args.items or ("1,2,3,4,5" if q else ",".join(ITEMS))).split(",")
    args.sizes = (args.sizes or ("tiny" if q else ",".join(SIZES))).split(",")
    for value, allowed, flag in ((args.items, ITEMS, "--items"), (args.sizes, SIZES, "--sizes")):
        if set(value) - set(allowed):
            parser.error(f"{flag}: unknown {sorted(set(value) - set(allowed))}; choose from {','.join(allowed)}")
    args.repeats = args.repeats or (2 if q else 10)
    args.rl_steps = args.rl_steps or (1 if q else 3)
    args.answer_tokens = args.answer_tokens or (4 if q else 16)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = train.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = {s: dict(QUICK) if args.quick else dict(SIZES[s]) for s in SIZES}
    A = args.answer_tokens
    result = {"device": str(device), "machine": machine(device), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "threads": torch.get_num_threads(), "quick": args.quick, "answer_tokens": A,
              # the algorithms' own torch.compile switch, at its default ("auto": on for CUDA) in items 1, 2, 4, 5
              "algorithm_compile": {n: c.Config().compile for n, c in ALGOS.items()},
              "items": {}}
    print(f"{result['date']}  device {device} ({result['machine']})  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")

    def save():   # atomic: a reader (or a run stopped mid-way) never sees half a file
        evaluation.write_json_atomic(Path(args.out), result)

    def reps(size):   # repeats, capped for the slow size
        cap = params[size]["max_repeats"]
        return min(args.repeats, cap) if cap else args.repeats

    if "1" in args.items:
        rows = [bench_step(s, params[s]["decode_batch"], args.repeats, device) for s in args.sizes]
        print_table(f"1. one latent step vs one token step (batch x context {CONTEXT}, warm KV cache, random weights)",
                    rows, [("size", "size", ""), ("batch", "batch", "d"), ("token ms", "token_ms", ".2f"),
                           ("coconut ms", "coconut_latent_ms", ".2f"), ("soft ms", "soft_latent_ms", ".2f"),
                           ("coconut/token", "coconut_latent_over_token", ".2f"),
                           ("soft/token", "soft_latent_over_token", ".2f"),
                           ("full draw/token", "soft_full_draw_over_token", ".2f"),
                           ("soft s=1/token", "soft_s1_over_token", ".2f"),
                           ("full draw s=1/token", "soft_full_draw_s1_over_token", ".2f")])
        print(f"   target: latent / token <= 1.1. soft: the rollout's sampler (latent_grpo.sample_latent_step) at the "
              f"default noise scale s = {rows[0]['noise_scale']}; full draw: the noise drawn over the whole "
              f"vocabulary, as the sampler did before; s=1: the released scripts' noise scale")
        result["items"]["1"] = rows
        main_row = next((r for r in rows if r["size"] == "tiny"), rows[0])     # the headline: the default size
        result["latent_step_over_token_step"] = main_row["coconut_latent_over_token"]
        result["soft_latent_step_over_token_step"] = main_row["soft_latent_over_token"]
        for r in rows:
            suffix = "_" + r["size"].replace("-", "_")
            result[f"latent_step_over_token_step{suffix}"] = r["coconut_latent_over_token"]
            result[f"soft_latent_step_over_token_step{suffix}"] = r["soft_latent_over_token"]
            result[f"soft_full_draw_over_token_step{suffix}"] = r["soft_full_draw_over_token"]
            result[f"soft_latent_step_over_token_step_s1{suffix}"] = r["soft_s1_over_token"]
            result[f"soft_full_draw_over_token_step_s1{suffix}"] = r["soft_full_draw_s1_over_token"]
        save()

    if "2" in args.items:
        rows = [bench_reference(s, params[s], A, reps(s), device) for s in args.sizes]
        print_table(f"2. rollouts/s: ours (batched, KV cache) vs Coconut's generate (batch 1, no cache for answers); "
                    f"{rows[0]['thoughts']} thoughts + {A} answer tokens",
                    rows, [("size", "size", ""), ("rows", "batch", "d"), ("reference/s", "reference_rollouts_per_s", ".1f"),
                           ("generate/s", "generate_rollouts_per_s", ".1f"), ("rollout/s", "rollout_rollouts_per_s", ".1f"),
                           ("speedup rollout", "speedup_rollout", ".1f"), ("speedup generate", "speedup_generate", ".1f"),
                           ("same answers", "answers_match", ".2f"), ("positions ratio", "position_ratio", ".1f"),
                           ("batching gain", "batching_gain", ".1f")])
        print("   target: speedup >= 20. same answers: greedy answers identical to the reference's (must be 1.00).\n"
              "   positions ratio: positions the reference runs through the model per rollout over ours (it re-runs\n"
              "   the whole sequence for each answer token). batching gain = speedup rollout / positions ratio: what\n"
              "   batching adds to the saved work, small where a forward is compute-bound (a CPU at GPT-2 size)")
        result["items"]["2"] = rows
        result["reference_answers_match"] = min(r["answers_match"] for r in rows)
        for r in rows:
            suffix = "" if r["size"] == "tiny" else "_" + r["size"].replace("-", "_")
            result[f"speedup_vs_coconut_reference{suffix}"] = r["speedup_rollout"]
            result[f"speedup_vs_coconut_reference_greedy{suffix}"] = r["speedup_generate"]
        save()

    if "3" in args.items:
        with cold_compile_cache():
            rows, notes = bench_compile(params["tiny"], A, args.repeats, device, args.quick)
        print_table("3. compiled vs eager (tiny size; forward + backward for the losses)", rows,
                    [("what", "what", ""), ("eager ms", "eager_ms", ".3f"), ("compiled ms", "compiled_ms", ".3f"),
                     ("speedup", "speedup", ".2f"), ("compile s", "compile_s", ".1f"), ("error", "error", "")])
        for r in rows:
            if round(r.get("speedup", 1), 2) < 1:
                print(f"   {r['what']}: compiled is slower here ({r['speedup']:.2f}x): compile does not pay off at "
                      f"this size on this device ({device.type})")
        for note in notes:
            print(f"   note: {note}")
        result["items"]["3"] = {"rows": rows, "notes": notes}
        for r in rows:
            if "speedup" in r:
                result[f"compile_speedup_{r['key']}"] = r["speedup"]
                result[f"compile_seconds_{r['key']}"] = r["compile_s"]
        save()

    if "4" in args.items:
        p = params["tiny"]
        Ts, Gs = ((0, 2, THOUGHTS) if args.quick else (0, 2, 4, 6, 8, 12)), ((2, 4) if args.quick else (2, 4, 8, 16))
        curves = {name: bench_rl_curves(name, device, p["prompts"], p["generations"], Ts, Gs, A, args.rl_steps)
                  for name in ALGOS}
        columns = [("algo", "algo", ""), ("T", "T", "d"), ("G", "G", "d"), ("step s", "step_s", ".3f"),
                   ("rollout s", "rollout_s", ".3f"), ("logprobs s", "logprobs_s", ".3f"), ("update s", "update_s", ".3f")]
        print_table(f"4. seconds per RL step (tiny, {p['prompts']} prompts, {A} answer tokens): "
                    f"against T (G = {p['generations']}) and G (T = {THOUGHTS})",
                    [r for c in curves.values() for r in c["vs_T"] + c["vs_G"]], columns)
        for name, c in curves.items():
            per_T = ", ".join(f"{k[:-2]} {v * 1e3:.1f}" for k, v in c["seconds_per_latent_step_by_phase"].items())
            per_G = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in c["group_size_exponent_by_phase"].items())
            print(f"   {name}: step = {c['intercept_s']:.3f} s + {c['seconds_per_latent_step'] * 1e3:.1f} ms x T "
                  f"(R^2 {c['r2_T']:.3f}; linear expected; ms per latent step by phase: {per_T})")
            print(f"   {' ' * len(name)}  step ~ G^{c['group_size_exponent']:.2f} (sub-linear expected: < 1; "
                  f"by phase: {per_G})")
            result[f"rl_step_seconds_{name}"] = next(r["step_s"] for r in c["vs_T"] if r["T"] == THOUGHTS)
            result[f"rl_step_seconds_per_latent_step_{name}"] = c["seconds_per_latent_step"]
            result[f"rl_step_group_size_exponent_{name}"] = c["group_size_exponent"]
        result["items"]["4"] = curves
        save()

    if "5" in args.items or "6" in args.items:
        import bench_memory       # items 5 and 6 live there; it imports this module's helpers

    if "5" in args.items:
        rows = [bench_memory.bench_memory(name, s, device, params[s]["mem_prompts"], params[s]["mem_generations"], A)
                for s in args.sizes for name in ALGOS]
        print_table(f"5. peak memory of one RL step ({THOUGHTS} latent steps + {A} answer tokens)", rows,
                    [("algo", "algo", ""), ("size", "size", ""), ("rows", "rows", "d"),
                     ("resident MiB", "resident_mb", ".1f"), ("step peak MiB", "step_peak_mb", ".1f"),
                     ("total MiB", "total_peak_mb", ".1f")])
        print(f"   resident = weights + gradients + AdamW state; step peak = the most allocated above that during "
              f"the step, measured by {rows[0]['method']}")
        for r in rows:
            suffix = "" if r["size"] == "tiny" else "_" + r["size"].replace("-", "_")
            result[f"peak_memory_mb_{r['algo']}{suffix}"] = r["total_peak_mb"]
        # per row, at the real vocabulary when it is among the sizes (the headline keys), else at the first size
        size = "llama-49k" if "llama-49k" in args.sizes else args.sizes[0]
        per_row = [bench_memory.per_row(name, size, device, THOUGHTS, A) for name in ALGOS]
        print_table(f"5b. peak per row ({size}, 1 prompt x 8 and 16 rows, {THOUGHTS} latent steps + {A} answer "
                    f"tokens): peak = fixed + rows x per row, above the resident state", per_row,
                    [("algo", "algo", ""), ("positions", "positions", "d"), ("resident MiB", "resident_mb", ".1f"),
                     ("rollout MiB/row", "rollout_per_row_mb", ".1f"), ("rollout fixed", "rollout_fixed_mb", ".1f"),
                     ("update MiB/row", "update_per_row_mb", ".1f"), ("update fixed", "update_fixed_mb", ".1f")])
        suffix = "" if size == "llama-49k" else "_" + size.replace("-", "_")
        for r in per_row:
            result[f"peak_memory_mb_per_row_{r['algo']}{suffix}"] = r["update_per_row_mb"]
            result[f"peak_memory_mb_per_row_rollout_{r['algo']}{suffix}"] = r["rollout_per_row_mb"]
        result["items"]["5"] = {"steps": rows, "per_row": per_row}
        save()

    if "6" in args.items:
        rows = [bench_memory.preset_micro_batches(name, device) for name in bench_memory.PRESET_SHAPES]
        print_table("6. each preset at its model's shape (random weights, float32): per-row peak -> the largest "
                    "--micro-batch-size whose update fits", rows,
                    [("preset", "preset", ""), ("positions", "positions", "d"), ("resident MiB", "resident_mb", ".0f"),
                     ("update MiB/row", "update_per_row_mb", ".0f"), ("update fixed MiB", "update_fixed_mb", ".0f"),
                     ("rollout GB (all rows)", "rollout_peak_gb", ".1f"), ("24 GB", "micro_batch_24gb", "d"),
                     ("80 GB", "micro_batch_80gb", "d")])
        for r in rows:
            print(f"   {r['preset']}: measured on {r['measured']}; {r['prompt_tokens']} prompt tokens")
            key = r["preset"].replace("-", "_")
            result[f"micro_batch_24gb_{key}"], result[f"micro_batch_80gb_{key}"] = (r["micro_batch_24gb"],
                                                                                    r["micro_batch_80gb"])
        result["items"]["6"] = rows
        save()

    if "gpu" in args.items:
        if device.type != "cuda":
            print("\n== gpu: skipped (no CUDA device): the memory-bandwidth floor needs a GPU")
            result["items"]["gpu"] = {"skipped": "no CUDA device"}
        else:
            gpu = bench_bandwidth(device, args.repeats)
            print_table(f"gpu. decode step vs the memory-bandwidth floor (bf16, random weights; measured copy "
                        f"bandwidth {gpu['peak_bandwidth_gb_s']:.0f} GB/s)", gpu["rows"],
                        [("model", "model", ""), ("batch", "batch", "d"), ("context", "context", "d"),
                         ("step ms", "step_ms", ".3f"), ("floor ms", "floor_ms", ".3f"),
                         ("MiB read", "bytes_read_mb", ".0f"), ("fraction", "fraction_of_floor", ".2f")])
            print("   floor = (weights + KV cache bytes) / copy bandwidth; fraction = floor / measured step time")
            result["items"]["gpu"] = gpu
            for r in gpu["rows"]:
                result[f"bandwidth_fraction_{r['model'].replace('-', '_')}_batch{r['batch']}"] = r["fraction_of_floor"]
        save()
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
