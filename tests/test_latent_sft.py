"""Property tests for latent_sft.py: the spec's section 6.4 (specs/latent_sft.md) against independent references
(the spec's drawn matrices, plain loops over the segment rules, a dense KL, finite differences, a plain causal
forward, the KV-cache rollout of latent_grpo.py)."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import data
import latent_grpo as lg
import latent_sft as ls
import train
from latent_grpo import Config, LatentGRPO

torch.set_num_threads(1)
FAST = settings(deadline=None, max_examples=25)
SEEDS = st.integers(0, 2**16)

# spec 3: Q = (Q1, Q2), <t>, CoT s1..s5, c = 2, </t>, A1 A2 (answer_len 3: </t> A1 A2)
INDUCTION = """
1 . . . . . . . . . . .
1 1 . . . . . . . . . .
1 1 1 . . . . . . . . .
1 1 1 1 . . . . . . . .
1 1 1 1 1 . . . . . . .
1 1 1 1 1 1 . . . . . .
1 1 1 1 1 . 1 . . . . .
1 1 1 1 1 . 1 1 . . . .
1 1 1 1 1 . 1 1 1 . . .
1 1 1 1 1 . 1 1 . 1 . .
1 1 1 1 1 . 1 1 . 1 1 .
1 1 1 1 1 . 1 1 . 1 . 1"""
SUPERVISION = """
1 . . . . . . . . . . .
1 1 . . . . . . . . . .
1 1 1 . . . . . . . . .
1 1 1 1 . . . . . . . .
. . . 1 1 . . . . . . .
. . . 1 1 1 . . . . . .
1 1 1 1 . . 1 . . . . .
. . . . . . 1 1 . . . .
1 1 1 1 . . 1 . 1 . . .
1 1 1 1 . . 1 . 1 1 . .
1 1 1 1 . . 1 . 1 1 1 .
1 1 1 1 . . 1 . 1 1 1 1"""


def matrix(text):
    return torch.tensor([[c == "1" for c in line.split()] for line in text.strip().splitlines()])


@pytest.fixture(scope="module")
def tok():
    t = data.build_tokenizer()
    t.add_tokens([lg.THINK, lg.END_THINK], special_tokens=True)
    return t


def tiny(kind, vocab, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=256,
                                           attn_implementation="eager", **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=32, max_position_embeddings=256,
                                             attn_implementation="sdpa", **common))
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------------
# chunking, masks, positions (6.4.1-3)
# ---------------------------------------------------------------------------------------------------------------

def test_masks_reproduce_the_spec_matrices():
    assert torch.equal(ls.induction_mask(3, 5, 2), matrix(INDUCTION))
    assert torch.equal(ls.supervision_mask(3, 5, 2, 3), matrix(SUPERVISION))
    assert ls.dual_track_positions(3, 5, 2, 3).tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 5, 6, 7, 8]


@pytest.mark.parametrize("c", [1, 2, 3])
def test_chunking(c):
    """6.4.1: ceil(L/c) compress tokens = decoder latent slots; the first slot is followed by tokens c+1..2c."""
    P, fin = [7, 8], [90, 91]
    algo = ls.LatentSFT(c, 1, end_id=99, eos_id=91, pad_id=0, noise_scale=0, gumbel_temperature=1)
    for L in sorted({1, max(1, c - 1), c, c + 1, 5 * c}):
        cot = list(range(10, 10 + L))
        b = algo.batch([P], [cot], [fin], torch.float32)
        assert int(b["enc_compress"].sum()) == int(b["dec_latent"].sum()) == math.ceil(L / c)
        second = cot[c:2 * c]
        assert b["dec_ids"][0, len(P) + 1:len(P) + 1 + len(second)].tolist() == second
        assert b["enc_ids"][0].tolist()[:len(P)] == P and b["enc_ids"][0, -1] == 99


def reference_supervision(P, L, c, A):
    """The segment rules of spec 3, written as a loop over (query, key) pairs."""
    kinds = ["I"] * P
    sizes = [min(c, L - j * c) for j in range(math.ceil(L / c))]
    group = [-1] * P
    for j in range(len(sizes)):
        kinds.append("Z"), group.append(j)
        if j + 1 < len(sizes):
            kinds += ["S"] * sizes[j + 1]
            group += [j] * sizes[j + 1]
    kinds += ["F"] * A
    group += [-1] * A
    S = len(kinds)
    M = torch.zeros(S, S, dtype=torch.bool)
    for i in range(S):
        for k in range(i + 1):
            q, key = kinds[i], kinds[k]
            M[i, k] = {"I": key == "I", "Z": key in "IZ", "F": key in "IZF",
                       "S": group[k] == group[i] and key in "SZ"}[q]
    return M, kinds


@FAST
@given(P=st.integers(1, 6), L=st.integers(1, 12), c=st.integers(1, 4), A=st.integers(1, 4))
def test_mask_rules_on_random_lengths(P, L, c, A):
    """6.4.2: encoder mask within causal, diagonal set, no row sees an earlier L, CoT tokens see Q and never an L;
    decoder mask = the segment rules; spacers never see Q; dual-track latents consecutive from P."""
    enc = ls.induction_mask(P, L, c)
    S = P + L + math.ceil(L / c) + 1
    assert enc.shape == (S, S) and not (enc & ~torch.ones(S, S, dtype=torch.bool).tril()).any()
    assert enc.diagonal().all()
    is_L = torch.zeros(S, dtype=torch.bool)
    pos = P
    for size in ls.chunk_sizes(L, c):
        pos += size
        is_L[pos] = True
        pos += 1
    for i in range(S):
        for k in range(i):
            if is_L[k]:
                assert not enc[i, k]
        if i >= P and not is_L[i]:
            assert enc[i, :P].all()
    dec, kinds = reference_supervision(P, L, c, A)
    assert torch.equal(ls.supervision_mask(P, L, c, A), dec)
    assert dec.diagonal().all()
    spacers = [i for i, k in enumerate(kinds) if k == "S"]
    assert not dec[spacers][:, :P].any()
    positions = ls.dual_track_positions(P, L, c, A)
    latents = [i for i, k in enumerate(kinds) if k == "Z"]
    assert positions[latents].tolist() == list(range(P, P + len(latents)))
    assert positions[-A:].tolist() == list(range(P + len(latents), P + len(latents) + A))
    for i in spacers:
        assert positions[i] == positions[i - 1] + 1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_custom_4d_mask_reaches_attention(kind):
    """A key the mask hides cannot change the output (spec 6.2: the 4-D mask must reach attention)."""
    model = tiny(kind, 40, 0, torch.float32)
    with torch.no_grad():   # dense random weights: a fresh init zeroes some projections, and mixing would not show
        for p in model.parameters():
            p.normal_(0, 0.5)
    mask = ls.supervision_mask(3, 5, 2, 3)
    add = ls._additive([mask], 12, torch.float32)
    x = torch.randn(1, 12, 16)
    pos = ls.dual_track_positions(3, 5, 2, 3)[None]
    out = model(inputs_embeds=x, attention_mask=add, position_ids=pos).logits
    x2 = x.clone()
    x2[0, 4] += 3.0                          # s3: hidden from the final segment and from every latent
    out2 = model(inputs_embeds=x2, attention_mask=add, position_ids=pos).logits
    hidden_from = [i for i in range(12) if not mask[i, 4]]
    torch.testing.assert_close(out[0, hidden_from], out2[0, hidden_from])
    assert not torch.allclose(out[0, 5], out2[0, 5])   # s4 does see s3


# ---------------------------------------------------------------------------------------------------------------
# latents (6.4.4), gradient routing (6.4.5), reduction to CoT SFT (6.4.6)
# ---------------------------------------------------------------------------------------------------------------

@FAST
@given(seed=SEEDS, n=st.integers(1, 5), V=st.integers(3, 30), K=st.integers(1, 3), d=st.integers(1, 8))
def test_convex_hull(seed, n, V, K, d):
    g = torch.Generator().manual_seed(seed)
    h, E = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(V, d, generator=g, dtype=torch.float64)
    ids, w, Z = ls.latents(h, E, K)
    assert (w >= 0).all() and ids.shape == (n, K) and len(set(ids[0].tolist())) == K
    torch.testing.assert_close(w.sum(-1), torch.ones(n, dtype=w.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(Z, torch.einsum("nk,nkd->nd", w.double(), E[ids]))
    assert (Z >= E[ids].amin(1) - 1e-9).all() and (Z <= E[ids].amax(1) + 1e-9).all()
    assert torch.equal(ids[:, 0], (h @ E.T).argmax(-1))
    if K == 1:
        torch.testing.assert_close(Z, E[(h @ E.T).argmax(-1)])


def sft_algo(tok, kind="gpt2", c=2, K=3, seed=0, noise=1.0):
    model = tiny(kind, len(tok), seed, torch.float32)
    algo = LatentGRPO(model, tok, Config(c_latent=c, top_k=K, sft_noise_scale=noise), add_tokens=False)
    return model, algo


def total(loss):
    """The SFT loss: one mean, or the sum of stage 2's named terms (CE over tokens, KL over examples)."""
    return sum(loss.values()) if isinstance(loss, dict) else loss


