"""Latent-GRPO as the official code trains and scores it: each rule against a plain reference written from the
official one (verl 0.4 fork + patched SGLang sampler). Loss aggregation, training reward, evaluation text,
truncation, joint top-k / top-p, the EOS set, the explore policy of eval.py, the prompt's <think>, FlipGrad at A = 0."""
import copy
import dataclasses
import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

import data
import eval as ev
import latent_grpo as lg
import train
from latent_grpo import Config, LatentGRPO, Rollout, aggregate, answer_law, dual_clip_loss, latent_logprob

torch.set_num_threads(1)
FAST = settings(deadline=None, max_examples=25)
SEEDS = st.integers(0, 2**16)


@pytest.fixture(scope="module")
def tok():
    t = data.build_tokenizer()
    t.add_tokens([lg.THINK, lg.END_THINK], special_tokens=True)
    return t


def emitting(tok, token_id, **config):
    """A float64 GPT-2 whose every next-token law puts almost all its mass on `token_id`: the final layer norm
    outputs a constant vector b, and only the output row of `token_id` is b (times 10) (the head is tied, so the
    inputs change too, but the constant hidden state ignores them)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=256, vocab_size=len(tok),
                                       bos_token_id=0, eos_token_id=0, **config)).double().eval()
    with torch.no_grad():
        b = torch.ones(16, dtype=torch.float64)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 10 * b
    return model


def fake_rollout(lengths):
    N = len(lengths)
    return Rollout(prompt_ids=[torch.tensor([0])] * N, token_ids=[torch.zeros(int(n), dtype=torch.long) for n in lengths],
                   topk_ids=[torch.zeros(0, 3, dtype=torch.long)] * N, topk_scores=[torch.zeros(0, 3)] * N,
                   texts=[""] * N, reward_texts=[""] * N, num_latent=torch.zeros(N, dtype=torch.long),
                   lengths=torch.as_tensor(lengths), truncated=torch.zeros(N, dtype=torch.bool))


def rows_of(rollout, rows):
    return Rollout(**{f.name: getattr(rollout, f.name)[torch.tensor(rows)] if torch.is_tensor(getattr(rollout, f.name))
                      else [getattr(rollout, f.name)[i] for i in rows] for f in dataclasses.fields(Rollout)})


# ---------------------------------------------------------------------------------------------------------------
# 1. loss aggregation: verl's mean over micro-batches of per-micro-batch token means
# ---------------------------------------------------------------------------------------------------------------

def ref_micro_token_mean(x, lengths, m):
    """verl dp_actor: split the rows into micro-batches of m, token mean inside each, sum / number of them."""
    means = []
    for start in range(0, len(lengths), m):
        vals = [x[i][t] for i in range(start, min(start + m, len(lengths))) for t in range(lengths[i])]
        means.append(sum(vals) / len(vals))
    return sum(means) / len(means)


@FAST
@given(seed=SEEDS, N=st.integers(1, 9), L=st.integers(1, 6), m=st.integers(1, 4))
def test_aggregate_matches_loop(seed, N, L, m):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (N,), generator=gen)
    valid = torch.arange(L) < lengths[:, None]
    assert aggregate(x, valid, m).item() == pytest.approx(ref_micro_token_mean(x.tolist(), lengths.tolist(), m))
    token_mean = sum(x[i, t].item() for i in range(N) for t in range(int(lengths[i]))) / int(lengths.sum())
    assert aggregate(x, valid, 0).item() == pytest.approx(token_mean)


@pytest.mark.parametrize("memory_rows", [0, 2, 4])
def test_micro_token_mean_loss_through_train_accumulation(tok, memory_rows):
    """LatentGRPO.loss with --loss-agg micro-token-mean, accumulated over --micro-batch-size chunks as train.grpo_step
    weights them (loss_normaliser shares), equals the loop reference; token-mean differs on unequal lengths."""
    algo = LatentGRPO(emitting(tok, 5), tok, Config(loss_agg="micro-token-mean", ppo_micro_batch_size=2),
                      add_tokens=False)
    lengths = [1, 5, 2, 2, 4, 3, 6, 1]
    ro = fake_rollout(lengths)
    gen = torch.Generator().manual_seed(0)
    N, L = len(lengths), max(lengths)
    old = torch.randn(N, L, generator=gen, dtype=torch.float64)
    adv = torch.randn(N, 1, generator=gen, dtype=torch.float64)
    new = (old + 0.1 * torch.randn(N, L, generator=gen, dtype=torch.float64)).requires_grad_(True)
    chunks = train.micro_batches(list(range(N)), memory_rows)
    total = algo.loss_normaliser(ro)
    value = 0.0
    for part in chunks:
        mb = rows_of(ro, part)
        weight = algo.loss_normaliser(mb) / total
        Lp = max(lengths[i] for i in part)
        loss, _ = algo.loss(new[part, :Lp], old[part, :Lp], None, adv[part], mb)
        (weight * loss).backward()
        value += weight * loss.item()
    # per-token dual-clip loss, then verl's aggregation by a loop
    ratio = torch.exp(new.detach() - old)
    per = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    per = torch.where(adv < 0, torch.minimum(per, -adv * 3.0), per)
    assert value == pytest.approx(ref_micro_token_mean(per.tolist(), lengths, 2))
    ref_new = new.detach().clone().requires_grad_(True)
    valid = torch.arange(L) < torch.tensor(lengths)[:, None]
    dual_clip_loss(ref_new, old, None, adv.expand(N, L), valid, 0.2, 0.2, 3.0, 0.0, 2)[0].backward()
    torch.testing.assert_close(new.grad, ref_new.grad)
    token_mean = sum(per[i, t].item() for i in range(N) for t in range(lengths[i])) / sum(lengths)
    assert value != pytest.approx(token_mean)


def test_micro_batch_size_must_hold_whole_loss_groups(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(train.UserError, match="--micro-batch-size"):
        train.main(["--algo", "latent_grpo", "--loss-agg", "micro-token-mean", "--ppo-micro-batch-size", "2",
                    "--micro-batch-size", "3", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--out", str(out)])
    assert not out.exists()


def test_preset_uses_the_official_rules():
    args, _, cfg = train.parse_args(["--preset", "latent-grpo-gsm8k-llama", "--model", "some/dir"])
    assert (cfg.loss_agg, cfg.ppo_micro_batch_size, cfg.train_reward) == ("micro-token-mean", 2, "verl-math")
    assert args.micro_batch_size % cfg.ppo_micro_batch_size == 0


# ---------------------------------------------------------------------------------------------------------------
# 2. the official training reward: verl math.compute_score
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, gold, official, lenient", [
    ("steps </think> The answer is \\boxed{18}", "18", 1.0, 1.0),
    ("\\boxed{3} then \\boxed{18}", "18", 1.0, 1.0),        # the last box
    ("\\boxed{18} then \\boxed{3}", "18", 0.0, 0.0),
    ("</think> #### 18", "18", 0.0, 1.0),                   # no #### fallback
    ("so it is 18", "18", 0.0, 1.0),                        # no last-number fallback
    ("\\boxed{1,000}", "1000", 0.0, 1.0),                   # commas are kept
    ("\\boxed{1,000}", "1,000", 1.0, 1.0),
    ("\\boxed{18.0}", "18", 0.0, 1.0),                      # no numeric tolerance
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0, 1.0),             # strip_string: 0.5 -> \frac{1}{2}
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0, 1.0),
    ("\\boxed{x = 18}", "18", 1.0, 1.0),                    # a short left-hand side is dropped
    ("\\boxed{18 \\text{ apples}}", "18", 1.0, 1.0),        # units
    ("\\boxed 18$ and more", "18", 1.0, 1.0),               # "\boxed " up to "$"
    ("\\fbox{18}", "18", 0.0, 1.0),                         # verl's remove_boxed rejects \fbox
    ("\\boxed{18", "18", 0.0, 1.0),                         # unbalanced: no box (the lenient rule's last number)
])
def test_verl_math_reward_on_hand_made_completions(text, gold, official, lenient):
    assert ev.verl_math_reward(text, gold) == official
    assert ev.math_reward(text, gold) == lenient


def test_training_reward_reads_the_whole_response(tok):
    """train.rollout_batch scores `reward_texts` (the whole response without special tokens) with the rule the
    algorithm names in `train_reward`; the eval rule and `texts` are not used."""
    algo = LatentGRPO(emitting(tok, 5), tok, Config(), add_tokens=False)
    assert algo.train_reward == "verl-math" and algo.answer_format == "math"
    stub = types.SimpleNamespace(train_reward=algo.train_reward, answer_format=algo.answer_format)
    texts = ["#### 7", "#### 7"]                                 # what eval would score: right under "math"
    reward_texts = ["latent 3 \\boxed{7}", "#### 7"]             # the official reward: only the boxed one
    ro = dataclasses.replace(fake_rollout([1, 1]), texts=texts, reward_texts=reward_texts)
    stub.rollout = lambda model, questions, G, generator: ro
    args = train.Args(num_prompts=1, num_generations=2)
    _, rewards, _ = train.rollout_batch(args, stub, types.SimpleNamespace(device=torch.device("cpu")), [{"question": "q", "answer": "7"}],
                                        None, __import__("random").Random(0))
    assert rewards.tolist() == [[1.0, 0.0]]


# ---------------------------------------------------------------------------------------------------------------
# 3, 4, 6. evaluation text, truncation at exactly the budget, the EOS set
# ---------------------------------------------------------------------------------------------------------------

def test_eos_on_the_last_position_is_truncated(tok):
    """verl's is_clipped: length == max_response_length, EOS counted. A model that emits EOS at once is truncated
    with a budget of 1 and not with a budget of 3, in the rollout and in the eval's length statistics."""
    eos = tok.eos_token_id
    for budget, truncated in ((1, True), (3, False)):
        model = emitting(tok, eos)
        algo = LatentGRPO(model, tok, Config(max_response_length=budget), add_tokens=False)
        ro = algo.rollout(model, ["1+1?", "2+2?"], 2, torch.Generator().manual_seed(0))
        assert ro.lengths.tolist() == [1] * 4
        assert ro.truncated.tolist() == [truncated] * 4
        res = ev.evaluate(algo, model, [{"question": "1+1?", "answer": "2"}], runs=1)
        assert res["frac_truncated"] == float(truncated)
        assert res["mean_length"] == (None if truncated else 1.0)


