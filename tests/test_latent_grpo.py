"""Property tests for latent_grpo.py: the spec's claims T1-T14 (section 11) against independent references
(plain loops, enumeration, finite differences, a cache-free forward, Monte Carlo with stated error bounds)."""
import copy
import dataclasses
import itertools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import data
import latent_grpo as lg
from latent_grpo import (
    Config, LatentGRPO, Rollout, _top_k_in_nucleus, first_token_selection, group_advantages, gumbel_noise,
    latent_logprob, latent_step, sample_token, soft_embedding, token_logprob,
)

torch.set_num_threads(1)   # tiny models: extra threads only contend on a shared machine
FAST = settings(deadline=None, max_examples=25)
MODEL = settings(deadline=None, max_examples=6)
KINDS = st.sampled_from(["gpt2", "llama"])
SEEDS = st.integers(0, 2**16)


# ---------------------------------------------------------------------------------------------------------------
# fixtures and references
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_tok():
    return data.build_tokenizer()


@pytest.fixture(scope="module")
def tok(raw_tok):
    t = copy.deepcopy(raw_tok)
    t.add_tokens([lg.THINK, lg.END_THINK], special_tokens=True)
    return t


def tiny_model(kind, tok, seed, boost=1.0):
    """float64 tiny GPT-2 / Llama over tok's vocabulary. The </think> and EOS output rows get a fixed norm so that a
    random model exits latent mode and stops now and then (the behaviours under test need both)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=256,
                                           attn_implementation="eager", **common))
    else:   # eager Llama in float64 turns fully masked (left-pad) rows into NaN (float32 softmax of float64 min)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=32, max_position_embeddings=256,
                                             pad_token_id=0, attn_implementation="sdpa", **common))
    model = model.double().eval()
    W = model.get_output_embeddings().weight
    with torch.no_grad():
        for token in (lg.END_THINK, tok.eos_token):
            if token in tok.get_vocab():
                u = torch.randn(W.shape[1], dtype=W.dtype)
                W[tok.convert_tokens_to_ids(token)] = boost * u / u.norm()
    return model


def questions(seed, n=3):
    return [r["question"] for r in data.synthetic_task(n, seed)]


def phi(x):
    return -x - math.exp(-x)


def ref_latent_step(z, noise, K, top_p, tau):
    """Spec 3.1 steps 1-5 for one row, with Python lists."""
    z, noise = z.tolist(), noise.tolist()
    lse = max(z) + math.log(sum(math.exp(v - max(z)) for v in z))
    logp = [v - lse for v in z]
    order = sorted(range(len(z)), key=lambda v: -logp[v])
    M, mass = set(), 0.0
    for rank, v in enumerate(order):
        if mass < top_p or rank < K:
            M.add(v)
        mass += math.exp(logp[v])
    scored = sorted(((logp[v] + noise[v], v) for v in M), reverse=True)[:K]
    g = [s for s, _ in scored]
    w = [math.exp(s / tau) for s in g]
    return [v for _, v in scored], g, [x / sum(w) for x in w]


def ref_inputs(model, rollout, i, tau=1.0):
    """Row i's input embeddings (prompt + response), built with a loop from the stored ids and scores."""
    E = model.get_input_embeddings().weight.detach()
    rows = [E[t] for t in rollout.prompt_ids[i]]
    for t, y in enumerate(rollout.token_ids[i]):
        if t < rollout.num_latent[i]:
            g = rollout.topk_scores[i][t].tolist()
            w = [math.exp(s / tau) for s in g]
            rows.append(sum(wk / sum(w) * E[v] for wk, v in zip(w, rollout.topk_ids[i][t].tolist())))
        else:
            rows.append(E[y])
    return torch.stack(rows)


def cache_free_logits(model, rollout, i):
    """Logits scoring each response step of row i, from one forward without cache or padding: (L_i, V)."""
    x = ref_inputs(model, rollout, i)
    P = len(rollout.prompt_ids[i])
    with torch.no_grad():
        return model(inputs_embeds=x[None]).logits[0, P - 1:P - 1 + int(rollout.lengths[i])]


def capture_inputs_embeds(model):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("inputs_embeds")), with_kwargs=True)
    return seen, handle


def fake_rollout(lengths, truncated, K=3):
    """Only lengths / truncated / latent data matter to advantages, loss and metrics."""
    N = len(lengths)
    return Rollout(prompt_ids=[torch.tensor([0])] * N,
                   token_ids=[torch.zeros(int(n), dtype=torch.long) for n in lengths],
                   topk_ids=[torch.zeros(0, K, dtype=torch.long)] * N, topk_scores=[torch.zeros(0, K)] * N,
                   texts=[""] * N, reward_texts=[""] * N, num_latent=torch.zeros(N, dtype=torch.long), lengths=torch.as_tensor(lengths),
                   truncated=torch.as_tensor(truncated))


def select(rollout, rows):
    """Rows of a Rollout, field by field, as train.py builds a mini-batch."""
    return Rollout(**{f.name: getattr(rollout, f.name)[torch.tensor(rows)] if torch.is_tensor(getattr(rollout, f.name))
                      else [getattr(rollout, f.name)[i] for i in rows] for f in dataclasses.fields(Rollout)})


@pytest.fixture(scope="module")
def algo(tok):
    return LatentGRPO(tiny_model("gpt2", tok, 0), tok, Config(), add_tokens=False)


def configured(algo, **kwargs):
    """The fixture's algorithm with another Config (for code that never touches the model)."""
    a = copy.copy(algo)
    a.cfg = Config(**kwargs)
    return a


# ---------------------------------------------------------------------------------------------------------------
# the latent policy (spec 3): T1, T2, T3, T12
# ---------------------------------------------------------------------------------------------------------------

