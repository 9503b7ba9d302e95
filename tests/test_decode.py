"""decode.py: the decoding plumbing both algorithms share. Padding; the static KV cache of the compiled step against a
DynamicCache and a cache-free forward; the selective log-softmax against the full-vocabulary formulas it replaces, in
float64, values and gradients (both algorithms' densities, FlipGrad, the Latent-SFT losses)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import decode
import latent_grpo as lg
import latent_sft as ls
from compat import cache_arg


def tiny_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=vocab, n_positions=256, initializer_range=0.3,
                        attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pads():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    ids, mask = decode.left_pad(seqs, 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, valid = decode.right_pad(seqs, 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and valid.tolist() == [[True] * 3, [True, False, False]]
    assert decode.wide(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert decode.wide(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


def test_static_cache_matches_dynamic_cache():
    """The compiled step's cache, run eagerly: prefill 2 left-padded prompts into a DynamicCache, expand each over 3
    rows into a StaticCache (full-width mask), step 4 positions; the logits equal those of the DynamicCache path, also
    when the StaticCache is an earlier one reused, and those of a cache-free forward."""
    model = tiny_gpt2(50)
    prompts = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11])]
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]])
    attn = (torch.arange(5) >= torch.tensor([[0], [3]])).long()                     # (2, 5), left padding
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    steps = torch.randn(4, 6, 1, 16, generator=gen(0), dtype=torch.float64)      # 4 input embeddings per row
    logits, spare = {}, None
    with torch.no_grad():
        for kind in ("dynamic", "static", "reused"):
            cache = DynamicCache()
            model(input_ids=ids, attention_mask=attn, position_ids=pos, **cache_arg(model, cache), use_cache=True)
            mask, position = attn[rows], pos[rows, -1:]
            if kind == "dynamic":
                cache.reorder_cache(rows)
            else:
                cache, mask = decode.static_cache(cache, rows, mask, len(steps), model.config, spare)
                assert mask.shape[1] == 64 and (cache is spare) == (kind == "reused")
                spare = cache
            out = []
            for x in steps:
                position = position + 1
                if kind == "dynamic":
                    mask = torch.cat([mask, mask.new_ones(6, 1)], 1)
                out.append(decode.step(model, cache, mask, inputs_embeds=x, position_ids=position)[1])
            logits[kind] = torch.cat(out, 1)                                      # (6, 4, V)
    torch.testing.assert_close(logits["static"], logits["dynamic"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits["reused"], logits["static"], rtol=0, atol=0)
    # and both equal one cache-free forward over each row's prompt and inputs
    for r in range(6):
        p = prompts[int(rows[r])]
        x = torch.cat([model.get_input_embeddings().weight[p], steps[:, r, 0]])[None]
        with torch.no_grad():
            ref = model(inputs_embeds=x).logits[0, len(p):]
        torch.testing.assert_close(logits["static"][r], ref, rtol=1e-10, atol=1e-12)


# ---- selective log-softmax: today's full-vocabulary formulas are the reference, in float64 ----

def full_log_softmax(logits, ids, temperature=1.0):
    """The formula selective_log_softmax replaces: a (..., V) log-softmax, then a gather."""
    return (decode.wide(logits) / temperature).log_softmax(-1).gather(-1, ids)


def values_and_grads(fn, logits, *args):
    z = logits.clone().requires_grad_()
    out = fn(z, *args)
    weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)   # a generic upstream gradient
    (grad,) = torch.autograd.grad((out * weights).sum(), z)
    return out.detach(), grad


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), V=st.integers(1, 40), J=st.integers(1, 5), chunk=st.integers(1, 10),
       T=st.sampled_from([1.0, 0.6, 1.7]), seed=st.integers(0, 2**16))
def test_selective_log_softmax_equals_log_softmax_then_gather(rows, V, J, chunk, T, seed):
    g = gen(seed)
    logits = 4 * torch.randn(rows, 3, V, generator=g, dtype=torch.float64)
    ids = torch.randint(V, (rows, 3, J), generator=g)                    # repeated ids included
    out, grad = values_and_grads(lambda z: decode.selective_log_softmax(z, ids, T, chunk), logits)
    ref, ref_grad = values_and_grads(lambda z: full_log_softmax(z, ids, T), logits)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 9), V=st.integers(1, 40), J=st.integers(1, 5), chunk=st.integers(1, 10),
       seed=st.integers(0, 2**16))
def test_selective_log_softmax_with_a_temperature_per_row(rows, V, J, chunk, seed):
    """A (rows, 3) tensor of temperatures: each row as the full formula at its own temperature."""
    g = gen(seed)
    logits = 4 * torch.randn(rows, 3, V, generator=g, dtype=torch.float64)
    ids = torch.randint(V, (rows, 3, J), generator=g)
    T = torch.tensor([1.0, 0.6, 1.7], dtype=torch.float64)[torch.randint(3, (rows, 3), generator=g)]
    out, grad = values_and_grads(lambda z: decode.selective_log_softmax(z, ids, T, chunk), logits)
    ref, ref_grad = values_and_grads(lambda z: (z / T[..., None]).log_softmax(-1).gather(-1, ids), logits)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_selective_log_softmax_widens_and_keeps_the_gradient_dtype():
    logits = torch.randn(6, 50, generator=gen(0)).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(50, (6, 2), generator=gen(1))
    out = decode.selective_log_softmax(logits, ids, 0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full_log_softmax(logits.detach(), ids, 0.7), rtol=0, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_selective_log_softmax_saves_no_vocabulary_sized_copy():
    """What autograd keeps for the backward: the logits themselves (alive anyway) and (rows,)-sized tensors. The
    full formula keeps a (rows, V) float32 log-softmax besides."""
    rows, V = 64, 1000
    logits = torch.randn(rows, V, generator=gen(0), dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(V, (rows, 1), generator=gen(1))

    def saved_bytes(fn):
        sizes = []

        def pack(t):
            if t.data_ptr() != logits.data_ptr():                         # the input itself costs nothing new
                sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits, ids)
        return sum(sizes)

    assert saved_bytes(decode.selective_log_softmax) <= rows * 8 * 2
    assert saved_bytes(full_log_softmax) >= rows * V * 4


@pytest.mark.parametrize("flip", [False, True])
def test_latent_grpo_densities_equal_the_full_formulas(flip):
    """token_logprob, latent_logprob (FlipGrad on and off) and the Latent-SFT top-K KL against
    the formulas they had before, log_softmax over the vocabulary then gather: values and gradients, float64."""
    g = gen(3)
    n, V, K = 11, 37, 4
    logits = 3 * torch.randn(n, V, generator=g, dtype=torch.float64)
    ids = torch.randint(V, (n,), generator=g)
    topk_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    scores = torch.randn(n, K, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    A = torch.randn(n, generator=g, dtype=torch.float64) if flip else None

    def old_latent(z):
        x = scores - z.log_softmax(-1).gather(-1, topk_ids)
        phi = -x - torch.exp(-x)
        if A is not None:
            f = (A[:, None] <= 0) & (x < 0)
            proxy = torch.where(f, x - torch.exp(x), phi)
            phi = phi.detach() + (proxy - proxy.detach())
        return phi.mean(-1)

    q = torch.rand(n, K, generator=g, dtype=torch.float64)
    pairs = [
        (lambda z: lg.token_logprob(z, ids, 0.6), lambda z: full_log_softmax(z, ids[:, None], 0.6)[:, 0]),
        (lambda z: lg.latent_logprob(z, topk_ids, scores, A), old_latent),
        (lambda z: ls.topk_kl(z, q, topk_ids),
         lambda z: (torch.special.xlogy(q / q.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True))
                    - q / q.sum(-1, keepdim=True) * full_log_softmax(z, topk_ids)).sum(-1)),
    ]
    for new, old in pairs:
        out, grad = values_and_grads(new, logits)
        ref, ref_grad = values_and_grads(old, logits)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