def test_eval_text_is_the_whole_output_with_special_tokens(tok):
    """The latent-grpo protocol scores the whole output decoded with skip_special_tokens=False (latent top-1 ids and
    </think> included, the stop token left out); the training reward reads it without special tokens."""
    end = tok.convert_tokens_to_ids(lg.END_THINK)
    model = emitting(tok, end)
    algo = LatentGRPO(model, tok, Config(max_response_length=3), add_tokens=False)
    ro = algo.generate(model, ["1+1?"], False, torch.Generator().manual_seed(0))
    y = ro.token_ids[0].tolist()
    assert y[0] == end and ro.num_latent.tolist() == [0]
    assert ro.texts[0] == tok.decode(y, skip_special_tokens=False) and lg.END_THINK in ro.texts[0]
    assert ro.reward_texts[0] == tok.decode(y, skip_special_tokens=True)


def test_stops_on_every_id_of_the_models_eos_set(tok):
    """generation_config / config eos_token_id may list several ids (LLaMA-3): any of them ends a response."""
    other = tok.convert_tokens_to_ids(tok.tokenize("7"))[0]
    assert other != tok.eos_token_id
    model = emitting(tok, other)
    model.config.eos_token_id = [0, other]
    model.generation_config.eos_token_id = [other]
    algo = LatentGRPO(model, tok, Config(max_response_length=4, latent=False), add_tokens=False)
    assert {tok.eos_token_id, 0, other} <= set(algo.eos_ids.tolist())
    ro = algo.rollout(model, ["1+1?"], 2, torch.Generator().manual_seed(0))
    assert ro.lengths.tolist() == [1, 1] and not ro.truncated.any()