def test_gumbel_noise_is_clamped_gumbel():
    """Monte Carlo: P(G >= 3) = 1 - exp(-e^-3) and P(G <= -1.5) = exp(-e^1.5) for a standard Gumbel; 200k draws,
    tolerance 5 standard errors."""
    n = 200_000
    G = gumbel_noise((n,), one_sided=False, noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    for frac, p in [((G == 3.0).float().mean(), 1 - math.exp(-math.exp(-3))),
                    ((G == -1.5).float().mean(), math.exp(-math.exp(1.5)))]:
        assert abs(frac.item() - p) < 5 * math.sqrt(p * (1 - p) / n)


@FAST
@given(seed=SEEDS, s=st.floats(0, 3), n=st.integers(1, 50))
def test_one_sided_noise_is_a_shift(seed, s, n):
    """T2/T3: from the same draw, one-sided noise = two-sided + 1.5 s; ranges [0, 4.5 s] and [-1.5 s, 3 s]."""
    two = gumbel_noise((n,), False, s, torch.Generator().manual_seed(seed))
    one = gumbel_noise((n,), True, s, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(one - two, torch.full_like(one, 1.5 * s), rtol=0, atol=1e-5)
    assert one.min() >= 0 and one.max() <= 4.5 * s * (1 + 1e-6)
    assert two.min() >= -1.5 * s * (1 + 1e-6) and two.max() <= 3 * s * (1 + 1e-6)


@FAST
@given(seed=SEEDS, N=st.integers(1, 4), V=st.integers(2, 60), K=st.integers(1, 12), top_p=st.floats(0.05, 1.0),
       tau=st.floats(0.3, 2.0), s=st.sampled_from([0.0, 0.5, 1.0, 2.0]), one_sided=st.booleans(),
       sharpness=st.sampled_from([0.3, 3.0, 10.0]))
def test_latent_step_matches_loop(seed, N, V, K, top_p, tau, s, one_sided, sharpness):
    """Spec 3.1 (vectorised: the whole-vocabulary top K when its least probable pick is in M, else sorting only the
    head of the law) against a per-row Python loop over the whole vocabulary, for flat to peaked laws; the sorting
    path alone on every row too; T1 (convex weights); T12 (y = id_1 = argmax w)."""
    K = min(K, V)
    gen = torch.Generator().manual_seed(seed)
    z = sharpness * torch.randn(N, V, generator=gen, dtype=torch.float64)
    noise = gumbel_noise((N, V), one_sided, s, gen).double()
    ids, g, w = latent_step(z, noise, K, top_p, tau)
    sorted_g, sorted_ids = _top_k_in_nucleus(z.log_softmax(-1), noise, K, top_p)
    for r in range(N):
        ref_ids, ref_g, ref_w = ref_latent_step(z[r], noise[r], K, top_p, tau)
        assert ids[r].tolist() == ref_ids and sorted_ids[r].tolist() == ref_ids
        torch.testing.assert_close(g[r], torch.tensor(ref_g, dtype=g.dtype))
        torch.testing.assert_close(sorted_g[r], torch.tensor(ref_g, dtype=g.dtype))
        torch.testing.assert_close(w[r], torch.tensor(ref_w, dtype=w.dtype))
    assert (w > 0).all() and torch.allclose(w.sum(-1), torch.ones(N, dtype=w.dtype))
    assert (w.argmax(-1) == 0).all()


@pytest.mark.parametrize("top_p, K, boosted, chosen", [
    (0.9, 2, 2, True),     # token 2: mass before it 0.8 < 0.9, in the nucleus although outside the top 2
    (0.9, 2, 3, False),    # token 3: mass before it 0.95, outside both
    (0.1, 2, 2, False),    # a tiny nucleus keeps token 0; the top K add token 1 only
    (0.1, 3, 2, True),     # ... and with K = 3 token 2 too
])
def test_candidate_set_is_nucleus_plus_top_k(top_p, K, boosted, chosen):
    """Spec 3.1 step 1 on a hand-made law p = (0.5, 0.3, 0.15, 0.05): a huge perturbation enters the top K only
    when its token is in M = nucleus(p, top_p) U topK(p)."""
    z = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log()
    noise = torch.zeros_like(z)
    noise[0, boosted] = 100.0
    ids, _, _ = latent_step(z, noise, K, top_p, 1.0)
    assert (ids[0, 0].item() == boosted) == chosen


@FAST
@given(seed=SEEDS, V=st.integers(2, 40), K=st.integers(1, 12), s=st.floats(0.1, 3.0), top_p=st.floats(0.05, 1.0))
def test_shift_invariance(seed, V, K, s, top_p):
    """T2: the same raw draw as one- and two-sided noise picks the same ids, weights, y and exit decision; the
    stored scores differ by exactly 1.5 s."""
    K = min(K, V)
    z = 3 * torch.randn(3, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    one = latent_step(z, gumbel_noise((3, V), True, s, torch.Generator().manual_seed(seed)).double(), K, top_p, 1.0)
    two = latent_step(z, gumbel_noise((3, V), False, s, torch.Generator().manual_seed(seed)).double(), K, top_p, 1.0)
    assert torch.equal(one[0], two[0])
    torch.testing.assert_close(one[1] - two[1], torch.full_like(one[1], 1.5 * s), rtol=0, atol=1e-5)  # float32 noise
    torch.testing.assert_close(one[2], two[2], rtol=0, atol=1e-5)


def chi_square_homogeneity(a: list, b: list) -> tuple[float, int]:
    """Two-sample chi-square statistic on categorical samples of equal size and its degrees of freedom; categories
    expected fewer than 5 times are pooled into one."""
    counts = {}
    for k, sample in enumerate((a, b)):
        for x in sample:
            counts.setdefault(x, [0, 0])[k] += 1
    cells, rare = [], [0, 0]
    for c in counts.values():
        if sum(c) / 2 < 5:
            rare = [rare[0] + c[0], rare[1] + c[1]]
        else:
            cells.append(c)
    if sum(rare):
        cells.append(rare)
    # equal sample sizes: chi2 = sum over cells of (a - b)^2 / (a + b)
    return sum((x - y) ** 2 / (x + y) for x, y in cells), len(cells) - 1


def chi_square_critical(df: int, z: float = 3.29) -> float:
    """The chi-square quantile at the normal quantile z (3.29: p = 0.0005), Wilson-Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("law, s, one_sided, head", [
    ("peaked", 0.5, True, True),     # the reach is a few tokens: the noise is drawn for the head only
    ("peaked", 1.0, False, True),
    ("flat", 1.0, True, False),      # most tokens within reach: drawn over the whole vocabulary
])
def test_sample_latent_step_has_the_full_draws_law(law, s, one_sided, head, monkeypatch):
    """Spec 3.1: the rollout's sampler, which draws noise only for the tokens that can reach the top K, against
    today's definition, latent_step on noise over the whole vocabulary: the same law of the ordered top-K ids
    (chi-square, 20,000 draws each), of g_1 and of w_1 (two-sample Kolmogorov-Smirnov), at the 0.05% level."""
    V, K, top_p, n = 30, 3, 0.9, 20000
    z = (torch.linspace(4, -8, V) if law == "peaked" else 0.3 * torch.randn(V, generator=torch.Generator()
                                                                              .manual_seed(0))).double()
    z = z[torch.randperm(V, generator=torch.Generator().manual_seed(1))].expand(n, V)
    monkeypatch.setattr(lg, "HEAD_MIN_VOCAB", 1)                      # the head path at this small vocabulary too
    widths = []
    real = lg.gumbel_noise
    monkeypatch.setattr(lg, "gumbel_noise", lambda shape, *a: widths.append(shape[-1]) or real(shape, *a))
    new = lg.sample_latent_step(z, K, top_p, 1.0, one_sided, s, torch.Generator().manual_seed(2))
    assert (widths[0] < V) == head
    old = latent_step(z, real((n, V), one_sided, s, torch.Generator().manual_seed(3)).double(), K, top_p, 1.0)
    stat, df = chi_square_homogeneity([tuple(r) for r in new[0].tolist()], [tuple(r) for r in old[0].tolist()])
    assert df >= 5 and stat < chi_square_critical(df), (stat, df)
    for k in (1, 2):                                                   # g_1, w_1
        a, b = new[k][:, 0].sort().values, old[k][:, 0].sort().values
        grid = torch.cat([a, b])
        D = ((torch.searchsorted(a, grid, right=True) - torch.searchsorted(b, grid, right=True)).abs().max() / n)
        assert D < 1.95 * math.sqrt(2 / n), (k, D)                     # KS critical value at about 0.1%


def test_sample_latent_step_without_noise_is_deterministic():
    z = 3 * torch.randn(4, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids, g, w = lg.sample_latent_step(z, 3, 0.9, 1.0, True, 0.0, torch.Generator())
    ref = latent_step(z, 0.0, 3, 0.9, 1.0)
    assert torch.equal(ids, ref[0]) and torch.equal(g, ref[1]) and torch.equal(w, ref[2])


@FAST
@given(seed=SEEDS, N=st.integers(1, 5), K=st.integers(1, 6), d=st.integers(1, 8))
def test_soft_embedding_is_the_convex_mix(seed, N, K, d):
    """T1: e = sum_k w_k E[id_k], lies in the convex hull (coordinate-wise within the rows' min and max)."""
    gen = torch.Generator().manual_seed(seed)
    E = torch.randn(20, d, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 20, (N, K), generator=gen)
    w = torch.randn(N, K, generator=gen, dtype=torch.float64).softmax(-1)
    e = soft_embedding(E, ids, w)
    for r in range(N):
        ref = sum(w[r, k].item() * E[ids[r, k]] for k in range(K))
        torch.testing.assert_close(e[r], ref)
        assert (e[r] >= E[ids[r]].min(0).values - 1e-12).all() and (e[r] <= E[ids[r]].max(0).values + 1e-12).all()


@FAST
@given(seed=SEEDS, V=st.integers(2, 40), T=st.floats(0.2, 2.0), top_p=st.floats(0.05, 1.0), top_k=st.integers(0, 8))
def test_sample_token_support(seed, V, T, top_p, top_k):
    """Answer sampling only returns tokens inside top-k (when on) and inside the nucleus of the full tempered law."""
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(6, V, generator=gen, dtype=torch.float64)
    y = sample_token(z, T, top_p, top_k, gen)
    for r in range(6):
        order = (z[r] / T).argsort(descending=True).tolist()
        rank = order.index(y[r].item())
        assert top_k == 0 or rank < top_k
        p = (z[r, order] / T).softmax(-1)   # the nucleus is measured on the full tempered law (joint filter)
        assert p[:rank].sum() < top_p + 1e-12


# ---------------------------------------------------------------------------------------------------------------
# log-probabilities (spec 4): T3, T4, T5, T7, T8
# ---------------------------------------------------------------------------------------------------------------

@FAST
@given(seed=SEEDS, V=st.integers(2, 30), K=st.integers(1, 8), s=st.floats(0.1, 2.0), one_sided=st.booleans())
def test_latent_logprob_at_old_policy(seed, V, K, s, one_sided):
    """T3: at theta_old, x = g - log p(id) equals the noise, in [0, 4.5 s] one-sided ([-1.5 s, 3 s] two-sided), and
    l_old in [-4.5 s - e^(-4.5 s), -1]; the value is the K-mean of phi(x) (loop reference)."""
    K = min(K, V)
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(5, V, generator=gen, dtype=torch.float64)
    noise = gumbel_noise((5, V), one_sided, s, gen).double()
    ids, g, _ = latent_step(z, noise, K, 1.0, 1.0)
    x = g - z.log_softmax(-1).gather(-1, ids)
    torch.testing.assert_close(x, noise.gather(-1, ids))
    lo, hi = (0.0, 4.5 * s) if one_sided else (-1.5 * s, 3 * s)
    assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6     # the noise is drawn in float32
    ell = latent_logprob(z, ids, g)
    torch.testing.assert_close(ell, torch.tensor([sum(phi(v) for v in row) / K for row in x.tolist()], dtype=ell.dtype))
    if one_sided:
        assert ell.min() >= -4.5 * s - math.exp(-4.5 * s) - 1e-6 and ell.max() <= -1 + 1e-12


def _random_latent_case(seed, V, K):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(6, V, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(6)])
    x0 = 3 * torch.rand(6, K, generator=gen, dtype=torch.float64) - 1.5            # both signs
    g = z.log_softmax(-1).gather(-1, ids) + x0
    A = torch.randn(6, generator=gen, dtype=torch.float64)
    return z, ids, g, A, x0


@FAST
@given(seed=SEEDS, V=st.integers(3, 20), K=st.integers(1, 6))
def test_gradient_monotonicity_finite_differences(seed, V, K):
    """T4: dl/dL_k = (1 - e^(-x_k)) / K (>= 0 iff x_k >= 0). Since x = g - L, dl/dL_k = -dl/dg_k, which central
    finite differences in the independent input g measure; autograd must agree."""
    K = min(K, V - 1)
    z, ids, g, _, x = _random_latent_case(seed, V, K)
    g = g.clone().requires_grad_(True)
    latent_logprob(z, ids, g).sum().backward()
    h = 1e-6
    for r, k in itertools.product(range(6), range(K)):
        e = torch.zeros_like(g)
        e[r, k] = h
        fd = (latent_logprob(z, ids, g.detach() + e)[r] - latent_logprob(z, ids, g.detach() - e)[r]) / (2 * h)
        dL = -fd.item()
        assert dL == pytest.approx((1 - math.exp(-x[r, k].item())) / K, abs=1e-7)
        assert dL == pytest.approx(-g.grad[r, k].item(), abs=1e-7)
        if abs(x[r, k].item()) > 1e-6:
            assert (dL > 0) == (x[r, k].item() > 0)


@FAST
@given(seed=SEEDS, V=st.integers(3, 20), K=st.integers(1, 6))
def test_flipgrad(seed, V, K):
    """T5: FlipGrad leaves every value unchanged (bit for bit). Components with A <= 0 and x < 0 get
    dl/dL = (e^x - 1) / K (the finite-difference slope of phi(-x)): same sign as without the flip, magnitude < 1/K;
    every other component keeps the plain gradient. The training gradient on the logits follows the chain rule."""
    K = min(K, V - 1)
    z, ids, g, A, x = _random_latent_case(seed, V, K)
    g_plain, g_flip = g.clone().requires_grad_(True), g.clone().requires_grad_(True)
    plain, flipped = latent_logprob(z, ids, g_plain), latent_logprob(z, ids, g_flip, A)
    assert torch.equal(plain, flipped)
    plain.sum().backward()
    flipped.sum().backward()
    h = 1e-6
    for r, k in itertools.product(range(6), range(K)):
        xk = x[r, k].item()
        d_plain, d_flip = -g_plain.grad[r, k].item(), -g_flip.grad[r, k].item()
        if A[r] <= 0 and xk < 0:
            # phi(-x) = x - e^x; as a function of L (x = g - L) its slope is e^x - 1
            fd = ((xk - h - math.exp(xk - h)) - (xk + h - math.exp(xk + h))) / (2 * h) / K
            assert d_flip == pytest.approx(fd, abs=1e-7)
            assert d_flip == pytest.approx((math.exp(xk) - 1) / K, abs=1e-12)
            assert d_flip < 0 and d_plain < 0 and abs(d_flip) < 1 / K
        else:
            assert d_flip == pytest.approx(d_plain, abs=1e-12)
    # logits gradient = J^T c with J = dL/dz = onehot(id) - p, c_k = dl/dL_k
    z = z.clone().requires_grad_(True)
    latent_logprob(z, ids, g, A).sum().backward()
    c = -g_flip.grad
    p = z.detach().softmax(-1)
    ref = torch.zeros_like(p).scatter_add(-1, ids, c) - p * c.sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, ref)


@FAST
@given(seed=SEEDS, V=st.integers(2, 30), T=st.floats(0.2, 2.0), c=st.floats(0.2, 5.0))
def test_token_logprob_temperature(seed, V, T, c):
    """T8: l = log_softmax(z / T)[y]; scaling the logits by c is the same as temperature T / c."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (4,), generator=gen)
    ell = token_logprob(z, y, T)
    for r in range(4):
        zs = [v / T for v in z[r].tolist()]
        ref = zs[y[r]] - math.log(sum(math.exp(v) for v in zs))
        assert ell[r].item() == pytest.approx(ref, abs=1e-10)
    torch.testing.assert_close(token_logprob(c * z, y, T), token_logprob(z, y, T / c))


# ---------------------------------------------------------------------------------------------------------------
# advantages (spec 5.1, 6.1, 6.3): T9, T10, T11 by enumeration
# ---------------------------------------------------------------------------------------------------------------

def ref_group(rewards, truncated, exclude):
    keep = [i for i in range(len(rewards)) if not (exclude and truncated[i])]
    vals = [rewards[i] for i in keep]
    mu, sd = (0.0, 1.0) if len(vals) <= 1 else (statistics.mean(vals), statistics.stdev(vals))
    return [0.0 if i not in keep else (r - mu) / (sd + 1e-6) for i, r in enumerate(rewards)]


@pytest.mark.parametrize("G", [1, 2, 3, 4])
def test_group_advantages_enumeration(G):
    """T9/T10 over every reward and truncation pattern of a group of G: the loop reference (Bessel std, eps 1e-6,
    a one-member group has mean 0 std 1), zero sum without truncation, all-equal -> 0, include = exclude without
    truncation, and in exclude mode the valid members' advantages are those of the group without the truncated."""
    combos = list(itertools.product(itertools.product([0.0, 1.0], repeat=G),
                                    itertools.product([False, True], repeat=G)))
    R = torch.tensor([r for r, _ in combos], dtype=torch.float64)
    T = torch.tensor([t for _, t in combos])
    for exclude in (False, True):
        A = group_advantages(R, T, exclude)
        for j, (r, t) in enumerate(combos):
            assert A[j].tolist() == pytest.approx(ref_group(r, t, exclude), abs=1e-9)
            if exclude and any(t) and not all(t):
                valid = [i for i in range(G) if not t[i]]
                alone = group_advantages(R[j:j + 1, valid], torch.zeros(1, len(valid), dtype=torch.bool), True)
                torch.testing.assert_close(A[j, valid], alone[0])
    none = ~T.any(1)
    A_inc, A_exc = group_advantages(R, T, False), group_advantages(R, T, True)
    torch.testing.assert_close(A_inc[none], A_exc[none])
    if G > 1:
        assert A_inc[none].sum(1).abs().max() < 1e-9
        assert (A_inc[(R == R[:, :1]).all(1)] == 0).all()


@pytest.mark.parametrize("G", [1, 2, 3, 4])
def test_first_token_selection_enumeration(G):
    """T11 over every sign pattern: at most one nonzero per group, positive, with the largest mean old log-prob;
    groups without a positive member unchanged; equivariant under permutations of the members."""
    patterns = torch.tensor(list(itertools.product([-1.0, 0.0, 1.0], repeat=G)), dtype=torch.float64)
    gen = torch.Generator().manual_seed(G)
    A = patterns * torch.rand(patterns.shape, generator=gen, dtype=torch.float64).add(0.5)
    score = torch.randn(patterns.shape, generator=gen, dtype=torch.float64)     # distinct: no ties
    out = first_token_selection(A, score)
    for a, s, o in zip(A.tolist(), score.tolist(), out.tolist()):
        pos = [i for i in range(G) if a[i] > 0]
        if not pos:
            assert o == a
            continue
        win = max(pos, key=lambda i: s[i])
        assert o == [a[i] if i == win else 0.0 for i in range(G)]
    for perm in itertools.permutations(range(G)):
        assert torch.equal(first_token_selection(A[:, list(perm)], score[:, list(perm)]), out[:, list(perm)])


@pytest.mark.parametrize("invalid_mask, exclude, select, latent", list(itertools.product([False, True], repeat=4)))
@settings(deadline=None, max_examples=6)
@given(seed=SEEDS, P=st.integers(1, 3), G=st.integers(2, 4))
def test_advantages_and_loss_masking(algo, invalid_mask, exclude, select, latent, seed, P, G):
    """The advantage pipeline (5.1 -> 6.1 -> 6.3 -> 6.1 include zeroing) against a plain loop, and T10 in the loss:
    a masked sample has zero loss and gradient yet stays in the token-mean denominator. Explicit mode (latent=False)
    is plain GRPO: no masking, no selection."""
    a = configured(algo, invalid_mask=invalid_mask, exclude_truncated=exclude, first_token_selection=select,
                   latent=latent)
    gen = torch.Generator().manual_seed(seed)
    N, L = P * G, 6
    truncated = torch.rand(N, generator=gen) < 0.3
    truncated[0] = True                              # the first group always has a truncated member ...
    lengths = torch.where(truncated, L, torch.randint(1, L + 1, (N,), generator=gen))
    rewards = torch.randint(0, 2, (P, G), generator=gen).double()
    rewards[0, :2] = torch.tensor([0.0, 1.0])        # ... and mixed rewards, so its advantage is not 0
    valid = torch.arange(L) < lengths[:, None]
    old = torch.randn(N, L, generator=gen, dtype=torch.float64) * valid
    ro = fake_rollout(lengths, truncated)
    A = a.advantages(rewards, ro, old)
    masking, selecting = invalid_mask and latent, select and latent
    for p in range(P):
        rows = list(range(p * G, p * G + G))
        tr = [bool(truncated[i]) for i in rows] if masking else [False] * G
        base = ref_group(rewards[p].tolist(), tr, exclude)
        first = list(base)
        positive = [j for j in range(G) if base[j] > 0]
        if selecting and positive:
            win = max(positive, key=lambda j: (old[rows[j]].sum() / lengths[rows[j]]).item())
            first = [base[j] if j == win else 0.0 for j in range(G)]
        for j, i in enumerate(rows):
            expect = [first[j]] + [base[j]] * (L - 1)
            if masking and tr[j]:
                expect = [0.0] * L
            assert A[i].tolist() == pytest.approx(expect, abs=1e-9)
    # T10 in the loss: zero gradient on masked rows, denominator counts every valid token
    logprobs = (old + 0.1 * torch.randn(N, L, generator=gen, dtype=torch.float64)).requires_grad_(True)
    loss, stats = a.loss(logprobs, old, None, A, ro)
    loss.backward()
    if masking:
        assert (logprobs.grad[truncated] == 0).all()
        assert stats["adv/frac_masked_invalid"] == pytest.approx(truncated.float().mean().item())
    ratio = torch.exp(logprobs.detach() - old)
    per_token = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2))
    per_token = torch.where(A < 0, torch.minimum(per_token, -3 * A), per_token)
    assert loss.item() == pytest.approx((per_token * valid).sum().item() / valid.sum().item(), abs=1e-12)


