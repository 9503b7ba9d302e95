"""
Benchmark: what one latent step costs against one ordinary token-decode step of the same model and batch.

    python bench.py                         # the embedded tiny model and a GPT-2-124M-sized model, random weights
    python bench.py --sizes tiny --batch 128 --out bench.json

Each row times one batched decode position with a warm KV cache (context `--context` tokens), three ways:
  token            model(input_ids=y) + sampling the next token (temperature, top-k, top-p)
  coconut latent   model(inputs_embeds=h), h = the last hidden state of the previous step (Dropout-GRPO's thought)
  soft latent      Gumbel noise + nucleus/top-K + softmax weights + the soft embedding, then model(inputs_embeds=e)
                   (Latent-GRPO's rollout step, latent_grpo.latent_step / soft_embedding)
and prints the ratios latent / token. The target is about 1: a latent step is one forward like a token step.
Random weights give a flat next-token law, the worst case for the soft step's candidate sort; a trained model's law is
peaked and its soft step is cheaper. Timings are medians over `--repeats` steps after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import latent_grpo

SIZES = {  # name: (layers, width, heads, vocabulary)
    "tiny": (4, 64, 4, 371),
    "gpt2-124m": (12, 768, 12, 50257),
}


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(name: str, batch: int, context: int, repeats: int, device: torch.device) -> dict:
    layers, width, heads, vocab = SIZES[name]
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=context + 16,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(device).eval()
    E = model.get_input_embeddings().weight
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(vocab, (batch, context), device=device)

    def prefill():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
        return cache, out.logits[:, -1].float(), out.hidden_states[-1][:, -1]

    with torch.no_grad():
        cache, z, h = prefill()
        state = {"t": context, "z": z, "h": h, "cache": cache}

        def step(**inputs):
            pos = torch.full((batch, 1), state["t"], device=device)
            out = model(**inputs, position_ids=pos, past_key_values=state["cache"], use_cache=True,
                        output_hidden_states="inputs_embeds" in inputs)
            state["cache"].crop(-1)  # drop the new position: every repeat sees the same context
            return out

        def token_step():
            y = latent_grpo.sample_token(state["z"], 0.6, 0.95, 30, generator)
            step(input_ids=y[:, None])

        def coconut_step():
            out = step(inputs_embeds=state["h"][:, None])
            state["h"] = out.hidden_states[-1][:, -1]

        def soft_step():
            noise = latent_grpo.gumbel_noise(state["z"].shape, True, 1.0, generator)
            ids_k, _, w = latent_grpo.latent_step(state["z"], noise, 10, 0.95, 1.0)
            step(inputs_embeds=latent_grpo.soft_embedding(E, ids_k, w)[:, None])

        token = timed(token_step, repeats, device)
        coconut = timed(coconut_step, repeats, device)
        soft = timed(soft_step, repeats, device)
    return {"size": name, "batch": batch, "context": context, "token_ms": 1e3 * token, "coconut_latent_ms": 1e3 * coconut,
            "soft_latent_ms": 1e3 * soft, "coconut_latent_over_token": coconut / token,
            "soft_latent_over_token": soft / token}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--sizes", default="tiny,gpt2-124m", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--batch", type=int, default=128, help="rows decoded together (num_prompts x num_generations)")
    parser.add_argument("--context", type=int, default=64, help="tokens already in the KV cache")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench_size(s, args.batch, args.context, args.repeats, device) for s in args.sizes.split(",")]
    print(f"device {device}, torch {torch.__version__}, batch {args.batch}, context {args.context}")
    print(f"{'size':<10} {'token ms':>9} {'coconut ms':>11} {'soft ms':>8} {'coconut/token':>14} {'soft/token':>11}")
    for r in rows:
        print(f"{r['size']:<10} {r['token_ms']:>9.2f} {r['coconut_latent_ms']:>11.2f} {r['soft_latent_ms']:>8.2f} "
              f"{r['coconut_latent_over_token']:>14.2f} {r['soft_latent_over_token']:>11.2f}")
    with open(args.out, "w") as f:
        json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