def test_eos_ids_reads_every_source(tok):
    cfg = types.SimpleNamespace(eos_token_id=3)
    model = types.SimpleNamespace(config=cfg, generation_config=types.SimpleNamespace(eos_token_id=[4, 5]))
    assert lg.eos_ids(model, types.SimpleNamespace(eos_token_id=9)) == {3, 4, 5, 9}
    model = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_id=None), generation_config=None)
    assert lg.eos_ids(model, types.SimpleNamespace(eos_token_id=9)) == {9}


# ---------------------------------------------------------------------------------------------------------------
# 5. answer sampling: joint top-k and top-p
# ---------------------------------------------------------------------------------------------------------------

def ref_joint_law(z, T, top_p, top_k):
    """SGLang joint filter by a loop over the sorted tempered law: keep rank r if r < k (k = 0: any) and the full
    law's mass before it is < top_p; renormalise."""
    p = [math.exp(v / T) for v in z]
    total = sum(p)
    p = [v / total for v in p]
    order = sorted(range(len(z)), key=lambda v: -p[v])
    kept, before = {}, 0.0
    for r, v in enumerate(order):
        if (top_k == 0 or r < top_k) and before < top_p:
            kept[v] = p[v]
        before += p[v]
    s = sum(kept.values())
    return [kept.get(v, 0.0) / s for v in range(len(z))]


def law(z, T, top_p, top_k):
    p, order = answer_law(z[None], T, top_p, top_k)
    return torch.zeros(z.shape[-1], dtype=p.dtype).scatter(0, order[0], p[0] / p[0].sum()).tolist()