@FAST
@given(A=st.floats(-5, 5).filter(lambda v: abs(v) > 1e-3),
       r=st.floats(0.05, 8.0).filter(lambda v: min(abs(v - 0.8), abs(v - 1.2), abs(v - 3)) > 1e-6))
def test_dual_clip(algo, A, r):
    """T14 against the case analysis: A < 0 and r > c -> loss c|A|, zero gradient; A > 0 and r > 1 + eps, or A < 0
    and r < 1 - eps -> zero gradient; otherwise the gradient of -A r."""
    ro = fake_rollout([1], [False])
    logprob = torch.tensor([[math.log(r)]], dtype=torch.float64, requires_grad=True)
    loss, stats = algo.loss(logprob, torch.zeros(1, 1, dtype=torch.float64), None, torch.tensor([[A]]), ro)
    loss.backward()
    grad = logprob.grad.item()
    if A < 0 and r > 3:
        assert loss.item() == pytest.approx(3 * abs(A)) and grad == 0
    elif (A > 0 and r > 1.2) or (A < 0 and r < 0.8):
        assert grad == 0 and loss.item() == pytest.approx(-A * min(max(r, 0.8), 1.2))
    else:
        assert loss.item() == pytest.approx(-A * r) and grad == pytest.approx(-A * r)
    assert stats["clip_ratio"] == float((A > 0 and r > 1.2) or (A < 0 and r < 0.8))


