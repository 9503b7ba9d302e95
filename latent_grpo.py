"""
Latent-GRPO (Deng et al., arXiv 2604.27998): GRPO for a model that reasons in soft tokens, in one file.

Read it beside `specs/latent_grpo.md` (the spec, written from the official code); every equation below
carries the spec section it comes from.

After the prompt's `<think>`, each reasoning step feeds back a *soft embedding*: a convex mix of the input embeddings
of K vocabulary tokens (3.1). Exploration comes from Gumbel noise on the log-probabilities that pick and weight those
K tokens; the policy "log-probability" of a latent step is a Gumbel log-density averaged over the K tokens (4). The
step whose top token is the first sub-token of `</think>` ends latent mode, and an ordinary text answer follows (3.3).
Latent and answer steps enter one clipped GRPO objective (5), with the paper's three fixes, each behind one flag:

    invalid_mask           truncated samples get advantage 0                                   (6.1)
    one_sided (+flip_grad) noise shifted to >= 0, so the advantage sign reaches every token    (6.2, 4)
    first_token_selection  one correct sample per group keeps its first-position advantage    (6.3)

Use (train.py and eval.py drive exactly these calls):

    algo = LatentGRPO(model, tokenizer, Config(), add_tokens=True)   # adds <think> </think> if missing
    loss = algo.sft_loss(model, algo.sft_batch(examples, stage))    # latent initialisation, stages 0..num_stages
    algo.start_rl(model)                                            # freeze embeddings + LM head (5.4)
    ro   = algo.rollout(model, questions, num_generations=8, generator=g)
    old  = algo.logprobs(model, ro)                                 # no grad, theta_old
    adv  = algo.advantages(rewards, ro, old)                        # rewards (P, G)
    loss, stats = algo.loss(algo.logprobs(model, ro, adv), old, None, adv, ro)

The latent initialisation is Latent-SFT (arXiv 2510.15522, `latent_sft.py`), as the official README requires: stage 0
is CoT SFT on `prompt<think>` + steps (one per line) + `</think> The answer is \\boxed{X}` + EOS ([I]: the boxed
answer is what verl's training reward reads); stages 1-4 are Latent-SFT's 1a, 1b, 1c and 2. `--latent-init standin`
keeps, as an ablation, a simpler curriculum: stage s replaces the first ceil(s/S * n_steps) steps, and every
c = `c_latent` of their tokens become ONE position whose input is the mean of those tokens' embeddings and whose
target, one position earlier, is the uniform distribution over the same c ids (soft cross-entropy).

Deliberate simplifications and choices, all [I] in the spec:
  * The forced-exit check (3.1 step 7) uses the configured end id, not the official hard-coded 524.
  * `max_latent_steps` caps the latent phase; a row that reaches it continues in ordinary token mode (it is not forced
    to emit `</think>`, so every recorded token stays on-policy). The default (-1) is no cap, as the official code.
  * The deterministic (evaluation) branch 3.2 also divides by tau_g; at the default tau_g = 1 it is the official rule.
  * As the official code: a latent step whose top token is EOS ends the response (spec 10); old log-probs are
    recomputed by teacher forcing, not taken from the sampler; hard-token log-probs ignore the sampler's top-k/top-p
    (spec 12.9).
  * Ours, not the official code's: the log-ratio is clamped to +-20 before exp, so that a zero advantage never meets
    an infinite ratio (the official verl fork takes exp of the raw log-ratio).
  * `latent=False` is the explicit-CoT GRPO baseline: every step is a sampled token, and the Latent-GRPO fixes are
    off whatever their flags say (invalid masking, first-token selection; one-sided noise and FlipGrad have no
    latent steps to act on). Std-normalised group advantage, dual clip and token-mean stay: that is plain GRPO.
  * Embeddings (input and LM head) are trainable during the SFT initialisation, where the new tokens must learn, and
    frozen by `start_rl(model)`, which train.py calls once before building the RL optimiser (5.4).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import compat
import decode
import latent_sft

THINK, END_THINK = "<think>", "</think>"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}.\n"


@dataclass
class Config:
    """Latent-GRPO's knobs. Defaults are the official GSM8K / LLaMA-3.2-1B script's (spec 7)."""

    # ---- the latent policy (spec 3.1) ----
    top_k: int = 10
    """K: vocabulary tokens mixed into one latent step (official max_topk)."""
    top_p_latent: float = 0.95
    """Nucleus mass (at temperature 1) of a latent step's candidate set; the top K are always kept."""
    noise_scale: float = 0.1
    """s: scale of the Gumbel noise on the latent log-probs during training rollouts (0 = no exploration). The
    released scripts use 1.0 (the yaml default is 0.5); 0.1 keeps the embedded default's small initialisation on its
    manifold (at 1.0 its rollouts fall from 35% to ~5% correct and RL collapses it; README)."""
    gumbel_temperature: float = 1.0
    """tau_g: a latent step's mixing weights are softmax(g / tau_g) of its K perturbed scores g."""
    one_sided: bool = True
    """One-sided noise (fix 2, spec 6.2): shift the clamped Gumbel noise by +1.5 so every perturbation is >= 0."""
    forced_exit: bool = True
    """Leave latent mode when the *unperturbed* top token is the end id, even if the noise moved it (spec 3.1.7)."""
    max_latent_steps: int = -1
    """Cap on latent steps per response (-1: none), <= max_response_length; a row reaching it goes on in token mode."""
    # ---- the answer phase (spec 3.3) ----
    temperature: float = 0.6
    """Sampling temperature of answer tokens; hard-token log-probs use it too (spec 4)."""
    top_p: float = 0.95
    """Nucleus mass for answer-token sampling, measured on the full tempered law and intersected with the top-k
    (SGLang's joint filter)."""
    answer_top_k: int = 30
    """Top-k for answer-token sampling in training rollouts (0 = off; the official eval uses none)."""
    max_response_length: int = 128
    """Generation budget: latent and answer positions together (spec 3.3). A response of exactly this length (EOS
    counted) is truncated, as verl's is_clipped."""
    # ---- the reward (spec 5) ----
    train_reward: str = "verl-math"
    """Training reward on the whole response decoded without special tokens (latent top-1 ids included):
    verl-math = the official verl math.compute_score (last \\boxed{} only, exact after strip_string); math = the
    lenient evaluation rule (boxed, else ####, else the last number; numbers within 1e-5)."""
    # ---- the objective (spec 5) ----
    epsilon: float = 0.2
    """PPO clip range below 1: ratios under 1 - epsilon are clipped (spec 5.3)."""
    epsilon_high: float = 0.2
    """PPO clip range above 1: ratios over 1 + epsilon_high are clipped (0.2: no clip-higher, spec 5.3)."""
    dual_clip: float = 3.0
    """c: for negative advantages the per-token loss is capped at -A * c (dual-clip PPO, spec 5.3)."""
    beta: float = 0.0
    """Coefficient of the k3 KL to the frozen reference (0 = off, as for GSM8K; the MATH script uses 0.001)."""
    loss_agg: str = "token-mean"
    """token-mean: one token mean over the mini-batch; micro-token-mean (official verl): the mean over consecutive
    groups of --ppo-micro-batch-size rows of each group's token mean (independent of --micro-batch-size)."""
    ppo_micro_batch_size: int = 2
    """micro-token-mean: rows per token mean (verl's ppo_micro_batch_size_per_gpu: 2 for GSM8K, 1 for MATH)."""
    freeze_embedding: bool = True
    """Freeze the input embeddings and the LM head during RL (spec 5.4); they still train during the SFT init."""
    # ---- the three fixes (spec 6) ----
    invalid_mask: bool = True
    """Fix 1 (spec 6.1): truncated ("invalid") samples get advantage 0 at every position."""
    exclude_truncated: bool = False
    """With invalid_mask: also leave truncated samples out of the group mean/std (the MATH script's 'exclude')."""
    flip_grad: bool = True
    """FlipGrad (spec 4): straight-through gradient phi(-x) for latent components with A <= 0 and x < 0."""
    first_token_selection: bool = True
    """Fix 3 (spec 6.3): only the best correct sample of a group keeps its advantage at the first position."""
    # ---- the latent initialisation (module docstring; latent_sft.py) ----
    latent_init: str = "latent-sft"
    """latent-sft: CoT SFT, then Latent-SFT steps 1a, 1b, 1c and stage 2 (latent_sft.py, the official start).
    standin (ablation): CoT SFT, then the uniform-superposition curriculum of --latent-stages stages."""
    c_latent: int = 2
    """c: CoT tokens compressed into one latent position (the chain gets about c x shorter)."""
    latent_sft_steps_1a: int = -1
    """Latent-SFT step 1a (encoder only): optimiser steps (-1: the loop's --sft-steps)."""
    latent_sft_steps_1b: int = -1
    """Latent-SFT step 1b (decoder only): optimiser steps (-1: the loop's --sft-steps)."""
    latent_sft_steps_1c: int = -1
    """Latent-SFT step 1c (encoder and decoder): optimiser steps (-1: the loop's --sft-steps)."""
    latent_sft_steps_2: int = -1
    """Latent-SFT stage 2 (decoder alone, KL + CE): optimiser steps (-1: the loop's --sft-steps)."""
    sft_noise_scale: float = 1.0
    """Latent-SFT stage 2: scale of the Gumbel augmentation of the teacher latents (0 = off; official 1.0)."""
    sft_gumbel_temperature: float = 1.0
    """Latent-SFT stage 2: temperature tau of the augmented teacher (official 1.0)."""
    latent_stages: int = 3
    """--latent-init standin only: S curriculum stages after CoT SFT; stage s replaces the first ceil(s/S * n_steps)
    CoT steps by latents."""
    latent: bool = True
    """False: explicit-CoT GRPO baseline with the same loop (no latent steps, Latent-GRPO fixes off)."""
    # ---- speed ----
    compile: str = "auto"
    """torch.compile the rollout's per-position forward (on a static KV cache), the log-probs and the loss: auto (on
    when the model is on CUDA) | true | false. The first calls compile (seconds to a minute); on CPU it rarely pays."""

    def __post_init__(self):
        checks = [
            (self.top_k >= 1, f"--top-k must be >= 1 (got {self.top_k})"),
            (self.noise_scale >= 0, f"--noise-scale must be >= 0 (got {self.noise_scale})"),
            (0 < self.top_p_latent <= 1, f"--top-p-latent must be in (0, 1] (got {self.top_p_latent})"),
            (self.gumbel_temperature > 0, f"--gumbel-temperature must be > 0 (got {self.gumbel_temperature})"),
            (self.temperature > 0, f"--temperature must be > 0 (got {self.temperature}); greedy is --answer-top-k 1"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})"),
            (self.answer_top_k >= 0, f"--answer-top-k must be >= 0 (got {self.answer_top_k})"),
            (self.max_response_length >= 1, f"--max-response-length must be >= 1 (got {self.max_response_length})"),
            (-1 <= self.max_latent_steps <= self.max_response_length,
             f"--max-latent-steps ({self.max_latent_steps}) must be -1 (no cap) or in [0, --max-response-length "
             f"({self.max_response_length})]"),
            (self.epsilon >= 0 and self.epsilon_high >= 0, "--epsilon and --epsilon-high must be >= 0"),
            (self.dual_clip > 1, f"--dual-clip must be > 1 (got {self.dual_clip})"),
            (self.beta >= 0, f"--beta must be >= 0 (got {self.beta})"),
            (self.loss_agg in ("token-mean", "micro-token-mean"),
             f"--loss-agg must be token-mean or micro-token-mean (got {self.loss_agg})"),
            (self.ppo_micro_batch_size >= 1, f"--ppo-micro-batch-size must be >= 1 (got {self.ppo_micro_batch_size})"),
            (self.train_reward in ("verl-math", "math"),
             f"--train-reward must be verl-math or math (got {self.train_reward})"),
            (self.c_latent >= 1, f"--c-latent must be >= 1 (got {self.c_latent})"),
            (self.latent_stages >= 0, f"--latent-stages must be >= 0 (got {self.latent_stages})"),
            (self.latent_init in ("latent-sft", "standin"),
             f"--latent-init must be latent-sft or standin (got {self.latent_init})"),
            (self.sft_noise_scale >= 0, f"--sft-noise-scale must be >= 0 (got {self.sft_noise_scale})"),
            (self.sft_gumbel_temperature > 0,
             f"--sft-gumbel-temperature must be > 0 (got {self.sft_gumbel_temperature})"),
            (min(self.latent_sft_steps_1a, self.latent_sft_steps_1b, self.latent_sft_steps_1c,
                 self.latent_sft_steps_2) >= -1, "--latent-sft-steps-* must be >= -1 (-1: --sft-steps)"),
            (self.compile in ("auto", "true", "false"), f"--compile must be auto, true or false (got {self.compile})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class Rollout:
    """N = P * G sampled responses, group-major (rows g*G .. g*G+G-1 answer question g). Every field is a list of
    length N or a tensor with first dim N, so train.py can select and concatenate rollouts field by field.
    The latent steps of a row are always a prefix of its response (T12): steps 0 .. num_latent-1."""

    prompt_ids: list[torch.Tensor]   # (P_i,) long: the prompt, ending with <think>
    token_ids: list[torch.Tensor]    # (L_i,) long: recorded id y_t of every position (latent: id_1 of its top-K)
    topk_ids: list[torch.Tensor]     # (num_latent_i, K) long: the K mixed ids of each latent step
    topk_scores: list[torch.Tensor]  # (num_latent_i, K) float: their perturbed scores g, sorted descending
    texts: list[str]                 # what evaluation scores: the whole response (latent top-1 ids included)
                                     # decoded with special tokens, the final stop token left out (spec 8)
    reward_texts: list[str]          # what the training reward reads: the whole response, no special tokens
    num_latent: torch.Tensor         # (N,) long: latent steps taken
    lengths: torch.Tensor            # (N,) long: generated positions, latent and token together
    truncated: torch.Tensor          # (N,) bool: length == max_response_length, EOS counted ("invalid", 6.1)


# ------------------------------------------------------------------------------------------------------------------
# The latent policy (spec 3): pure functions on plain tensors
# ------------------------------------------------------------------------------------------------------------------

def gumbel_noise(shape, one_sided: bool, noise_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Spec 3.1 step 2: clamped (optionally one-sided) Gumbel noise, one value per vocabulary entry."""
    # G = -log(E), E ~ Exp(1)  =>  G ~ Gumbel(0, 1);  G <- clip(G, -1.5, 3)
    G = -torch.empty(shape, device=generator.device).exponential_(generator=generator).log()
    G = G.clamp(-1.5, 3.0)
    if one_sided:
        # one-sided (6.2): G <- G + 1.5, so G in [0, 4.5]. Top-K and softmax ignore a common shift, so this changes
        # only the stored scores g, i.e. where the training density is evaluated (3.4)
        G = G + 1.5
    # G <- s * G
    return noise_scale * G


def latent_step(logits: torch.Tensor, noise: torch.Tensor, top_k: int, top_p: float, gumbel_temperature: float):
    """One latent step for a batch of rows (spec 3.1 steps 1, 3-5; noise = 0 gives the deterministic branch 3.2).
    logits (N, V), noise (N, V) or 0 -> ids (N, K), perturbed scores g (N, K) sorted descending, weights w (N, K)."""
    # L = log_softmax(z) at temperature 1 (the answer temperature is not applied in latent mode)
    logp = logits.log_softmax(-1)                                                      # (N, V)
    noise = torch.as_tensor(noise, dtype=logp.dtype, device=logp.device).expand_as(logp)
    # 3, 4 over the whole vocabulary first: S_v = L_v + G_v; (g_1..g_K, id_1..id_K) = topK(S)
    g, ids = (logp + noise).topk(top_k, dim=-1)                                        # (N, K)
    # 1. candidate set M = nucleus(p, top_p) U topK(p): v is in M when the mass of the tokens more probable than v
    # is < top_p, or fewer than K tokens are. M is an upper set of p, so when the least probable of the K picks is in
    # M, all of them are, and they are the top K over M too. Most rows pass this one test when the law is flat (the
    # nucleus is most of the vocabulary, which no sort should have to order); the others take the exact long way.
    p = logp.exp()
    above = p > p.gather(-1, ids).amin(-1, keepdim=True)                                # (N, V)
    in_M = ((p * above).sum(-1) < top_p) | (above.sum(-1) < top_k)                     # (N,)
    if not bool(in_M.all()):
        rows = (~in_M).nonzero()[:, 0]
        g[rows], ids[rows] = _top_k_in_nucleus(logp[rows], noise[rows], top_k, top_p)
    # 5. w = softmax(g / tau_g)
    w = (g / gumbel_temperature).softmax(-1)
    return ids, g, w


def _top_k_in_nucleus(logp: torch.Tensor, noise: torch.Tensor, top_k: int, top_p: float):
    """Spec 3.1 steps 1, 3, 4 by sorting: logp, noise (n, V) -> g, ids (n, K), the top K of S = L + G over M.
    Only the head of the law can be picked, so only the head is sorted (exact, and cheap for a peaked law): a token
    whose L lies more than the noise spread below the K-th largest L loses to each of the top K (all in M), and every
    token more probable than a head token is in the head, so the nucleus mass before it is exact."""
    spread = noise.amax(-1, keepdim=True) - noise.amin(-1, keepdim=True)              # (n, 1)
    line = logp.topk(top_k, dim=-1).values[:, -1:] - spread
    head, order = logp.topk(int((logp >= line).sum(-1).max()), dim=-1)                 # (n, m) descending
    return _top_k_of_head(head, order, noise.gather(-1, order), top_k, top_p)


def _top_k_of_head(head: torch.Tensor, order: torch.Tensor, noise: torch.Tensor, top_k: int, top_p: float):
    """Spec 3.1 steps 1, 3, 4 on the head of the law: head = L of the m most probable tokens, descending, order their
    ids, noise their G, all (n, m) -> g, ids (n, K). Every token more probable than a head token is in the head, so
    the head's running sum is the nucleus mass before each of its tokens exactly."""
    # 1. keep a token if the mass strictly before it is < top_p, and the K most probable
    p = head.exp()
    in_M = (p.cumsum(-1) - p) < top_p
    in_M[:, :top_k] = True
    # 3. S_v = L_v + G_v for v in M, -inf elsewhere; 4. topK(S)
    S = (head + noise).masked_fill(~in_M, -math.inf)
    g, j = S.topk(top_k, dim=-1)                                                       # (n, K)
    return g, order.gather(-1, j)


HEAD_MIN_VOCAB = 4096
"""sample_latent_step draws the noise for the head only from this vocabulary size on: below it a full-vocabulary op
costs its dispatch more than its passes, and the head's few extra ops cost more than the draws they save."""


def sample_latent_step(logits: torch.Tensor, top_k: int, top_p: float, gumbel_temperature: float, one_sided: bool,
                       noise_scale: float, generator: torch.Generator):
    """One latent step of a rollout (spec 3.1 steps 1-5): `latent_step` with the noise drawn, but only for the tokens
    that can be picked. The law of the result is exactly that of `latent_step(logits, gumbel_noise((N, V), ...))`:
    the noise is bounded and independent across tokens, and a token that cannot reach the top K whatever its noise
    never influences the result, so leaving its draw out changes nothing (tests/test_latent_grpo.py compares the two
    samplers' laws). noise_scale 0: the deterministic branch 3.2. logits (N, V) -> ids, g, w (N, K)."""
    N, V = logits.shape
    if not noise_scale:
        return latent_step(logits, 0.0, top_k, top_p, gumbel_temperature)
    if V >= HEAD_MIN_VOCAB:
        # gumbel_noise's range: G in [-1.5, 3] (+1.5 when one-sided), times s
        lo, hi = noise_scale * (-1.5 + 1.5 * one_sided), noise_scale * (3.0 + 1.5 * one_sided)
        # the reach: the K most probable tokens are in M (3.1 step 1) and score S_u >= L_(K) + lo each, so v can be
        # in topK(S) only if L_v + hi >= L_(K) + lo, i.e. z_v >= z_(K) - (hi - lo) (L = z - logsumexp z: the same
        # shift for every token, so the logits serve). 1e-4 more: room for the float32 rounding of L + G
        line = logits.topk(top_k, dim=-1).values[:, -1:] - (hi - lo) - 1e-4            # (N, 1)
        m = int((logits >= line).sum(-1).max())
        if 2 * m <= V:   # else most of the vocabulary is within reach (a flat law, a large s): draw over all of it
            return _sample_in_head(logits, m, top_k, top_p, gumbel_temperature, one_sided, noise_scale, generator)
    noise = gumbel_noise(logits.shape, one_sided, noise_scale, generator)
    return latent_step(logits, noise, top_k, top_p, gumbel_temperature)


def _sample_in_head(logits, m: int, top_k: int, top_p: float, gumbel_temperature: float, one_sided: bool,
                    noise_scale: float, generator):
    """sample_latent_step on the head: the m most probable tokens of each row, every reachable one among them (a
    row's tokens beyond its own reach get a draw they cannot use: independent draws, so the law is unchanged)."""
    head, order = logits.topk(m, dim=-1)                                               # (N, m) descending
    # L = log_softmax(z), for the head alone
    head = head - logits.logsumexp(-1, keepdim=True)
    # 2. G, for the head alone; 1, 3, 4. (g_1..g_K, id_1..id_K) = topK(L + G) over M
    g, ids = _top_k_of_head(head, order, gumbel_noise(head.shape, one_sided, noise_scale, generator).to(head.dtype),
                            top_k, top_p)
    # 5. w = softmax(g / tau_g)
    return ids, g, (g / gumbel_temperature).softmax(-1)


def soft_embedding(embedding: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spec 3.1 step 8: e = sum_k w_k E[id_k], a convex mix of K rows of the (V, d) embedding matrix.
    ids, weights (..., K) -> (..., d). The same function builds the rollout inputs, the training inputs and the
    SFT superpositions, so all three agree exactly (T1)."""
    dtype = torch.promote_types(weights.dtype, embedding.dtype)   # mix in at least float32, return E's dtype
    return (weights.to(dtype).unsqueeze(-1) * embedding[ids].to(dtype)).sum(-2).to(embedding.dtype)


def answer_law(logits: torch.Tensor, temperature: float, top_p: float, top_k: int):
    """The answer phase's sampling law (spec 3.3): temperature, then top-k (0 = off) and top-p jointly, as SGLang's
    filter_apply_order="joint": the nucleus is measured on the full tempered law, then intersected with the top k (not
    renormalised over the top k first). logits (N, V) -> unnormalised probabilities (N, C) of candidates (N, C)."""
    z = logits / temperature
    # candidates in descending order: the top-k when it is on (no full sort needed), else the whole vocabulary
    head, order = z.topk(min(top_k, z.shape[-1]), dim=-1) if top_k else z.sort(-1, descending=True)
    # p = softmax(z / T) over the whole vocabulary, read at the candidates
    p = (head - z.logsumexp(-1, keepdim=True)).exp()
    return p.masked_fill((p.cumsum(-1) - p) >= top_p, 0.0), order   # the top token always survives


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    """One draw from `answer_law` per row. logits (N, V) -> ids (N,)."""
    p, order = answer_law(logits, temperature, top_p, top_k)
    return order.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(-1)


# ------------------------------------------------------------------------------------------------------------------
# Log-probabilities in the importance ratio (spec 4)
# ------------------------------------------------------------------------------------------------------------------

def token_logprob(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hard step (spec 4). logits (..., V) in any float dtype, ids (...) -> (...) in at least float32, read at the
    one id without a (..., V) float32 copy (decode.selective_log_softmax)."""
    # l_t = log_softmax(z_t / T)[y_t]
    return decode.selective_log_softmax(logits, ids.unsqueeze(-1), temperature).squeeze(-1)


def latent_logprob(logits: torch.Tensor, topk_ids: torch.Tensor, topk_scores: torch.Tensor, advantages=None):
    """Latent step's surrogate log-density (spec 4), one value per position. logits (..., V), topk (..., K),
    advantages (...) or None. With advantages, FlipGrad reshapes the gradient; the value never changes (T5)."""
    return latent_density(decode.selective_log_softmax(logits, topk_ids), topk_scores, advantages)


def latent_density(logp_k: torch.Tensor, topk_scores: torch.Tensor, advantages=None) -> torch.Tensor:
    """latent_logprob from L_k = log_softmax(z)[id_k] already read at the K ids (..., K) -> (...)."""
    # x_k = g_k - L_k(theta), L at T = 1: the noise the current policy would have needed to produce the stored score
    # (at theta_old it is the rollout's noise)
    x = topk_scores - logp_k                                                           # (..., K)
    # phi(x) = -x - exp(-x): log-density of a standard Gumbel at x
    phi = -x - torch.exp(-x)
    if advantages is not None:
        # FlipGrad: where A <= 0 and x < 0, value phi(x) but gradient of phi(-x) = x - exp(x):
        # d/dL becomes e^x - 1 instead of 1 - e^-x (same sign, magnitude capped below 1; spec 4, T5)
        flip = (advantages.unsqueeze(-1) <= 0) & (x < 0)
        proxy = torch.where(flip, x - torch.exp(x), phi)
        phi = phi.detach() + (proxy - proxy.detach())       # the bracket is exactly 0: forward value unchanged
    # l_t = (1/K) sum_k phi(x_k)
    return phi.mean(-1)


# ------------------------------------------------------------------------------------------------------------------
# Advantages (spec 5.1, 6.1, 6.3): pure functions on (num_prompts, num_generations) tensors
# ------------------------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, truncated: torch.Tensor, exclude_truncated: bool) -> torch.Tensor:
    """Spec 5.1 with the 'exclude' statistics of 6.1. rewards, truncated (P, G) -> per-sample advantages (P, G).
    exclude_truncated: truncated members are left out of mean/std and get 0; else `truncated` is not used here."""
    member = ~truncated if exclude_truncated else torch.ones_like(truncated)
    n = member.sum(1, keepdim=True)                                                    # (P, 1)
    mu = (rewards * member).sum(1, keepdim=True) / n.clamp(min=1)
    # sigma: unbiased (Bessel) std over the members, as torch.std
    sigma = (((rewards - mu) ** 2 * member).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    # a group of one member: mu = 0, sigma = 1 (its advantage is its raw reward)
    one = n <= 1
    mu, sigma = mu.masked_fill(one, 0.0), sigma.masked_fill(one, 1.0)
    # A_i = (R_i - mu) / (sigma + 1e-6)
    A = (rewards - mu) / (sigma + 1e-6)
    return A.masked_fill(~member, 0.0)


def first_token_selection(advantages: torch.Tensor, mean_old_logprob: torch.Tensor) -> torch.Tensor:
    """Spec 6.3: the first-position advantages. advantages, mean_old_logprob (P, G) -> (P, G).
    Among members with A > 0 the one with the highest length-normalised old log-prob keeps its advantage at
    position 0; every other member gets 0 there. Groups with no positive member are unchanged."""
    candidate = advantages > 0
    winner = mean_old_logprob.masked_fill(~candidate, -math.inf).argmax(1)             # (P,)
    keep = F.one_hot(winner, advantages.shape[1]).bool() | ~candidate.any(1, keepdim=True)
    return advantages.masked_fill(~keep, 0.0)


# ------------------------------------------------------------------------------------------------------------------
# The objective (spec 5.3): a pure function on (N, L) tensors
# ------------------------------------------------------------------------------------------------------------------

def aggregate(x: torch.Tensor, valid: torch.Tensor, rows_per_mean: int = 0) -> torch.Tensor:
    """Loss aggregation (spec 5.3) of x over `valid` (N, L). rows_per_mean 0: one token mean over every valid
    position. rows_per_mean m: the rows in consecutive groups of m (the last may be shorter), a token mean inside
    each, then the mean over groups (verl: token mean per micro-batch, gradients summed / number of micro-batches)."""
    if not rows_per_mean:
        return _masked_mean(x, valid)
    N, L = x.shape
    pad = (-N) % rows_per_mean                        # padded rows have no valid position
    sums = F.pad(x * valid, (0, 0, 0, pad)).view(-1, rows_per_mean * L).sum(-1)
    counts = F.pad(valid.to(x.dtype), (0, 0, 0, pad)).view(-1, rows_per_mean * L).sum(-1)
    return (sums / counts).mean()


def dual_clip_loss(logprobs, old_logprobs, ref_logprobs, A, valid, epsilon: float, epsilon_high: float,
                   dual_clip: float, beta: float, rows_per_mean: int = 0):
    """Dual-clip PPO loss aggregated over `valid` (N, L) by `aggregate`, plus beta * k3 KL when beta > 0. A (N, L).
    -> loss, kl (0 when beta = 0), clip ratio: tensors only (no .item()), so torch.compile takes it as one graph."""
    # r_t = exp(l_t(theta) - l_t(theta_old)); the log-ratio is clamped to +-20 (ours; the official code does not
    # clamp), so that an advantage of 0 never meets an infinite ratio
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    # l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    l1, l2 = -A * ratio, -A * ratio.clamp(1 - epsilon, 1 + epsilon_high)
    per_token = torch.maximum(l1, l2)
    # dual clip: if A < 0, l = min(l, -A c)
    per_token = torch.where(A < 0, torch.minimum(per_token, -A * dual_clip), per_token)
    loss = aggregate(per_token, valid, rows_per_mean)
    kl = logprobs.new_zeros(())
    if beta > 0:
        # k3: kl = exp(l_ref - l) - (l_ref - l) - 1, clamped to [-10, 10]
        d = ref_logprobs - logprobs
        kl = aggregate((torch.exp(d) - d - 1).clamp(-10.0, 10.0), valid, rows_per_mean)
        loss = loss + beta * kl
    return loss, kl, aggregate((l2 > l1).float(), valid, rows_per_mean)


# ------------------------------------------------------------------------------------------------------------------
# The algorithm
# ------------------------------------------------------------------------------------------------------------------

class LatentGRPO:
    """Latent-GRPO behind the project's algorithm interface (the interface is in README.md)."""

    Config = Config
    answer_format = "math"   # evaluation: last \\boxed{}, else after ####, else the last number
    eval_protocol = "latent-grpo"   # eval.PROTOCOLS: this paper's evaluation (runs, explore)
    # the loop's defaults this method changes: the surrogate density needs a smaller step than Dropout-GRPO; the
    # embedded tiny model trains without GPT-2's native dropout (Latent-SFT's and Latent-GRPO's base models, LLaMA
    # and Qwen, have none; the 0.1 default is Coconut's GPT-2), and its CoT stage then passes its transition within
    # 2500 steps on most seeds (README, "Results on the embedded default", says how robustly)
    train_defaults = {"learning_rate": 3e-5, "dropout": 0.0, "cot_steps": 2500}
    _spare = None   # the last compiled rollout's StaticCache, reused by the next one of its shape (Config.compile)

    def __init__(self, model, tokenizer, cfg: Config, add_tokens: bool):
        # add_tokens=True (the initialisation is trained here): <think> / </think> become single tokens where missing.
        # add_tokens=False (a checkpoint used as it is): nothing is added, so the end id stays the checkpoint's own. A
        # released Latent-SFT tokenizer may split </think> (LLaMA-3: "</" "think" ">", end id 524 = "</", spec 2), so
        # each marker only has to encode to at least one known token; the end id is </think>'s first (spec 3, 12.5)
        missing = [t for t in (THINK, END_THINK) if t not in tokenizer.get_vocab()]
        if missing and add_tokens:
            self._add_tokens(model, tokenizer, missing)
        for marker in (THINK, END_THINK):
            ids = tokenizer.encode(marker, add_special_tokens=False)
            if not ids or ids[0] == tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer cannot encode {marker} (it gives {ids}), so there is no "
                    f"{'end-of-latent id' if marker == END_THINK else 'prompt end'}: use a Latent-SFT checkpoint's "
                    f"tokenizer, or add it with tokenizer.add_tokens([{marker!r}], special_tokens=True) and "
                    f"model.resize_token_embeddings(len(tokenizer)) (add_tokens=True does both)")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token: set tokenizer.eos_token before building LatentGRPO")
        vocab_size = model.get_output_embeddings().weight.shape[0]
        if cfg.top_k > vocab_size:
            raise ValueError(f"--top-k ({cfg.top_k}) exceeds the model's vocabulary ({vocab_size})")
        self.cfg, self.tokenizer = cfg, tokenizer
        # end-of-latent id = the FIRST sub-token of </think> (spec 3, end_id), looked up, never hard-coded
        self.end_id = tokenizer.encode(END_THINK, add_special_tokens=False)[0]
        self.eos_id = tokenizer.eos_token_id
        self.train_reward = cfg.train_reward   # the eval.REWARDS rule train.py scores rollouts with (spec 5)
        # generation stops on any of the model's end ids (LLaMA-3 has several), as the official SGLang sampler
        self.eos_ids = torch.tensor(sorted(eos_ids(model, tokenizer)))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # stage 0 is CoT SFT; then Latent-SFT's 1a, 1b, 1c, 2 (latent_sft.STAGES) or the stand-in's curriculum
        self.sft = None
        if cfg.latent and cfg.latent_init == "latent-sft":
            self.sft = latent_sft.LatentSFT(cfg.c_latent, cfg.top_k, self.end_id, self.eos_id, self.pad_id,
                                            cfg.sft_noise_scale, cfg.sft_gumbel_temperature)
        self.num_stages = (len(latent_sft.STAGES) if self.sft else cfg.latent_stages) if cfg.latent else 0
        self.stage = 0
        self.last_flip_frac = 0.0   # set by logprobs(advantages=...), reported by loss as latent/flip_frac

    @staticmethod
    def _add_tokens(model, tokenizer, tokens):
        """Add <think> / </think> as special tokens; their new embedding rows (input and output) start at the
        mean of the existing rows, a neutral point the SFT initialisation moves from."""
        n_old = len(tokenizer)
        tokenizer.add_tokens(tokens, special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for weight in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
                weight[n_old:len(tokenizer)] = weight[:n_old].mean(0)

    # ---- prompts (spec 2) ----

    def prompt_text(self, question: str) -> str:
        """Instruction + question, through the chat template when there is one, always ending with <think>."""
        text = INSTRUCTION + question
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the first generated position must be the first latent step (spec 2, 12.6)
        return text if text.rstrip().endswith(THINK) else text + THINK

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # ---- latent initialisation: CoT SFT, then Latent-SFT or the stand-in ablation (module docstring) ----

    def final_ids(self, answer: str) -> list[int]:
        """The answer target after the chain, `</think> The answer is \\boxed{X}` + EOS [I]: the training reward
        reads the last \\boxed{} (answer_format), so every SFT stage and the explicit mode end with one."""
        return self._encode(END_THINK + f" The answer is \\boxed{{{answer}}}") + [self.eos_id]

    def sft_stage_steps(self, stage: int) -> int | None:
        """Optimiser steps of an SFT stage when this algorithm sets them (Latent-SFT's per-step fields), else None:
        the loop's --cot-steps / --sft-steps."""
        if self.sft is None or stage == 0:
            return None
        cfg = self.cfg
        steps = [cfg.latent_sft_steps_1a, cfg.latent_sft_steps_1b, cfg.latent_sft_steps_1c, cfg.latent_sft_steps_2]
        return None if steps[stage - 1] < 0 else steps[stage - 1]

    def sft_parameters(self, model, stage: int) -> list:
        """The parameters an SFT stage trains, after the loop's model.train(). Stage 0 and the stand-in: every
        trainable weight of the model. Latent-SFT: its step's set, possibly of its own encoder (latent_sft.py)."""
        if self.sft is None or stage == 0:
            return [p for p in model.parameters() if p.requires_grad]
        return self.sft.parameters(model, stage)

    def sft_batch(self, examples: list[dict], stage: int) -> dict[str, torch.Tensor]:
        """Stage 0 and the stand-in's stages: see _standin_batch. Latent-SFT's stages: latent_sft.LatentSFT.batch."""
        if self.sft is None or stage == 0:
            return self._standin_batch(examples, stage)
        prompts = [self._encode(self.prompt_text(ex["question"])) for ex in examples]
        cots = [self._encode("".join(s + "\n" for s in ex["steps"])) for ex in examples]
        return self.sft.batch(prompts, cots, [self.final_ids(ex["answer"]) for ex in examples], torch.float32)

    def _standin_batch(self, examples: list[dict], stage: int) -> dict[str, torch.Tensor]:
        """Soft-token SFT sequences. Each position is a small set of ids with weights: one id with weight 1 for an
        ordinary token, c ids with weight 1/c for a latent position. Input = the weighted mean of their embeddings;
        target (one position earlier) = the same weights as a distribution over ids.
        -> ids, weights (B, T, c); attention_mask, target_mask (B, T) (target_mask: positions after the prompt)."""
        if not 0 <= stage <= self.num_stages:
            raise ValueError(f"stage {stage} is outside 0..{self.num_stages} (--latent-stages)")
        rows = []   # per example: (list of id groups, number of prompt positions)
        for ex in examples:
            steps = [s + "\n" for s in ex["steps"]]
            n_latent = math.ceil(stage * len(steps) / self.num_stages) if stage else 0
            cot = self._encode("".join(steps[:n_latent]))
            latent = [cot[i:i + self.cfg.c_latent] for i in range(0, len(cot), self.cfg.c_latent)]
            explicit = self._encode("".join(steps[n_latent:])) + self.final_ids(ex["answer"])
            prompt = self._encode(self.prompt_text(ex["question"]))
            rows.append(([[t] for t in prompt] + latent + [[t] for t in explicit], len(prompt)))
        B, T, c = len(rows), max(len(r) for r, _ in rows), max(len(grp) for r, _ in rows for grp in r)
        ids, sizes = torch.zeros(B, T, c, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
        target_mask = torch.zeros(B, T, dtype=torch.bool)
        for b, (groups, n_prompt) in enumerate(rows):
            ids[b, :len(groups)] = torch.tensor([grp + [0] * (c - len(grp)) for grp in groups])
            sizes[b, :len(groups)] = torch.tensor([len(grp) for grp in groups])
            target_mask[b, n_prompt:len(groups)] = True
        # uniform weights over each position's ids: 1 for an ordinary token, 1/size for a latent superposition
        weights = (torch.arange(c) < sizes[..., None]) / sizes.clamp(min=1)[..., None]              # (B, T, c)
        return {"ids": ids, "weights": weights, "attention_mask": (sizes > 0).long(), "target_mask": target_mask}

    def sft_loss(self, model, batch) -> torch.Tensor | dict[str, torch.Tensor]:
        """Soft cross-entropy -sum_v q_v log p_v, token-mean over the target positions (embeddings train here).
        Latent-SFT's stages: latent_sft.LatentSFT.loss (stage 2: its two terms by name)."""
        if "enc_ids" in batch:
            return self.sft.loss(model, batch, self.stage)
        b = {k: v.to(model.device) for k, v in batch.items()}
        x = soft_embedding(model.get_input_embeddings().weight, b["ids"], b["weights"])           # (B, T, d)
        logits = model(inputs_embeds=x, attention_mask=b["attention_mask"]).logits                # (B, T, V)
        # q at position t-1 = the weights of the ids at position t (one-hot for ordinary tokens); the last position
        # gets weight 0 (all T positions are read: a slice [:, :-1] of the logits would be copied)
        q, ids = F.pad(b["weights"][:, 1:], (0, 0, 0, 1)), F.pad(b["ids"][:, 1:], (0, 0, 0, 1))   # (B, T, c)
        # -sum_v q_v log p_v, read at the c ids of q's support only
        ce = -(q * decode.selective_log_softmax(logits, ids)).sum(-1)[:, :-1]                    # (B, T-1)
        mask = b["target_mask"][:, 1:]
        return (ce * mask).sum() / mask.sum()

    def sft_normaliser(self, batch) -> float | dict[str, float]:
        """What `sft_loss` divides by: its target positions (train.py sums it over ranks under torchrun).
        Latent-SFT's stages: latent_sft.LatentSFT.normaliser."""
        if "enc_ids" in batch:
            return self.sft.normaliser(batch, self.stage)
        return float(batch["target_mask"][:, 1:].sum())

    # ---- RL; the model is in eval() mode from here on ----

    def start_rl(self, model):
        """Called once when RL starts, before the optimiser is built: freeze the input embeddings and the LM head
        (5.4, freeze_embedding). Not at construction: the SFT initialisation must train the new tokens' rows."""
        if self.sft is not None:
            self.sft.drop_encoder()
        if self.cfg.freeze_embedding:
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                module.weight.requires_grad_(False)

    def _compiling(self, device: torch.device) -> bool:
        """Config.compile for the device a call runs on: auto = on CUDA only."""
        return self.cfg.compile == "true" or (self.cfg.compile == "auto" and device.type == "cuda")

    # ---- sampling (spec 3) ----

    @torch.no_grad()
    def rollout(self, model, questions: list[str], num_generations: int, generator: torch.Generator) -> Rollout:
        """Training rollouts: Gumbel latent steps, sampled answers."""
        return self._sample(model, questions, num_generations, generator, explore=True, top_k=self.cfg.answer_top_k)

    @torch.no_grad()
    def generate(self, model, questions: list[str], explore: bool, generator) -> Rollout:
        """One response per question. explore=False: the official evaluation (deterministic latent phase 3.2, answer
        at T 0.6 / top-p 0.95, no top-k). explore=True: the training policy (Gumbel latents), for pass@k."""
        top_k = self.cfg.answer_top_k if explore else 0
        return self._sample(model, questions, 1, generator, explore=explore, top_k=top_k)

    def _sample(self, model, questions, G, generator, explore: bool, top_k: int) -> Rollout:
        """Batched decode with a KV cache: every position costs one forward of all N rows, latent or not."""
        cfg, dev = self.cfg, model.device
        E = model.get_input_embeddings().weight                                        # (V, d)
        prompts = [torch.tensor(self._encode(self.prompt_text(q))) for q in questions]
        ids, mask = decode.left_pad(prompts, self.pad_id)                              # (P, Lp)
        ids, mask = ids.to(dev), mask.to(dev)
        position = (mask.cumsum(-1) - 1).clamp(min=0)   # explicit positions: left padding must not shift them
        # prefill each question once, then expand cache and logits over its G generations (group-major rows)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, **compat.cache_arg(model, cache), use_cache=True,
                    logits_to_keep=1)
        z = decode.wide(out.logits[:, -1]).repeat_interleave(G, 0)                     # (N, V)
        mask, position = mask.repeat_interleave(G, 0), position[:, -1:].repeat_interleave(G, 0)
        N, K, budget = z.shape[0], cfg.top_k, cfg.max_response_length
        compiled = self._compiling(dev)
        if compiled:
            # fixed shapes from here on: a static cache with a slot for every position but the last (never fed back)
            rows = torch.arange(len(prompts), device=dev).repeat_interleave(G)
            cache, mask = decode.static_cache(cache, rows, mask, budget - 1, model.config, self._spare)
            self._spare = cache
        else:
            cache.batch_repeat_interleave(G)
        latent_cap = (budget if cfg.max_latent_steps < 0 else cfg.max_latent_steps) if cfg.latent else 0
        noise_scale = cfg.noise_scale if explore else 0.0

        tokens = torch.full((N, budget), self.pad_id, dtype=torch.long, device=dev)
        # latent steps are a prefix, so latent step t is response position t
        topk_ids = torch.zeros(N, latent_cap, K, dtype=torch.long, device=dev)
        topk_scores = torch.zeros(N, latent_cap, K, dtype=z.dtype, device=dev)
        in_latent = torch.full((N,), latent_cap > 0, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        lengths = torch.zeros(N, dtype=torch.long, device=dev)
        num_latent = torch.zeros(N, dtype=torch.long, device=dev)
        for t in range(budget):
            soft = torch.zeros_like(in_latent)   # rows whose step t is a latent (soft) step
            y = torch.full_like(lengths, self.pad_id)
            if not in_latent.all():
                # token rows: ordinary sampling (3.3)
                y = sample_token(z, cfg.temperature, cfg.top_p, top_k, generator)
            if in_latent.any():
                ids_t, g, w = sample_latent_step(z, K, cfg.top_p_latent, cfg.gumbel_temperature, cfg.one_sided,
                                                 noise_scale, generator)
                # 3.3: leave latent mode when y = id_1 is the end id (3.1.7: or when the unperturbed argmax is)
                exit_ = ids_t[:, 0] == self.end_id
                if cfg.forced_exit:
                    exit_ |= z.argmax(-1) == self.end_id
                soft = in_latent & ~exit_
                # the exit step is a hard step: y = end_id, next input E[end_id]
                y = torch.where(soft, ids_t[:, 0], torch.where(in_latent, self.end_id, y))
                topk_ids[:, t], topk_scores[:, t] = ids_t, g
            active = ~done
            tokens[:, t] = y
            lengths += active
            num_latent += soft                              # finished rows are never in latent mode
            done |= active & torch.isin(y, self.eos_ids.to(dev))
            in_latent &= soft & ~done & (num_latent < latent_cap)   # leaving latent mode is permanent
            if done.all() or t == budget - 1:
                break
            # next input: the soft embedding after a latent step, E[y] after a hard one (spec 3.1.8, 3.3)
            x = torch.where(soft[:, None], soft_embedding(E, ids_t, w), E[y]) if soft.any() else E[y]
            mask, position = decode.next_attn(mask, cache), position + 1
            forward = decode.compiled_step if compiled else decode.step
            z = decode.wide(forward(model, cache, mask, inputs_embeds=x[:, None], position_ids=position)[1][:, -1])

        tokens, topk_ids, topk_scores, done = tokens.cpu(), topk_ids.cpu(), topk_scores.cpu(), done.cpu()
        lengths, num_latent = lengths.cpu(), num_latent.cpu()
        token_ids = [tokens[i, :lengths[i]] for i in range(N)]
        # the evaluation text leaves out the stop token that ended a row (SGLang's output text trims it)
        ended = [token_ids[i][:int(lengths[i]) - int(done[i])].tolist() for i in range(N)]
        return Rollout(
            prompt_ids=[p for p in prompts for _ in range(G)],
            token_ids=token_ids,
            topk_ids=[topk_ids[i, :num_latent[i]] for i in range(N)],
            topk_scores=[topk_scores[i, :num_latent[i]] for i in range(N)],
            texts=self.tokenizer.batch_decode(ended, skip_special_tokens=False),
            reward_texts=self.tokenizer.batch_decode([t.tolist() for t in token_ids], skip_special_tokens=True),
            num_latent=num_latent,
            lengths=lengths,
            truncated=lengths == budget,
        )

    # ---- log-probabilities (spec 4) ----

    def logprobs(self, model, rollout: Rollout, advantages=None) -> torch.Tensor:
        """Per-step log-probs (N, L), L = the longest response, zero past each row's length; float32 (float64 for
        a float64 model). One teacher-forced forward over prompt + response, fed the exact rollout embeddings
        rebuilt from the stored ids and scores (detached). advantages (N, >= L) or (N, 1) switch on FlipGrad."""
        cfg, dev = self.cfg, model.device
        N, L = len(rollout.token_ids), int(rollout.lengths.max())
        prompt, prompt_mask = decode.left_pad(rollout.prompt_ids, self.pad_id)         # (N, Lp)
        response, valid = decode.right_pad(rollout.token_ids, self.pad_id)              # (N, L)
        latent = torch.arange(L) < rollout.num_latent[:, None]                          # (N, L), a prefix (T12)
        mask = torch.cat([prompt_mask, valid.long()], 1).to(dev)
        topk_ids = torch.cat(rollout.topk_ids).to(dev)                                  # (n_latent, K)
        topk_scores = torch.cat(rollout.topk_scores).to(dev)                            # (n_latent, K)
        latent, valid, response = latent.to(dev), valid.to(dev), response.to(dev)

        E = model.get_input_embeddings().weight
        with torch.no_grad():   # the inputs are the rollout's, detached (spec 4)
            x = E[torch.cat([prompt.to(dev), response], 1)]                             # (N, Lp + L, d)
            x[:, prompt.shape[1]:][latent] = soft_embedding(
                E, topk_ids, (topk_scores / cfg.gumbel_temperature).softmax(-1))
        # logits at position t-1 score step t: keep the last L + 1 positions. All L + 1 go into the densities (the
        # last one with dummy ids, dropped after): a slice [:, :-1] of the (N, L + 1, V) logits would be copied
        logits = model(inputs_embeds=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=L + 1).logits                                    # (N, L + 1, V), model dtype
        # one selective log-softmax for every position, each reading what its own kind needs: a hard step its token
        # at the answer temperature (in all K slots, the first one used), a latent step its K ids at temperature 1.
        # One pass, so one (N, L + 1, V) gradient reaches the logits (one per kind would add a second of that size)
        K = cfg.top_k
        lat = F.pad(latent, (0, 1))                                                     # (N, L + 1)
        ids = F.pad(response, (0, 1))[..., None].repeat(1, 1, K)                        # (N, L + 1, K)
        ids[lat] = topk_ids
        scores = torch.zeros(N, L + 1, K, dtype=topk_scores.dtype, device=dev)
        scores[lat] = topk_scores
        T = torch.full((N, L + 1), cfg.temperature, dtype=torch.promote_types(logits.dtype, torch.float32),
                       device=dev).masked_fill(lat, 1.0)                             # (N, L + 1)
        logp = decode.selective_log_softmax(logits, ids, T)                             # (N, L + 1, K), >= float32

        # the per-kind formulas on the gathered values: compiled with dynamic shapes (Config.compile)
        density = decode.compiled(latent_density, dynamic=True) if self._compiling(dev) else latent_density
        hard = F.pad(valid & ~latent, (0, 1))
        ell = torch.where(hard, logp[..., 0], 0.0)                                      # l_t = log p_T(y_t)
        if latent.any():
            A = None
            if advantages is not None and cfg.flip_grad:
                A = F.pad(advantages[:, :L].to(dev, logp.dtype).expand(N, L), (0, 1))   # (N, L + 1)
                # how often FlipGrad acts, logged as latent/flip_frac: x_k = g_k - L_k at the latent steps
                x = (scores - logp.detach())[lat]                                       # (n_latent, K)
                self.last_flip_frac = ((A[lat][:, None] <= 0) & (x < 0)).float().mean().item()
            # elsewhere the latent formula reads L_k = 0 (finite, no gradient): a -inf log-prob there would make
            # FlipGrad's unused branch exp(x) infinite and its zero gradient NaN
            ell = torch.where(lat, density(torch.where(lat[..., None], logp, 0.0), scores, A), ell)
        ell = ell[:, :L]
        return ell

    # ---- advantages (spec 5.1, 6.1, 6.3) ----

    def advantages(self, rewards: torch.Tensor, rollout: Rollout, old_logprobs: torch.Tensor) -> torch.Tensor:
        """rewards (P, G) -> token advantages (N, L), L = old_logprobs.shape[1]."""
        cfg = self.cfg
        P, G = rewards.shape
        dev, (N, L) = old_logprobs.device, old_logprobs.shape
        mask_invalid = cfg.invalid_mask and cfg.latent
        truncated = rollout.truncated.to(dev).view(P, G) & mask_invalid
        # 5.1 (+ 6.1 exclude: stats over valid members only, truncated members 0 before selection)
        A = group_advantages(rewards.to(dev, old_logprobs.dtype), truncated, cfg.exclude_truncated)   # (P, G)
        # broadcast to every response position
        A_tok = A.reshape(N, 1).repeat(1, L)                                              # (N, L)
        if cfg.first_token_selection and cfg.latent:
            # 6.3: winner = argmax over positive members of mean_t l_t(theta_old) over valid positions
            valid = torch.arange(L, device=dev) < rollout.lengths.to(dev)[:, None]
            mean_old = (old_logprobs * valid).sum(1) / rollout.lengths.to(dev)
            A_tok[:, 0] = first_token_selection(A, mean_old.view(P, G)).reshape(N)
        if mask_invalid:
            # 6.1 include variant: zeroed after selection (a truncated winner leaves the group no first-step update)
            A_tok[truncated.reshape(N)] = 0.0
        return A_tok

    # ---- objective (spec 5.3) ----

    def loss(self, logprobs, old_logprobs, ref_logprobs, advantages, rollout: Rollout):
        """Dual-clip PPO loss over every valid position (latent and hard alike, truncated included), aggregated by
        --loss-agg: one token mean, or the mean of per-micro-batch token means (consecutive rows of `rollout`)."""
        cfg = self.cfg
        N, L = logprobs.shape
        valid = (torch.arange(L) < rollout.lengths[:, None]).to(logprobs.device)
        A = advantages[:, :L].to(logprobs.device).expand(N, L)
        objective = decode.compiled(dual_clip_loss, dynamic=True) if self._compiling(logprobs.device) else dual_clip_loss
        loss, kl, clip_ratio = objective(logprobs, old_logprobs, ref_logprobs, A, valid, cfg.epsilon,
                                         cfg.epsilon_high, cfg.dual_clip, cfg.beta, self.rows_per_mean)
        masked_invalid = rollout.truncated.float().mean().item() if cfg.invalid_mask and cfg.latent else 0.0
        return loss, {
            "clip_ratio": clip_ratio.item(),
            "kl": kl.item(),
            "latent/flip_frac": self.last_flip_frac,
            "adv/frac_masked_invalid": masked_invalid,
        }

    @property
    def rows_per_mean(self) -> int:
        """Rows per token mean of the loss: 0 = the whole batch (token-mean), else --ppo-micro-batch-size. A
        --micro-batch-size chunk must hold whole groups of these rows (train.py checks loss_row_multiple)."""
        return self.cfg.ppo_micro_batch_size if self.cfg.loss_agg == "micro-token-mean" else 0

    def loss_normaliser(self, rollout: Rollout) -> float:
        """What `loss` divides by (5.3): token-mean, every valid position of the batch; micro-token-mean, its number
        of row groups. train.py weights a micro-batch's loss by its share of the mini-batch's normaliser, so the
        accumulated gradient is the same."""
        if self.rows_per_mean:
            return float(math.ceil(len(rollout.lengths) / self.rows_per_mean))
        return float(rollout.lengths.sum())

    def metrics(self, rollout: Rollout) -> dict[str, float]:
        """Chain length and latent health, logged every step (the latent chain can collapse during RL)."""
        n_latent = rollout.num_latent.float()
        scores = torch.cat(rollout.topk_scores)                                        # (n_latent, K)
        w = (scores / self.cfg.gumbel_temperature).softmax(-1)
        return {
            "latent/mean_steps": n_latent.mean().item(),
            "latent/frac_latent": (n_latent.sum() / rollout.lengths.sum()).item(),
            "latent/never_exited": (rollout.num_latent == rollout.lengths).float().mean().item(),
            "latent/topk_entropy": torch.special.entr(w).sum(-1).mean().item() if len(w) else 0.0,
        }


def eos_ids(model, tokenizer) -> set[int]:
    """Every end-of-sequence id: the model's generation_config.eos_token_id and config.eos_token_id (an id or a
    list) and the tokenizer's."""
    found = {tokenizer.eos_token_id}
    for source in (getattr(model, "generation_config", None), model.config):
        ids = getattr(source, "eos_token_id", None)
        found |= set(ids) if isinstance(ids, (list, tuple)) else {ids}
    return found - {None}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()