def grads(params):
    return [p.grad for p in params]


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_gradient_routing(tok, stage):
    """6.4.5: 1a trains the encoder (compress row included) and not the decoder, 1b the reverse, 1c both, stage 2
    the decoder alone; the decoder's input embeddings never get a gradient (not through the mix either)."""
    model, algo = sft_algo(tok)
    model.train()
    params = algo.sft_parameters(model, stage)
    algo.stage = stage
    total(algo.sft_loss(model, algo.sft_batch(data.synthetic_task(3, 0), stage))).backward()
    encoder = list(algo.sft.encoder.parameters())
    decoder = [p for n, p in model.named_parameters() if "wte" not in n]
    E = model.get_input_embeddings().weight
    trains_encoder, trains_decoder = stage in (1, 3), stage in (2, 3, 4)
    assert all((g is not None and g.abs().sum() > 0) == trains_encoder for g in grads([algo.sft.encoder.compress]))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(encoder)) == trains_encoder
    assert any(g is not None and g.abs().sum() > 0 for g in grads(decoder)) == trains_decoder
    assert E.grad is None and not E.requires_grad
    assert {id(p) for p in params} == {id(p) for p in (encoder if trains_encoder else []) + (decoder if trains_decoder else [])}


def test_reduction_to_cot_sft(tok):
    """6.4.6: c = 1, K = 1, oracle latents Z_j = E[t_j]: the decoder logits at Z_j are the causal model's on
    Q t_1..t_j, and the stage-1 loss is the CoT-SFT loss without the first CoT token's term."""
    model, algo = sft_algo(tok, c=1, K=1)
    model = model.double()
    ex = data.synthetic_task(1, 3)
    b = algo.sft_batch(ex, 1)
    P = tok(algo.prompt_text(ex[0]["question"]), add_special_tokens=False).input_ids
    cot = tok("".join(s + "\n" for s in ex[0]["steps"]), add_special_tokens=False).input_ids
    fin = algo.final_ids(ex[0]["answer"])
    E = model.get_input_embeddings().weight
    b["dec_mask"] = b["dec_mask"].double()
    logits = algo.sft.decoder_logits(model, b, E[torch.tensor(cot)])[0]
    plain = model(input_ids=torch.tensor([P + cot + fin])).logits[0]
    slots = b["dec_latent"][0].nonzero()[:, 0]
    torch.testing.assert_close(logits[slots], plain[len(P):len(P) + len(cot)])
    final = torch.arange(len(b["dec_ids"][0]) - len(fin), len(b["dec_ids"][0]))
    torch.testing.assert_close(logits[final], plain[len(P) + len(cot):])
    seq = torch.tensor(P + cot + fin)
    terms = torch.nn.functional.cross_entropy(plain[:-1], seq[1:], reduction="none")[len(P):]   # t_2 .. EOS
    labels = b["dec_labels"][0, 1:]
    ours = torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ours, terms.sum())