def test_k3_kl(algo):
    """k3 = exp(d) - d - 1 with d = l_ref - l, clamped to +-10, token-mean, scaled by beta."""
    a = configured(algo, beta=0.5)
    ro = fake_rollout([2, 1], [False, False])
    ell = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, 20.0], [-0.1, 0.0]], dtype=torch.float64)
    loss, stats = a.loss(ell, ell, ref, torch.zeros(2, 1), ro)
    kls = [min(math.exp(d) - d - 1, 10.0) for d in (-0.5, 22.0, 0.4)]
    assert stats["kl"] == pytest.approx(sum(kls) / 3)
    assert loss.item() == pytest.approx(0.5 * sum(kls) / 3)


# ---------------------------------------------------------------------------------------------------------------
# the batched KV-cache rollout against a cache-free forward: T1, T3, T6, T7, T12
# ---------------------------------------------------------------------------------------------------------------

@MODEL
@given(kind=KINDS, seed=SEEDS, explore=st.booleans(), one_sided=st.booleans(), s=st.sampled_from([0.5, 1.0, 2.0]),
       forced_exit=st.booleans())
def test_rollout_matches_cache_free_forward(tok, kind, seed, explore, one_sided, s, forced_exit):
    """Each row of a batched, left-padded KV-cache rollout, replayed by one cache-free forward of that row alone:
    latent steps are exactly spec 3.1 on those logits (x in the noise range, deterministic top-K when not exploring),
    latent steps form a prefix ended by the end id (T12), answer tokens lie in the sampler's support, EOS only last,
    the texts decode the answer; the training forward rebuilds the rollout's input embeddings (T1) and its
    log-probs equal the loop reference (T3 range at theta_old)."""
    model = tiny_model(kind, tok, seed)
    cfg = Config(max_response_length=10, noise_scale=s, one_sided=one_sided, forced_exit=forced_exit)
    algo = LatentGRPO(model, tok, cfg, add_tokens=False)
    gen = torch.Generator().manual_seed(seed)
    seen, handle = capture_inputs_embeds(model)
    ro = algo.rollout(model, questions(seed), 2, gen) if explore else algo.generate(model, questions(seed), False, gen)
    rollout_inputs = seen[1:]                        # seen[0] is the prefill (token ids)
    seen.clear()
    ell = algo.logprobs(model, ro)
    handle.remove()
    train_inputs = seen[0]
    lo, hi = ((0.0, 4.5 * s) if one_sided else (-1.5 * s, 3 * s)) if explore else (0.0, 0.0)
    Pmax = max(len(p) for p in ro.prompt_ids)
    for i in range(len(ro.texts)):
        y, n_lat, n = ro.token_ids[i].tolist(), int(ro.num_latent[i]), int(ro.lengths[i])
        z = cache_free_logits(model, ro, i)                                         # (n, V)
        x_ref = ref_inputs(model, ro, i)
        P = len(ro.prompt_ids[i])
        for t in range(n - 1):   # the rollout fed exactly these embeddings, and so does the training forward
            torch.testing.assert_close(rollout_inputs[t][i, 0], x_ref[P + t])
        torch.testing.assert_close(train_inputs[i, Pmax - P:Pmax + n], x_ref)
        for t in range(n):
            logp = z[t].log_softmax(-1)
            if t < n_lat:
                ids, g = ro.topk_ids[i][t], ro.topk_scores[i][t]
                x = g - logp[ids]
                assert x.min() >= lo - 1e-9 and x.max() <= hi + 1e-9
                assert (g[:-1] >= g[1:]).all() and y[t] == ids[0] != algo.end_id
                if not explore:
                    assert ids.tolist() == z[t].topk(cfg.top_k).indices.tolist()
                if forced_exit:
                    assert z[t].argmax() != algo.end_id
                assert ell[i, t].item() == pytest.approx(sum(phi(v) for v in x.tolist()) / cfg.top_k, abs=1e-9)
            else:
                if t == n_lat:
                    assert y[t] == algo.end_id
                    if not explore:
                        assert z[t].argmax() == algo.end_id
                elif explore:
                    assert (z[t] > z[t, y[t]]).sum() < cfg.answer_top_k
                hard = (z[t] / cfg.temperature).log_softmax(-1)[y[t]]
                assert ell[i, t].item() == pytest.approx(hard.item(), abs=1e-9)
        assert (ell[i, n:] == 0).all()
        assert algo.eos_id not in y[:-1]
        assert bool(ro.truncated[i]) == (n == cfg.max_response_length)
        stopped = y[-1] == algo.eos_id
        assert ro.texts[i] == tok.decode(y[:n - stopped], skip_special_tokens=False)
        assert ro.reward_texts[i] == tok.decode(y, skip_special_tokens=True)
        if explore and one_sided:
            lowest = -4.5 * s - math.exp(-4.5 * s)
            assert (ell[i, :n_lat] <= -1 + 1e-12).all() and (ell[i, :n_lat] >= lowest - 1e-9).all()