@FAST
@given(seed=SEEDS, V=st.integers(2, 30), T=st.floats(0.2, 2.0), top_p=st.floats(0.05, 1.0), top_k=st.integers(0, 8))
def test_joint_top_k_top_p_matches_loop(seed, V, T, top_p, top_k):
    z = 3 * torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert law(z, T, top_p, top_k) == pytest.approx(ref_joint_law(z.tolist(), T, top_p, top_k), abs=1e-12)


def test_joint_filter_is_not_top_k_first():
    """Law 0.4 / 0.3 / 0.2 / 0.1, k 2, p 0.5: the nucleus of the full law keeps two tokens; renormalising the top 2
    first (0.57 / 0.43) would keep one."""
    z = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    assert law(z, 1.0, 0.5, 2) == pytest.approx([4 / 7, 3 / 7, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------------------------
# 7. eval.py's explore policy: --noise-scale / --answer-top-k with the official defaults
# ---------------------------------------------------------------------------------------------------------------

def test_explore_policy_defaults_and_flags(tok):
    algo = LatentGRPO(emitting(tok, 5), tok, Config(noise_scale=0.1, answer_top_k=30), add_tokens=False)
    a = copy.copy(algo)
    assert ev.explore_policy(a, True, noise_scale=None, answer_top_k=None) == {"noise_scale": 1.0, "answer_top_k": 0}
    assert (a.cfg.noise_scale, a.cfg.answer_top_k) == (1.0, 0)
    a = copy.copy(algo)
    ev.explore_policy(a, True, noise_scale=0.5, answer_top_k=7)
    assert (a.cfg.noise_scale, a.cfg.answer_top_k) == (0.5, 7)
    a = copy.copy(algo)
    assert ev.explore_policy(a, False, noise_scale=None, answer_top_k=None) == {} and a.cfg is algo.cfg
    with pytest.raises(ValueError, match="--explore true"):
        ev.explore_policy(copy.copy(algo), False, noise_scale=1.0)
    with pytest.raises(ValueError, match="noise-scale"):
        ev.explore_policy(copy.copy(algo), True, noise_scale=-1.0)
    other = types.SimpleNamespace(cfg=dataclasses.make_dataclass("C", [("p", float, 0.1)])())
    assert ev.explore_policy(other, True) == {}
    with pytest.raises(ValueError, match="no such setting"):
        ev.explore_policy(other, True, noise_scale=1.0)


# ---------------------------------------------------------------------------------------------------------------
# 8. the prompt's <think>; FlipGrad at exactly A = 0
# ---------------------------------------------------------------------------------------------------------------

def test_template_ending_in_think_newline_gets_no_second_think(tok):
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    algo = LatentGRPO(emitting(tok, 5), t, Config(), add_tokens=False)
    assert algo.prompt_text("Q?") == "<|user|>" + lg.INSTRUCTION + "Q?<|assistant|><think>\n"


@FAST
@given(seed=SEEDS, V=st.integers(3, 20), K=st.integers(1, 6), beta=st.floats(0.01, 1.0))
def test_flipgrad_acts_at_exactly_zero_advantage(seed, V, K, beta):
    """Official `adv <= 0`: with A = 0 the policy term has no gradient, and with beta > 0 the k3 KL's gradient flows
    through the flipped proxy phi(-x) = x - e^x wherever x < 0. Reference: dKL/dl at the value times the gradient of
    the plain proxy mean."""
    K = min(K, V - 1)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, V, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(4)])
    x0 = 3 * torch.rand(4, K, generator=gen, dtype=torch.float64) - 1.5
    x0[:, 0] = -0.5                                   # at least one component with x < 0 in every row
    g = z.log_softmax(-1).gather(-1, ids) + x0
    ref_lp = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    A = torch.zeros(1, 4, dtype=torch.float64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    zz = z.clone().requires_grad_(True)
    ell = latent_logprob(zz, ids, g, A[0])[None]                                     # (1, 4)
    dual_clip_loss(ell, ell.detach(), ref_lp, A, valid, 0.2, 0.2, 3.0, beta)[0].backward()
    # reference: c = dloss/dl at l's value; then the plain proxy mean's gradient, scaled by c
    leaf = ell.detach().clone().requires_grad_(True)
    c = torch.autograd.grad(dual_clip_loss(leaf, ell.detach(), ref_lp, A, valid, 0.2, 0.2, 3.0, beta)[0], leaf)[0]
    zr = z.clone().requires_grad_(True)
    x = g - zr.log_softmax(-1).gather(-1, ids)
    proxy = torch.where(x < 0, x - torch.exp(x), -x - torch.exp(-x)).mean(-1)       # (4,)
    (c[0] * proxy).sum().backward()
    torch.testing.assert_close(zz.grad, zr.grad)