# ---------------------------------------------------------------------------------------------------------------
# top-K KL (6.4.7), Gumbel (6.4.8)
# ---------------------------------------------------------------------------------------------------------------

@FAST
@given(seed=SEEDS, V=st.integers(2, 20), K=st.integers(1, 5))
def test_topk_kl_is_dense_kl(seed, V, K):
    K = min(K, V)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(3)])
    raw = torch.rand(3, K, generator=g, dtype=torch.float64) + 0.1
    q = torch.zeros(3, V, dtype=torch.float64).scatter(-1, ids, raw / raw.sum(-1, keepdim=True))
    dense = (torch.special.xlogy(q, q) - q * z.log_softmax(-1)).sum(-1)
    kl = ls.topk_kl(z, raw, ids)
    torch.testing.assert_close(kl, dense)
    assert (kl >= -1e-12).all()
    assert torch.autograd.gradcheck(lambda x: ls.topk_kl(x, raw, ids), (z,))
    # on-support logits log q + const, off-support -> -inf: KL -> 0
    target = torch.full((3, V), -1e4, dtype=torch.float64).scatter(-1, ids, (raw / raw.sum(-1, keepdim=True)).log() + 2)
    assert ls.topk_kl(target, raw, ids).abs().max() < 1e-9


@FAST
@given(seed=SEEDS, m=st.integers(1, 6), K=st.integers(2, 5), s=st.floats(0.1, 3))
def test_gumbel_augmentation(seed, m, K, s):
    """6.4.8: scale 0 gives q back; otherwise rows sum to 1 and the scaled noise lies in [-1.5, 3]; the guard keeps
    </think> from being any slot's top-1; two draws differ."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(m, K, generator=g, dtype=torch.float64).softmax(-1)
    torch.testing.assert_close(ls.gumbel_augment(q, 0.0, 1.0, g), q, atol=1e-8, rtol=0)
    p = ls.gumbel_augment(q, s, 1.0, g)
    torch.testing.assert_close(p.sum(-1), torch.ones(m, dtype=p.dtype))
    noise = (p.log() - torch.log(q + 1e-10))
    noise = noise - noise.mean(-1, keepdim=True)   # softmax removes a row constant: spread is bounded by 4.5
    assert (noise.amax(-1) - noise.amin(-1) <= 4.5 + 1e-6).all()
    assert not torch.equal(p, ls.gumbel_augment(q, s, 1.0, g))
    ids = torch.stack([torch.randperm(10, generator=g)[:K] for _ in range(m)])
    ids[:, 1] = 99 if K > 1 else ids[:, 1]                            # </think> is on every slot's support
    guarded = ls.augment_with_guard(q, ids, 99, s, 1.0, generator=g)
    top = ids.gather(-1, guarded.argmax(-1, keepdim=True))
    assert not (top == 99).any() or torch.equal(guarded, q)


def test_gumbel_clamp():
    """The clamp: a huge scale saturates every log-weight shift at -1.5 or 3."""
    q = torch.full((1000, 2), 0.5, dtype=torch.float64)
    p = ls.gumbel_augment(q, 1e6, 1.0, torch.Generator().manual_seed(0))
    diff = (p[:, 0] / p[:, 1]).log()
    assert diff.abs().max() <= 4.5 + 1e-9 and (diff.abs() > 4.4).float().mean() > 0.3


# ---------------------------------------------------------------------------------------------------------------
# inference = Latent-GRPO's latent policy (6.4.9, 6.4.10), smoke learning (6.4.11), the pipeline
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_kv_cache_loop_equals_full_forward(tok, kind):
    """6.4.9: the KV-cache latent loop (LatentGRPO.generate, deterministic) against one full forward over
    Q <think> Z_1..Z_n (the stage-2 layout): the same top-K ids and weights at each step, and the stop step is the
    first whose argmax is </think>."""
    model, algo = sft_algo(tok, kind)
    model = model.double()
    W = model.get_output_embeddings().weight
    with torch.no_grad():
        W[algo.end_id] *= 0
        W[algo.end_id] += 3 * torch.randn(W.shape[1], dtype=W.dtype) / W.shape[1] ** 0.5
    ro = algo.generate(model, [ex["question"] for ex in data.synthetic_task(4, 1)], explore=False,
                       generator=torch.Generator().manual_seed(0))
    E = model.get_input_embeddings().weight
    for i in range(4):
        n = int(ro.num_latent[i])
        w = ro.topk_scores[i].softmax(-1)
        x = torch.cat([E[ro.prompt_ids[i]], lg.soft_embedding(E, ro.topk_ids[i], w)])
        logits = model(inputs_embeds=x[None]).logits[0, len(ro.prompt_ids[i]) - 1:]       # (n + 1, V)
        top, ids = logits.log_softmax(-1).topk(algo.cfg.top_k, -1)
        assert torch.equal(ids[:n], ro.topk_ids[i])
        torch.testing.assert_close(top[:n], ro.topk_scores[i], atol=1e-4, rtol=0)
        assert (logits[:n].argmax(-1) != algo.end_id).all()
        if n < int(ro.lengths[i]):
            assert logits[n].argmax(-1) == algo.end_id and ro.token_ids[i][n] == algo.end_id


def test_stop_rule(tok, monkeypatch):
    """6.4.10: a model whose argmax becomes </think> at step n yields exactly n latents; the cap holds."""
    model, algo = sft_algo(tok)
    calls = {"t": 0}
    real = model.forward

    def forward(*a, **k):
        out = real(*a, **k)
        t = calls["t"]
        calls["t"] += 1
        out.logits[..., :] = 0.0
        out.logits[..., 5 + t % 3] = 5.0
        if t == n:                                   # call 0 is the prefill: it scores generated position 0
            out.logits[..., algo.end_id] = 10.0
        if t > n:
            out.logits[..., algo.eos_id] = 10.0
        return out

    for n in (0, 1, 4):
        calls["t"] = 0
        monkeypatch.setattr(model, "forward", forward)
        ro = algo.generate(model, ["q"], explore=False, generator=torch.Generator().manual_seed(0))
        assert int(ro.num_latent[0]) == n and ro.token_ids[0][n] == algo.end_id


def test_losses_fall(tok):
    """6.4.11: on a small set each stage's loss falls (a few steps at a high learning rate, fixed batch)."""
    model, algo = sft_algo(tok, noise=0.0)
    batch_examples = data.synthetic_task(8, 0)
    for stage in (1, 2, 3, 4):
        model.train()
        params = algo.sft_parameters(model, stage)
        algo.stage = stage
        opt = torch.optim.Adam(params, lr=3e-3)
        b = algo.sft_batch(batch_examples, stage)
        losses = []
        for _ in range(12):
            opt.zero_grad()
            loss = total(algo.sft_loss(model, b))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (stage, losses)


def test_pipeline_runs_every_stage(tmp_path):
    """train.main: CoT SFT -> 1a -> 1b -> 1c -> 2 -> eval -> GRPO -> eval; each stage logs losses; RUN/init is a
    plain HF checkpoint; summary.json has the CoT chain lengths."""
    import json

    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    summary = train.main(["--algo", "latent_grpo", "--out", str(out), "--n-layer", "1", "--n-embd", "16",
                          "--n-head", "2", "--cot-steps", "2", "--sft-steps", "1", "--latent-sft-steps-2", "2",
                          "--sft-batch-size", "4", "--max-steps", "1", "--num-prompts", "2", "--num-generations", "2",
                          "--eval-size", "4", "--max-response-length", "12"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {}
    for r in records:
        if r["phase"] == "sft":
            steps.setdefault(r["stage"], []).append(r["step"])
    assert steps == {0: [0, 1], 1: [0], 2: [0], 3: [0], 4: [0, 1]}
    assert {"cot_accuracy", "cot_chain_length", "cot_length"} <= set(summary)
    assert AutoModelForCausalLM.from_pretrained(out / "init") is not None