@MODEL
@given(kind=KINDS, seed=SEEDS)
def test_on_policy_ratio_is_one_and_labels_do_not_matter(tok, kind, seed):
    """T6: log-probs at theta_old reproduce themselves, with FlipGrad on (forward-neutral), so every ratio is 1 and
    the loss is -token-mean(A). T7: a latent step's log-prob ignores its recorded id."""
    model = tiny_model(kind, tok, seed)
    algo = LatentGRPO(model, tok, Config(max_response_length=10), add_tokens=False)
    ro = algo.rollout(model, questions(seed), 3, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        old = algo.logprobs(model, ro)
    A = torch.randn(len(ro.texts), 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    new = algo.logprobs(model, ro, A)
    assert torch.equal(new.detach(), old)
    loss, stats = algo.loss(new, old, None, A, ro)
    valid = torch.arange(old.shape[1]) < ro.lengths[:, None]
    assert loss.item() == pytest.approx(-(A * valid).sum().item() / valid.sum().item(), abs=1e-12)
    assert stats["clip_ratio"] == 0.0
    # a mini-batch of the shortest rows, handed full-width advantages as train.py does
    N, L = old.shape
    rows = sorted(range(N), key=lambda i: int(ro.lengths[i]))[:2]
    mb, A_wide = select(ro, rows), A.expand(N, L)[rows]
    new_mb = algo.logprobs(model, mb, A_wide)
    torch.testing.assert_close(new_mb, old[rows, :new_mb.shape[1]])
    assert algo.loss(new_mb, old[rows, :new_mb.shape[1]], None, A_wide, mb)[1]["clip_ratio"] == 0.0
    relabelled = copy.copy(ro)
    relabelled.token_ids = [torch.where(torch.arange(len(y)) < k, (y + 7) % len(tok), y)
                            for y, k in zip(ro.token_ids, ro.num_latent)]
    with torch.no_grad():
        assert torch.equal(algo.logprobs(model, relabelled), old)


def per_kind_logprobs(logits, ro, cfg, A):
    """LatentGRPO.logprobs' densities as they were first written: the rows of each kind selected from the (N, L, V)
    logits, a log-softmax over the whole vocabulary, then a gather; FlipGrad as in the spec."""
    N, L = logits.shape[0], logits.shape[1] - 1
    z = logits[:, :-1]
    steps = torch.arange(L)
    valid, latent = steps < ro.lengths[:, None], steps < ro.num_latent[:, None]
    hard = valid & ~latent
    response = torch.zeros(N, L, dtype=torch.long)
    for i, y in enumerate(ro.token_ids):
        response[i, :len(y)] = y
    ell = z.new_zeros(N, L)
    ell[hard] = (z[hard] / cfg.temperature).log_softmax(-1).gather(-1, response[hard][:, None])[:, 0]
    x = torch.cat(ro.topk_scores) - z[latent].log_softmax(-1).gather(-1, torch.cat(ro.topk_ids))
    phi = -x - torch.exp(-x)
    if A is not None:
        flip = (A[latent][:, None] <= 0) & (x < 0)
        proxy = torch.where(flip, x - torch.exp(x), phi)
        phi = phi.detach() + (proxy - proxy.detach())
    ell[latent] = phi.mean(-1)
    return ell, ((A[latent][:, None] <= 0) & (x < 0)).float().mean().item() if A is not None else None


@MODEL
@given(kind=KINDS, seed=SEEDS, flip_grad=st.booleans())
def test_logprobs_equal_the_per_kind_formulas(tok, kind, seed, flip_grad):
    """One selective log-softmax over every position (a hard step's token at temperature T, a latent step's K ids at
    temperature 1) against the densities computed per kind on the selected rows with full log-softmaxes: the same
    values, the same gradient into the logits and the same flip fraction, float64, at a perturbed policy with
    mixed-sign per-position advantages (FlipGrad acting)."""
    model = tiny_model(kind, tok, seed, boost=0.1)
    cfg = Config(max_response_length=10, max_latent_steps=1 + seed % 4, flip_grad=flip_grad)
    algo = LatentGRPO(model, tok, cfg, add_tokens=False)
    # </think> pushed down in the rollout: the cap ends every latent phase, so both kinds are always scored
    low = -30.0 * F.one_hot(torch.tensor(algo.end_id), len(tok)).double()
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + low)
    ro = algo.rollout(model, questions(seed), 3, torch.Generator().manual_seed(seed))
    hook.remove()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=gen, dtype=q.dtype))
    N, L = len(ro.texts), int(ro.lengths.max())
    A = torch.randn(N, L, generator=gen, dtype=torch.float64)
    captured = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        ell = algo.logprobs(model, ro, A)
    finally:
        hook.remove()
    (logits,) = captured                                                        # (N, L + 1, V), in the graph
    ref, flip_frac = per_kind_logprobs(logits, ro, algo.cfg, A if flip_grad else None)
    assert (ro.num_latent > 0).any() and (ro.lengths > ro.num_latent).any()     # both kinds are scored
    torch.testing.assert_close(ell, ref, rtol=0, atol=1e-12)
    w = torch.randn(N, L, generator=gen, dtype=torch.float64)                   # a generic upstream gradient
    (grad,) = torch.autograd.grad((w * ell).sum(), logits, retain_graph=True)
    (ref_grad,) = torch.autograd.grad((w * ref).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    if flip_grad:
        assert algo.last_flip_frac == pytest.approx(flip_frac, abs=0)


@MODEL
@given(kind=KINDS, seed=SEEDS)
def test_noise_off_and_greedy_gives_identical_groups(tok, kind, seed):
    """T13: noise off + greedy answers -> the G rollouts of a question are identical, any reward of the text is
    constant in the group, and every advantage is 0. Noise off with sampled answers: the latent phase still is."""
    model = tiny_model(kind, tok, seed)
    G, qs = 4, questions(seed, 2)
    greedy = LatentGRPO(model, tok, Config(max_response_length=8, noise_scale=0.0, answer_top_k=1), add_tokens=False)
    ro = greedy.rollout(model, qs, G, torch.Generator().manual_seed(seed))
    for q in range(len(qs)):
        rows = range(q * G, q * G + G)
        for field in (ro.token_ids, ro.topk_ids, ro.topk_scores):
            assert all(torch.equal(field[i], field[q * G]) for i in rows)
        assert len({ro.texts[i] for i in rows}) == 1
    rewards = torch.tensor([[float(len(t) % 2) for t in ro.texts[q * G:q * G + G]] for q in range(len(qs))])
    with torch.no_grad():
        assert (greedy.advantages(rewards, ro, greedy.logprobs(model, ro)) == 0).all()
    sampled = LatentGRPO(model, tok, Config(max_response_length=8, noise_scale=0.0), add_tokens=False)
    ro = sampled.rollout(model, qs, G, torch.Generator().manual_seed(seed))
    for q in range(len(qs)):
        assert all(torch.equal(ro.topk_scores[i], ro.topk_scores[q * G]) for i in range(q * G, q * G + G))


@MODEL
@given(kind=KINDS, seed=SEEDS, mode=st.sampled_from(["latent=false", "max_latent_steps=0"]))
def test_explicit_mode_loss_is_plain_grpo(tok, kind, seed, mode):
    """With no latent steps the objective is plain explicit GRPO: a reference on token ids (no inputs_embeds), one
    row at a time, with old log-probs from a perturbed model and mixed-sign advantages, gives the same loss and the
    same parameter gradient."""
    model = tiny_model(kind, tok, seed)
    old_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in old_model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    cfg = Config(max_response_length=8, **({"latent": False} if mode == "latent=false" else {"max_latent_steps": 0}))
    algo = LatentGRPO(model, tok, cfg, add_tokens=False)
    algo.start_rl(model)
    ro = algo.rollout(model, questions(seed), 2, torch.Generator().manual_seed(seed))
    assert (ro.num_latent == 0).all() and all(len(t) == 0 for t in ro.topk_ids)
    N = len(ro.texts)
    A = torch.randn(N, 1, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        old = algo.logprobs(old_model, ro)
    loss, _ = algo.loss(algo.logprobs(model, ro, A), old, None, A, ro)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    model.zero_grad()

    terms, count = [], 0
    for i in range(N):
        ids = torch.cat([ro.prompt_ids[i], ro.token_ids[i]])[None]
        P, n = len(ro.prompt_ids[i]), int(ro.lengths[i])
        lp = (model(input_ids=ids).logits[0, P - 1:P - 1 + n] / cfg.temperature).log_softmax(-1)
        with torch.no_grad():
            lp_old = (old_model(input_ids=ids).logits[0, P - 1:P - 1 + n] / cfg.temperature).log_softmax(-1)
        for t in range(n):
            a, yt = A[i, 0], ro.token_ids[i][t]
            r = torch.exp(lp[t, yt] - lp_old[t, yt])
            term = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
            terms.append(torch.minimum(term, -3 * a) if a < 0 else term)
            count += 1
    ref = torch.stack(terms).sum() / count
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad)


# ---------------------------------------------------------------------------------------------------------------
# the algorithm object: tokens, prompts, validation, SFT stand-in, metrics, caps
# ---------------------------------------------------------------------------------------------------------------

def test_add_tokens_and_missing_tokens(raw_tok):
    """add_tokens=True adds <think> </think> as special tokens, resizes, starts both new rows at the mean of the old
    ones, and looks the end id up; add_tokens=False adds nothing (a checkpoint's tokenizer, used as it is): the end
    id is the first sub-token of the split </think> (spec 3). A tokenizer that cannot encode it: tests/test_models.py."""
    t = copy.deepcopy(raw_tok)
    model = tiny_model("llama", t, 0)
    old_in, old_out = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
    as_is = LatentGRPO(model, t, Config(), add_tokens=False)
    assert len(t) == len(raw_tok) and len(t.encode(lg.END_THINK)) > 1 and as_is.end_id == t.encode(lg.END_THINK)[0]
    algo = LatentGRPO(model, t, Config(), add_tokens=True)
    assert len(t) == len(raw_tok) + 2 == model.get_input_embeddings().weight.shape[0]
    assert algo.end_id == t.convert_tokens_to_ids(lg.END_THINK) == t.encode(lg.END_THINK)[0]
    for new, old in ((model.get_input_embeddings().weight, old_in), (model.get_output_embeddings().weight, old_out)):
        torch.testing.assert_close(new[len(raw_tok):], old.mean(0).expand(2, -1))
        torch.testing.assert_close(new[:len(raw_tok)], old)
    assert t.decode([algo.end_id] + t.encode(" 12"), skip_special_tokens=True) == " 12"


@pytest.mark.parametrize("kwargs, flag", [
    (dict(top_k=0), "--top-k"), (dict(noise_scale=-0.1), "--noise-scale"),
    (dict(max_response_length=16, max_latent_steps=17), "--max-latent-steps"), (dict(dual_clip=1.0), "--dual-clip"),
    (dict(top_p_latent=0.0), "--top-p-latent"), (dict(c_latent=0), "--c-latent"),
    (dict(temperature=0.0), "--temperature"),
])
def test_config_validation(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        Config(**kwargs)


def test_top_k_larger_than_vocabulary(tok):
    with pytest.raises(ValueError, match="--top-k"):
        LatentGRPO(tiny_model("gpt2", tok, 0), tok, Config(top_k=len(tok) + 1), add_tokens=False)


def test_prompt_always_ends_with_think(tok, algo):
    """Spec 2: plain text + <think> without a chat template; through the template otherwise; never doubled."""
    assert algo.prompt_text("Q?") == lg.INSTRUCTION + "Q?" + lg.THINK
    a = configured(algo)
    a.tokenizer = t = copy.deepcopy(tok)
    for suffix in ("<|assistant|>", "<|assistant|><think>"):
        t.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                           "{% if add_generation_prompt %}" + suffix + "{% endif %}")
        assert a.prompt_text("Q?") == "<|user|>" + lg.INSTRUCTION + "Q?<|assistant|><think>"


@settings(deadline=None, max_examples=8)
@given(seed=SEEDS, c=st.integers(1, 3), S=st.integers(1, 3))
def test_sft_curriculum(tok, seed, c, S):
    """The stand-in initialisation. Every stage keeps the text: the ids after the prompt, read in order, decode to
    steps + </think> The answer is \\boxed{answer} + EOS. A position holds 1 id (weight 1) or, for latents, up to c ids (weight 1/size).
    The replaced steps grow with the stage; at the last stage every CoT token is latent and the chain is
    ceil(n/c) positions for n CoT tokens. The loss is the loop reference's soft cross-entropy."""
    model = tiny_model("gpt2", tok, seed)
    algo = LatentGRPO(model, tok, Config(c_latent=c, latent_stages=S, latent_init="standin"), add_tokens=False)
    examples = data.synthetic_task(3, seed)
    previous = [0] * len(examples)
    for stage in range(S + 1):
        batch = algo.sft_batch(examples, stage)
        for b, ex in enumerate(examples):
            prompt = tok(algo.prompt_text(ex["question"]), add_special_tokens=False).input_ids
            mask, target = batch["attention_mask"][b].bool(), batch["target_mask"][b]
            assert target.sum() == mask.sum() - len(prompt) and not target[:len(prompt)].any()
            assert batch["ids"][b, :len(prompt), 0].tolist() == prompt
            w, ids = batch["weights"][b][target], batch["ids"][b][target]
            sizes = (w > 0).sum(-1)
            torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))
            assert (sizes <= (c if stage else 1)).all()
            flat = [i for row, k in zip(ids.tolist(), sizes.tolist()) for i in row[:k]]
            text = "".join(s + "\n" for s in ex["steps"]) + lg.END_THINK + f" The answer is \\boxed{{{ex['answer']}}}"
            assert flat[-1] == tok.eos_token_id and tok.decode(flat[:-1]) == text
            n_latent = int((sizes > 1).sum()) if c > 1 else 0
            assert n_latent >= previous[b]
            previous[b] = n_latent
            if stage == S and c > 1:
                cot = tok("".join(s + "\n" for s in ex["steps"]), add_special_tokens=False).input_ids
                assert n_latent + (len(cot) % c == 1) == math.ceil(len(cot) / c)
    E = model.get_input_embeddings().weight
    loss = algo.sft_loss(model, batch)
    terms = []
    for b in range(len(examples)):
        n = int(batch["attention_mask"][b].sum())
        x = torch.stack([sum(batch["weights"][b, t, k].item() * E[batch["ids"][b, t, k]]
                             for k in range(batch["ids"].shape[-1])) for t in range(n)])
        logp = model(inputs_embeds=x[None]).logits[0].log_softmax(-1)
        for t in range(1, n):
            if batch["target_mask"][b, t]:
                terms.append(-sum(batch["weights"][b, t, k].item() * logp[t - 1, batch["ids"][b, t, k]]
                                  for k in range(batch["ids"].shape[-1])))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-10)


def test_embeddings_train_in_sft_and_freeze_for_rl(tok):
    """5.4: the SFT loss reaches the new tokens' embedding rows; start_rl freezes input and output embeddings
    (and freeze_embedding=False leaves them trainable)."""
    model = tiny_model("llama", tok, 0)
    algo = LatentGRPO(model, tok, Config(max_response_length=4), add_tokens=False)
    algo.sft_loss(model, algo.sft_batch(data.synthetic_task(2, 0), 0)).backward()
    for i in (tok.convert_tokens_to_ids(lg.THINK), algo.end_id):
        assert model.get_input_embeddings().weight.grad[i].abs().sum() > 0
    algo.start_rl(model)
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad
    other = tiny_model("llama", tok, 0)
    keep = LatentGRPO(other, tok, Config(max_response_length=4, freeze_embedding=False), add_tokens=False)
    keep.start_rl(other)
    assert other.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("forced_exit", [True, False])
def test_forced_exit(tok, forced_exit):
    """Spec 3.1 step 7 on a model whose logits are constant with the end id on top (p ~ 2%): with the check every
    row exits at its first step whatever the noise; without it, the noise keeps many rows in latent mode."""
    model = tiny_model("llama", tok, 0)
    bias = torch.zeros(len(tok), dtype=torch.float64)
    bias[tok.convert_tokens_to_ids(lg.END_THINK)] = 2.0
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    # the released scripts' noise scale: large enough to move the top token away from the end id most of the time
    cfg = Config(max_response_length=3, forced_exit=forced_exit, noise_scale=1.0)
    algo = LatentGRPO(model, tok, cfg, add_tokens=False)
    ro = algo.rollout(model, questions(0, 2), 8, torch.Generator().manual_seed(0))
    if forced_exit:
        assert (ro.num_latent == 0).all() and all(y[0] == algo.end_id for y in ro.token_ids)
    else:
        assert (ro.num_latent > 0).float().mean() > 0.25   # 8 of 16 rows with this seed and tokenizer


@MODEL
@given(kind=KINDS, seed=SEEDS, cap=st.integers(0, 3))
def test_latent_cap_metrics_and_reproducibility(tok, kind, seed, cap):
    """max_latent_steps caps the latent prefix; metrics equal loop references; the same seed gives the same
    rollout; evaluation (explore=False) has a deterministic latent phase whatever the seed."""
    model = tiny_model(kind, tok, seed, boost=0.5)
    algo = LatentGRPO(model, tok, Config(max_response_length=8, max_latent_steps=cap), add_tokens=False)
    qs = questions(seed)
    ro = algo.rollout(model, qs, 2, torch.Generator().manual_seed(seed))
    again = algo.rollout(model, qs, 2, torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(ro.token_ids + ro.topk_scores, again.token_ids + again.topk_scores))
    assert (ro.num_latent <= cap).all()
    m = algo.metrics(ro)
    steps, lengths = ro.num_latent.tolist(), ro.lengths.tolist()
    assert m["latent/mean_steps"] == pytest.approx(sum(steps) / len(steps))
    assert m["latent/frac_latent"] == pytest.approx(sum(steps) / sum(lengths))
    assert m["latent/never_exited"] == pytest.approx(sum(a == b for a, b in zip(steps, lengths)) / len(steps))
    ents = [-sum(p * math.log(p) for p in torch.softmax(row, -1).tolist() if p > 0)
            for scores in ro.topk_scores for row in scores]
    assert m["latent/topk_entropy"] == pytest.approx(sum(ents) / len(ents) if ents else 0.0, abs=1e-6)
    a, b = (algo.generate(model, qs, False, torch.Generator().manual_seed(k)) for k in (1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.topk_scores + a.topk_ids, b.topk_scores + b.topk_ids))
