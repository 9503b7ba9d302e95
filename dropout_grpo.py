"""
Dropout-GRPO (arXiv 2606.10184) on a Coconut latent-reasoning model, in one file.

Coconut (Hao et al. 2024) reasons in "continuous thoughts": the last hidden state is fed back as the next input
embedding. For fixed weights and prompt that latent phase is deterministic, so the G rollouts of a GRPO group share
one latent trajectory and the group advantage collapses to zero (§3.1). Dropout-GRPO draws one Bernoulli dropout
mask per rollout, holds it fixed over every latent step (by default over the whole rollout), stores its integer
seed and replays the very same mask whenever log-probabilities are recomputed for the update. Each masked network is
one weight sample of MC dropout, so GRPO with a mean-centred advantage climbs the expected reward of the
Bayesian-model-average policy, unbiased up to the group factor (G-1)/G (§4.5).

§ numbers refer to the implementation spec (specs/dropout_grpo.md); read the two side by side:

    §2   Coconut: special tokens, curriculum SFT, the latent recurrence with a KV cache
    §3.2 the shared mask: sites as forward hooks, drawn from a per-rollout seed, replayed bit for bit
    §3.4 rollout   §3.6 group advantage   §3.7 clipped loss   §3.8 replay   §3.9 gradient through every thought

train.py and eval.py drive this file through `DropoutGRPO` only:

    algo = DropoutGRPO(model, tokenizer, Config(p=0.1), add_tokens=True)
    algo.stage = algo.num_stages                       # after the curriculum: c_thought * max_latent_stage thoughts
    ro = algo.rollout(model, questions, 8, generator)  # model.eval(): masks, not native dropout, make the noise
    adv = algo.advantages(rewards, ro, None)           # rewards (P, G) scored from ro.texts
    old = algo.logprobs(model, ro).detach()
    loss, stats = algo.loss(algo.logprobs(model, ro), old, None, adv, ro)

Deliberate simplifications: answers are sampled at top-p 1.0 (no nucleus cut); thoughts are fed back raw (no
projection, as Coconut); attention-probability dropout is never a mask site (§3.2 (c)); a rollout batch has one
number of thoughts (one curriculum stage).
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, StaticCache

import decode

# §2.1: <bot> opens the latent phase, <latent> holds a thought's place in SFT sequences, <eot> closes it.
# Coconut's own names come first: a tokenizer that already has them (a Coconut checkpoint) keeps its rows.
TOKEN_NAMES = {"bot": ("<|start-latent|>", "<bot>"), "eot": ("<|end-latent|>", "<eot>"),
               "latent": ("<|latent|>", "<latent>")}
_instance_ids = itertools.count()   # marks which DropoutGRPO's hooks a model carries (ints survive deepcopy as is)


@dataclass
class Config:
    """Dropout-GRPO's knobs. Defaults are the spec's recommended defaults for a real run (§5)."""

    p: float = 0.05
    """Drop probability of the per-rollout Bernoulli mask (§3.2); 0 turns latent exploration off (Temp-GRPO). The
    paper's value is unknown (§7 Q4); 0.05 is the best of the spec's sweep range on the default task (README)."""
    mask_sites: str = "native"
    """Where the mask acts (§3.2): native (block-0 input and every attention / MLP output projection, i.e. GPT-2's
    embd + resid dropout) | latent_vec (the fed-back thought only) | mlp_hidden (the MLP hidden units)."""
    mask_scope: str = "rollout"
    """rollout: prompt, thoughts, <eot> and answer all use the mask | latent_only: prompt and thoughts only (§3.2)."""
    mask_mode: str = "shared"
    """shared: one mask for the whole rollout (the paper) | per_step: a fresh mask for the prefill, each thought
    and the answer pass (ablation, §3.12)."""
    method: str = "coconut"
    """Coconut's training rows (its run.py flags): coconut (the latent curriculum) | cot (stage 0 only: the chain of
    thought, no markers) | no_cot (the answer alone: no steps, no thoughts, no markers)."""
    c_thought: int = 2
    """Continuous thoughts per replaced reasoning step (Coconut's c, §2.1); 0 = Coconut's "w/o thought" (its
    `no_thoughts`: the curriculum drops steps, no thought replaces them, and no <bot> <eot> markers)."""
    max_latent_stage: int = 3
    """Reasoning steps replaced by thoughts at the last latent stage (Coconut's S_max, §2.4)."""
    temperature: float = 1.0
    """Sampling temperature of rollout answers (§3.4); log-probs are taken at the same temperature."""
    max_new_tokens: int = 64
    """Answer-token budget after <eot> (§2.3); also L_max of the constant loss normaliser (§3.7)."""
    adv_mode: str = "mean"
    """Group advantage (§3.6): mean (r - mean r, the paper) | loo (leave-one-out, exactly unbiased) | std
    (DeepSeek GRPO, biased; ablation only)."""
    norm: str = "const"
    """Loss normaliser (§3.7): const (rows * max_new_tokens, keeps the estimator unbiased) | tokens (token mean)."""
    epsilon: float = 0.2
    """PPO clip range of the probability ratio (§3.7)."""
    beta: float = 0.0
    """k3 KL coefficient towards the reference model (§3.7); 0 = no reference model."""
    ref_masked: bool = True
    """Evaluate the reference model under each rollout's own mask (common random numbers, §3.7)."""
    compile: str = "auto"
    """torch.compile the rollout's per-position forward (on a static KV cache) and the loss: auto (on when the model
    is on CUDA) | true | false. The first calls compile (seconds to a minute); on CPU it rarely pays for itself."""

    def __post_init__(self):
        choices = {"method": ("coconut", "cot", "no_cot"), "mask_sites": ("native", "latent_vec", "mlp_hidden"), "mask_scope": ("rollout", "latent_only"),
                   "mask_mode": ("shared", "per_step"), "adv_mode": ("mean", "loo", "std"),
                   "norm": ("const", "tokens"), "compile": ("auto", "true", "false")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        bounds = [("p", 0 <= self.p < 1, "in [0, 1)"), ("c_thought", self.c_thought >= 0, ">= 0"),
                  ("max_latent_stage", self.max_latent_stage >= 0, ">= 0"),
                  ("temperature", self.temperature > 0, "> 0"), ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                  ("epsilon", 0 < self.epsilon < 1, "in (0, 1)"), ("beta", self.beta >= 0, ">= 0")]
        for name, ok, want in bounds:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {want}, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------------------
# Pure maths on plain tensors: the mask (§3.2), the group advantage (§3.6), the clipped loss (§3.7)
# ---------------------------------------------------------------------------------------------------------------

def sample_mask(seed: int, widths: list[int], p: float) -> list[Tensor]:
    """One rollout's masks, one per site of width `widths[s]`, in that order, already scaled by 1 / (1 - p).

    A private CPU generator makes the draw a function of `seed` alone: independent of the global RNG, the device
    and train()/eval(), so the update replays it bit for bit from the stored integer.
    """
    gen = torch.Generator().manual_seed(seed)
    # §3.2: m^(s) ∈ {0,1}^{d_s}, iid Bernoulli(1-p) (keep when u >= p); z ↦ z ⊙ m / (1-p), so E[m / (1-p)] = 1
    return [(torch.rand(d, generator=gen) >= p).double() / (1 - p) for d in widths]


def group_advantages(rewards: Tensor, mode: str) -> Tensor:
    """(P, G) rewards -> (P, G) advantages (§3.6). A one-sample group has no baseline: advantage 0."""
    rewards = decode.wide(rewards)
    G = rewards.shape[1]
    if G == 1:
        return torch.zeros_like(rewards)
    # §3.6: A_k = r_k − r̄,  r̄ = (1/G) Σ_j r_j      (E[g] = (G−1)/G ∇J, §4.5)
    centred = rewards - rewards.mean(1, keepdim=True)
    if mode == "mean":
        return centred
    if mode == "loo":
        # §3.6: A_k = G/(G−1) (r_k − r̄) = r_k − mean_{j≠k} r_j      (the baseline ignores r_k: exactly unbiased)
        return centred * G / (G - 1)
    if mode == "std":
        # §3.6: A_k = (r_k − r̄) / (std(r) + ε), Bessel std, ε = 1e-6   (biased across prompts, §4.5: ablation)
        return centred / (rewards.std(1, keepdim=True) + 1e-6)
    raise ValueError(f"--adv-mode must be one of mean, loo, std, got {mode!r}")


def clipped_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, adv: Tensor, mask: Tensor,
                 epsilon: float, beta: float, denom: float | Tensor,
                 compiled: bool = False) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate plus k3 KL of §3.7 over the scored steps `mask` (N, L), divided by `denom`.
    compiled: the maths runs under torch.compile (Config.compile)."""
    terms = decode.compiled(_clipped_terms, dynamic=True) if compiled else _clipped_terms
    loss, kl, clip_ratio, ratio_mean = terms(logp, old_logp, ref_logp, adv, mask, epsilon, beta, denom)
    stats = {} if kl is None else {"kl": kl.item()}
    return loss, {**stats, "clip_ratio": clip_ratio.item(), "ratio_mean": ratio_mean.item()}


def _clipped_terms(logp, old_logp, ref_logp, adv, mask, epsilon, beta, denom):
    """clipped_loss as tensors: the loss, and the mean k3 KL (None without a reference), clip ratio and mean ratio
    over the scored steps. Masked sums rather than boolean indexing, so that torch.compile sees one static graph."""
    # §3.7: ρ_{k,j} = exp(ℓ^θ_{k,j} − ℓ^old_{k,j}), both under the replayed mask m_k
    ratio = torch.exp(logp - old_logp)                                             # (N, L)
    # §3.7: L_pg = −(1/N) Σ_k Σ_j min(ρ_{k,j} A_k, clip(ρ_{k,j}, 1−ε, 1+ε) A_k)
    per_step = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    scored = mask.sum()

    def mean(x):                                                                   # over the scored steps
        return torch.where(mask, x.detach(), 0).sum() / scored

    kl_mean = None
    if ref_logp is not None:
        # §3.7: L_kl = (1/N) Σ_k Σ_j [exp(ℓ^ref − ℓ^θ) − (ℓ^ref − ℓ^θ) − 1]     (k3, ≥ 0)
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_step = per_step + beta * kl
        kl_mean = mean(kl)
    loss = torch.where(mask, per_step, 0).sum() / denom
    # the clip binds where ρ left [1−ε, 1+ε] on the side the advantage pushes towards: those steps get no gradient
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    return loss, kl_mean, mean(clipped.double()), mean(ratio)


# ---------------------------------------------------------------------------------------------------------------
# §3.2 Where the mask acts: sites on GPT-2 and Llama / Qwen2 models, as forward hooks
# ---------------------------------------------------------------------------------------------------------------

def _blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: GPT-2 calls them `h`, Llama / Qwen2 `layers`."""
    for name in ("h", "layers"):
        if hasattr(model.base_model, name):
            return getattr(model.base_model, name)
    raise ValueError(f"{type(model).__name__}: no decoder blocks found (expected base_model.h or .layers)")


def _submodule(block: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for name in names:
        try:
            return block.get_submodule(name)
        except AttributeError:
            pass
    raise ValueError(f"{type(block).__name__}: none of {names} found")


ATTN_OUT = ("attn.c_proj", "self_attn.o_proj")     # GPT-2 | Llama, Qwen2: attention output projection
MLP_OUT = ("mlp.c_proj", "mlp.down_proj")          # GPT-2 | Llama, Qwen2: MLP output projection


def mask_sites(model: nn.Module, kind: str) -> list[tuple[nn.Module, bool, int]]:
    """The sites of `kind` in their fixed order (§3.2), as (module, masks the module's input?, width).

    A per-feature mask on a projection's output zeroes rows of that projection (§3.2 (b)), so every masked network
    is one weight sample. "latent_vec" has no module site: the recurrence masks the thought itself.
    """
    blocks, d = _blocks(model), model.get_input_embeddings().embedding_dim
    if kind == "native":
        # GPT-2's embedding dropout output is the input of block 0; its two resid dropouts sit on the projections
        sites = [(blocks[0], True, d)]
        for block in blocks:
            sites += [(_submodule(block, ATTN_OUT), False, d), (_submodule(block, MLP_OUT), False, d)]
        return sites
    if kind == "mlp_hidden":
        outs = [_submodule(block, MLP_OUT) for block in blocks]
        # the MLP hidden units are the output projection's input: nn.Linear (out, in), GPT-2's Conv1D (in, out)
        return [(m, True, m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]) for m in outs]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Rollouts (padding and the cached forward are decode.py's)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """N rows, group-major: rows g*G .. g*G+G-1 are question g's G rollouts. Every field is a list of length N or
    a tensor with first dim N (ragged data stays a list of 1-D tensors), so rollouts select and concatenate field
    by field. Everything the update needs to replay a row exactly is here: prompt, mask seed, answer tokens."""

    texts: list[str]
    """decoded answer after <eot>, special tokens dropped: what the reward reads"""
    num_latent: Tensor
    """(N,) long: continuous thoughts T"""
    lengths: Tensor
    """(N,) long: generated positions, thoughts and answer tokens together"""
    truncated: Tensor
    """(N,) bool: the answer hit max_new_tokens without EOS"""
    prompt_ids: list[Tensor]
    """question + "\\n" tokens + <bot>"""
    answer_ids: list[Tensor]
    """sampled tokens after <eot>, the EOS included when emitted"""
    mask_seed: Tensor
    """(N,) long: the seed of the row's mask (§3.2); -1 = no mask (the evaluation policy)"""
    group_size: Tensor
    """(N,) long: G, the size of the row's group"""
    sampler_logprobs: list[Tensor]
    """log π(y_j | ...) the sampler used, at `temperature`; the update recomputes them by replay (§3.8)"""
    last_hidden: Tensor
    """(N, d) float: h_T, the last hidden state of the latent phase (for dropout/latent_spread)"""


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / τ) over the whole vocabulary, for the sampler; the replay reads the same law at the
    sampled ids alone (decode.selective_log_softmax)."""
    return torch.log_softmax(decode.wide(logits) / temperature, -1)


def _remove_hooks(model: nn.Module) -> None:
    """Remove every mask hook a DropoutGRPO installed on `model` (they carry the `dropout_grpo_site` tag)."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if getattr(fn, "dropout_grpo_site", False)]:
                del hooks[key]


def _require_eval(model: nn.Module) -> None:
    """Rollouts and replay need model.eval(): native dropout draws a fresh mask per position and per call, which
    the stored seed cannot replay (§3.8); the noise must come from the seeded masks alone."""
    if model.training:
        raise ValueError(f"{type(model).__name__} is in training mode: call model.eval() before a rollout or "
                         f"log-probs (native dropout would break the replay)")


class DropoutGRPO:
    """Dropout-GRPO on Coconut: the interface train.py and eval.py use (the interface is in README.md)."""

    Config = Config
    answer_format = "coconut"
    eval_protocol = "coconut"   # eval.PROTOCOLS: this paper's evaluation (runs, explore)

    def __init__(self, model, tokenizer, cfg: Config, add_tokens: bool):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        # stages 1..S_max replace steps; stage S_max+1 drops them all. cot / no_cot train stage 0 only
        self.num_stages = cfg.max_latent_stage + 1 if cfg.method == "coconut" else 0
        # Coconut's no_special_marker: no <bot> <eot> around zero thoughts (w/o thought, cot, no_cot)
        self.markers = cfg.method == "coconut" and cfg.c_thought > 0
        self.stage = 0
        self.bot_id, self.eot_id, self.latent_id = self._special_tokens(model, tokenizer, add_tokens)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = self.eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self.widths = ([w for *_, w in mask_sites(model, cfg.mask_sites)]
                       or [model.get_input_embeddings().embedding_dim])         # latent_vec: the thought's width
        self._active = None       # the per-site (B, d) masks of the forward call in flight; None = identity
        self._spare = None        # the last compiled rollout's StaticCache, reused by the next one of its shape
        self._id = next(_instance_ids)
        self._install_hooks(model)

    # ---- §2.1 tokens --------------------------------------------------------------------------------------------

    @staticmethod
    def _special_tokens(model, tokenizer, add_tokens: bool) -> list[int]:
        vocab = tokenizer.get_vocab()
        names = [coconut if coconut in vocab else ours for coconut, ours in TOKEN_NAMES.values()]
        missing = [n for n in names if n not in vocab]
        if missing and not add_tokens:
            raise ValueError(f"the tokenizer has no {missing[0]!r} token (nor Coconut's name for it): start from a "
                             f"Coconut or Dropout-GRPO checkpoint, or from a run that trains the latent initialisation "
                             f"and adds it (DropoutGRPO(..., add_tokens=True))")
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            new = tokenizer.convert_tokens_to_ids(missing)
            out = model.get_output_embeddings()
            with torch.no_grad():
                # §2.1: a new row starts as a copy of "<<" (Coconut), else the mean of the old rows; the LM head is
                # tied in GPT-2 and gets the same copy; an untied head copies its own "<<" row
                for w in {model.get_input_embeddings().weight, *([out.weight] if out is not None else [])}:
                    w[new] = (w[vocab["<<"]] if "<<" in vocab else w[:len(vocab)].mean(0)).clone()
        return tokenizer.convert_tokens_to_ids(names)

    # ---- §3.2 mask sites as hooks -------------------------------------------------------------------------------

    def _install_hooks(self, model):
        """Hooks at every site. They read `self._active` and are the identity while it is None: SFT (native dropout,
        train mode) and evaluation run the original model. Hooks are closures, which deepcopy shares, so a reference
        model made by copy.deepcopy(model) is masked by the same mask; a model without them gets them lazily.
        A model carries one DropoutGRPO's hooks at a time: any earlier set (another instance's, or this one's own)
        is removed first, so two instances on one model never apply a mask twice."""
        _remove_hooks(model)

        def masked(i, x):                                       # x (B, L, d_i) * mask (B, 1, d_i)
            return x * self._active[i][:, None, :]

        for i, (module, on_input, _) in enumerate(mask_sites(model, self.cfg.mask_sites)):
            if on_input:
                def pre_hook(mod, args, kwargs, i=i):
                    if self._active is None:
                        return None
                    if args:
                        return (masked(i, args[0]), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": masked(i, kwargs["hidden_states"])}
                pre_hook.dropout_grpo_site = True
                module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            else:
                def hook(mod, args, out, i=i):
                    return None if self._active is None else masked(i, out)
                hook.dropout_grpo_site = True
                module.register_forward_hook(hook)
        model._dropout_grpo_owner = self._id

    @contextmanager
    def _masked(self, masks: list[Tensor] | None):
        self._active = masks
        try:
            yield
        finally:
            self._active = None

    def _masks(self, seeds: Tensor, T: int, model) -> list[list[Tensor]] | None:
        """Per-call masks of a batch: for each of the rollout's T + 2 forward calls (prefill, T thoughts, the
        <eot> + answer pass) a list of per-site (N, d) masks. None when no row has a mask."""
        if bool((seeds < 0).all()):
            return None
        if getattr(model, "_dropout_grpo_owner", None) != self._id:
            self._install_hooks(model)
        # §3.12 per_step: the calls' masks are consecutive draws of the row's one seeded stream, so replay still works
        draws = T + 2 if self.cfg.mask_mode == "per_step" else 1
        widths = self.widths * draws
        rows = [sample_mask(s, widths, self.cfg.p) if s >= 0 else [torch.ones(d, dtype=torch.float64) for d in widths]
                for s in seeds.tolist()]
        flat = [torch.stack(col).to(model.device, model.dtype) for col in zip(*rows)]     # draws*S x (N, d)
        S = len(self.widths)
        calls = [flat[c * S:(c + 1) * S] for c in range(draws)]
        # §3.2 shared: the one mask m_k at every call of the rollout
        return calls if draws > 1 else calls * (T + 2)

    def _answer_masks(self, masks, T: int):
        return None if masks is None or self.cfg.mask_scope == "latent_only" else masks[T + 1]

    # ---- §2.2 the latent recurrence -----------------------------------------------------------------------------

    def _compiling(self, device: torch.device) -> bool:
        """Config.compile for the device a call runs on: auto = on CUDA only."""
        return self.cfg.compile == "true" or (self.cfg.compile == "auto" and device.type == "cuda")

    def _forward(self, model, masks, cache, attn, **inputs) -> tuple[Tensor, Tensor]:
        """One cached forward call under `masks` (`decode.step`; compiled on a StaticCache). Returns the last-layer
        hidden states, post final norm, and the logits."""
        forward = decode.compiled_step if isinstance(cache, StaticCache) else decode.step
        with self._masked(masks):
            return forward(model, cache, attn, **inputs)

    def _think(self, model, ids, attn, T: int, masks, rows: Tensor | None = None, budget: int = 0):
        """Prefill left-padded prompts ending in <bot>, then run T continuous thoughts with the KV cache.

        rows: when the prompt is not masked, each question is prefilled once and `rows` (N,) expands its cache
        over the question's rollouts. budget > 0: the compiled rollout; after the prefill the cache becomes a
        StaticCache with room for `budget` positions (the thoughts and what follows them). Returns (cache, attention
        mask, last position id (N,), h_T (N, d)).
        """
        device = model.device
        ids, attn = ids.to(device), attn.to(device)
        # explicit position ids: pads get 0 (Coconut's collator), real tokens 0..n-1 whatever the left padding
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        # the prefill is the rollout's call 0; a shared (expanded) prefill is unmasked by construction
        prefill_masks = masks[0] if masks is not None and rows is None else None
        hid, _ = self._forward(model, prefill_masks, cache, attn, input_ids=ids, position_ids=pos, logits_to_keep=1)
        # §2.2: h_0 = the last-layer hidden state at <bot>
        h, pos = hid[:, -1], pos[:, -1]                                         # (B, d), (B,)
        if rows is not None:
            rows = rows.to(device)
            h, pos, attn = h[rows], pos[rows], attn[rows]
        if budget:
            cache, attn = decode.static_cache(cache, rows, attn, budget, model.config, self._spare)
            self._spare = cache
        elif rows is not None:
            cache.reorder_cache(rows)
        for t in range(1, T + 1):
            # §2.2: e_t = h_{t−1}, fed back as the next input embedding; never detached (§3.9: full BPTT)
            e = h * masks[t][0] if masks is not None and self.cfg.mask_sites == "latent_vec" else h
            attn, pos = decode.next_attn(attn, cache), pos + 1
            # one position with the cache: a thought costs what a token costs
            hid, _ = self._forward(model, None if masks is None else masks[t], cache, attn,
                                   inputs_embeds=e[:, None], position_ids=pos[:, None], logits_to_keep=1)
            h = hid[:, -1]                                                      # h_t (N, d)
        return cache, attn, pos, h

    def _latent_phase(self, model, prompts: list[Tensor], T: int, masks, budget: int = 0):
        """Prefill + T thoughts for N rows. A prompt under a mask is prefilled per row; an unmasked one once per run
        of equal consecutive prompts (a group), its cache then expanded over the run (§3.4 note)."""
        if masks is not None and self.cfg.mask_sites != "latent_vec":
            return self._think(model, *decode.left_pad(prompts, self.pad_id), T, masks, budget=budget)
        new = torch.tensor([i == 0 or not torch.equal(prompts[i], prompts[i - 1]) for i in range(len(prompts))])
        unique = [p for p, is_new in zip(prompts, new) if is_new]
        return self._think(model, *decode.left_pad(unique, self.pad_id), T, masks, rows=new.cumsum(0) - 1, budget=budget)

    def _teacher_forced(self, model, cache, attn, pos, tokens: Tensor, valid: Tensor, masks) -> Tensor:
        """Logits (B, L, V) of one teacher-forced pass over `tokens` (B, L) after the latent phase."""
        tokens, valid = tokens.to(model.device), valid.to(model.device)
        positions = pos[:, None] + 1 + torch.arange(tokens.shape[1], device=model.device)
        attn = torch.cat([attn, valid.long()], 1)
        return self._forward(model, masks, cache, attn, input_ids=tokens, position_ids=positions)[1]

    # ---- §2.1, §2.4 the Coconut curriculum (latent initialisation) -------------------------------------------------

    def num_thoughts(self, stage: int) -> int:
        # §2.1: n = c · min(s, S_max)   (cot, no_cot: none)
        return self.cfg.c_thought * min(stage, self.cfg.max_latent_stage) if self.cfg.method == "coconut" else 0

    def _prompt(self, question: str) -> Tensor:
        # §2.1: question + "\n", then <bot> (no marker: question + "\n" alone); the question piece gets the
        # tokenizer's BOS where it has one
        return torch.tensor(self.tokenizer.encode(question + "\n") + [self.bot_id] * self.markers)

    def _opening(self, prompts: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """(prefilled prompts, (N,) first answer-pass input). With markers the whole prompt is prefilled and the
        answer pass opens with <eot>; without them the prompt's last token ("\n") opens it, so the answer's first
        logits are the ones after the question, as in a plain LM."""
        if self.markers:
            return prompts, torch.full((len(prompts),), self.eot_id)
        return [p[:-1] for p in prompts], torch.stack([p[-1] for p in prompts])

    def sft_batch(self, examples: list[dict], stage: int) -> dict[str, Tensor]:
        """Coconut's stage-`stage` sequences (§2.1), aligned on <bot> as Coconut's collator does:

            [pad] question "\\n" <bot> <latent>×n <eot> step_{k+1} "\\n" ... "### " answer EOS [pad]

        Stage s <= S_max replaces the first s steps with n = c·s thoughts; every later stage drops all steps and
        keeps c·S_max; stage 0 is CoT between the markers. Labels are -100 on padding, question, markers and latents.
        Without markers (c = 0, cot, no_cot) a row is [pad] question "\\n" step_{k+1} "\\n" ... "### " answer EOS
        [pad]; no_cot drops every step. thought_columns: (prefilled columns P, thoughts n).
        """
        def encode(text):
            return self.tokenizer.encode(text, add_special_tokens=False)

        n = self.num_thoughts(stage)
        rests = []
        no_steps = stage > self.cfg.max_latent_stage or self.cfg.method == "no_cot"
        prompts, openers = self._opening([self._prompt(ex["question"]) for ex in examples])
        for ex, opener in zip(examples, openers.tolist()):
            kept = [] if no_steps else ex["steps"][stage:]
            rests.append(torch.tensor([opener] + [t for s in kept for t in encode(s + "\n")]
                                      + encode("### " + ex["answer"]) + [self.eos_id]))
        ids, attn = decode.left_pad(prompts, self.pad_id)
        rest, valid = decode.right_pad(rests, self.pad_id)
        B = len(examples)
        ids = torch.cat([ids, torch.full((B, n), self.latent_id), rest], 1)
        attn = torch.cat([attn, torch.ones(B, n, dtype=torch.long), valid.long()], 1)
        labels = torch.where(attn.bool(), ids, -100)
        labels[:, :ids.shape[1] - rest.shape[1] + 1] = -100                     # question, <bot>, latents, <eot>
        return {"input_ids": ids, "attention_mask": attn, "labels": labels,
                "thought_columns": torch.tensor([ids.shape[1] - rest.shape[1] - n, n])}

    def sft_loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        """Coconut's training loss (§2.2): shifted cross-entropy on the labels, with every latent position filled by
        the recurrence. Incremental rather than Coconut's multi-pass forward: the same maths (tested)."""
        ids, attn, labels = (batch[k].to(model.device) for k in ("input_ids", "attention_mask", "labels"))
        P, n = batch["thought_columns"].tolist()                                 # prompt columns (<bot> included)
        cache, prefix_attn, pos, _ = self._think(model, ids[:, :P], attn[:, :P], n, None)
        logits = self._teacher_forced(model, cache, prefix_attn, pos, ids[:, P + n:], attn[:, P + n:].bool(), None)
        # the logits at <eot> and after predict the next label; earlier targets are all -100
        return F.cross_entropy(decode.wide(logits[:, :-1]).flatten(0, 1), labels[:, P + n + 1:].flatten(),
                               ignore_index=-100)

    def sft_normaliser(self, batch: dict[str, Tensor]) -> float:
        """What `sft_loss` divides by: its labelled positions (train.py sums it over ranks under torchrun)."""
        return float((batch["labels"] != -100).sum())

    # ---- §3.4 rollout --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, model, questions: list[str], num_generations: int, generator: torch.Generator) -> Rollout:
        """G = num_generations rollouts per question (§3.4): one mask per row, sampled answers."""
        return self._generate(model, questions, num_generations, True, False, generator)

    @torch.no_grad()
    def generate(self, model, questions: list[str], explore: bool, generator: torch.Generator) -> Rollout:
        """explore=False: Coconut's evaluation policy (greedy answer, no mask: the weight-scaling BMA, §3.11).
        explore=True: the rollout policy, one mask per row and sampled answers (for pass@k)."""
        return self._generate(model, questions, 1, explore, not explore, generator)

    @torch.no_grad()
    def generate_masked(self, model, questions: list[str], num_masks: int, generator: torch.Generator) -> Rollout:
        """MC dropout (§3.11): each question answered greedily under `num_masks` masks, rows group-major. Their mean
        reward is the BMA policy's, which the shared mask makes GRPO climb (§4.5); the no-mask `generate` is
        Coconut's weight-scaling approximation of it."""
        return self._generate(model, questions, num_masks, True, True, generator)

    def _generate(self, model, questions, G: int, explore: bool, greedy: bool, generator) -> Rollout:
        _require_eval(model)
        T = self.num_thoughts(self.stage)
        prompts = [p for q in questions for p in [self._prompt(q)] * G]           # group-major rows
        N = len(prompts)
        # §3.2: seed_k from the caller's generator; the mask itself is drawn on CPU from seed_k alone
        seeds = (torch.randint(2**62, (N,), generator=generator, device=generator.device).cpu() if explore
                 else torch.full((N,), -1))
        masks = self._masks(seeds, T, model)
        # compiled: a static cache with a slot for each thought, <eot> and every answer token but the last
        budget = T + self.cfg.max_new_tokens if self._compiling(model.device) else 0
        prefixes, openers = self._opening(prompts)
        cache, attn, pos, h = self._latent_phase(model, prefixes, T, masks, budget)
        answers, logps, truncated = self._decode(model, cache, attn, pos, openers, self._answer_masks(masks, T),
                                                 greedy, generator)
        return Rollout(
            texts=self.tokenizer.batch_decode(answers, skip_special_tokens=True),
            num_latent=torch.full((N,), T), lengths=T + torch.tensor([len(a) for a in answers]),
            truncated=truncated, prompt_ids=prompts, answer_ids=answers, mask_seed=seeds,
            group_size=torch.full((N,), G), sampler_logprobs=logps, last_hidden=h.float().cpu())

    def _decode(self, model, cache, attn, pos, openers: Tensor, masks, greedy: bool, generator):
        """Feed the opener (<eot>), then sample answer tokens one cached step at a time (§3.4). Finished rows keep
        stepping (their tokens are cut at the first EOS afterwards) so the batch stays rectangular."""
        tok = openers.to(model.device)
        done = torch.zeros_like(tok, dtype=torch.bool)
        tokens, logps = [], []
        for _ in range(self.cfg.max_new_tokens):
            attn, pos = decode.next_attn(attn, cache), pos + 1
            _, logits = self._forward(model, masks, cache, attn, input_ids=tok[:, None], position_ids=pos[:, None])
            logp = _log_softmax(logits[:, -1], self.cfg.temperature)                 # (N, V)
            # §3.4: y_j ~ softmax(logits / τ), top-p 1.0 (greedy for the evaluation policy)
            tok = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
            tokens.append(tok)
            logps.append(logp.gather(-1, tok[:, None])[:, 0])
            done |= tok == self.eos_id
            if done.all():
                break
        tokens, logps = torch.stack(tokens, 1).cpu(), torch.stack(logps, 1).cpu()       # (N, L)
        is_eos = tokens == self.eos_id
        ends = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, tokens.shape[1]).tolist()
        return ([t[:n] for t, n in zip(tokens, ends)], [lp[:n] for lp, n in zip(logps, ends)], ~is_eos.any(1))

    # ---- §3.8 replay, §3.9 gradient ------------------------------------------------------------------------------

    def logprobs(self, model, rollout: Rollout, advantages=None) -> Tensor:
        """(N, L) log π_θ(y_j | x, m, y_<j) at `temperature`, L = the longest answer, 0 past a row's end (§3.8).

        Each row's stored mask is replayed; the thoughts are recomputed and <eot> + answer go through one
        teacher-forced pass. Outside no_grad, gradients reach every parameter through the answer, every thought and
        the prompt (§3.9). Float32, or the model's dtype when that is wider. With ref_masked=False a model other than
        the policy (the reference) is evaluated without a mask.
        """
        _require_eval(model)
        T = int(rollout.num_latent[0])
        if not bool((rollout.num_latent == T).all()):
            raise ValueError("a rollout batch must have one number of thoughts (one curriculum stage)")
        use_mask = self.cfg.ref_masked or model is self.model
        masks = self._masks(rollout.mask_seed, T, model) if use_mask else None
        prefixes, openers = self._opening(rollout.prompt_ids)
        cache, attn, pos, _ = self._latent_phase(model, prefixes, T, masks)
        y, valid = decode.right_pad(rollout.answer_ids, self.pad_id)                                # (N, L)
        inputs = torch.cat([openers[:, None], y[:, :-1]], 1)                                   # <eot>, y_<L
        logits = self._teacher_forced(model, cache, attn, pos, inputs, valid, self._answer_masks(masks, T))
        y, valid = y.to(model.device), valid.to(model.device)
        # §3.3: ℓ_j = log softmax(W_U g_j / τ)[y_j]   (read at y_j alone: no (N, L, V) float32 copy)
        logp = decode.selective_log_softmax(logits, y[..., None], self.cfg.temperature)[..., 0]
        return torch.where(valid, logp, 0)

    # ---- §3.6 advantage, §3.7 loss, metrics ----------------------------------------------------------------------

    def advantages(self, rewards: Tensor, rollout: Rollout, old_logprobs) -> Tensor:
        """(P, G) rewards -> (N, 1) sequence-level advantages, group-major (§3.6)."""
        return group_advantages(rewards, self.cfg.adv_mode).reshape(-1, 1)

    def loss(self, logprobs, old_logprobs, ref_logprobs, advantages, rollout) -> tuple[Tensor, dict[str, float]]:
        """§3.7 on the answer tokens. norm=const divides by N = rows · L_max (L_max = max_new_tokens), a constant, so
        the gradient at θ_old is −(1/N) Σ_k A_k ∇ log π(y_k | x, m_k): the unbiased estimator of §4.5."""
        lengths = torch.tensor([len(a) for a in rollout.answer_ids], device=logprobs.device)
        mask = torch.arange(logprobs.shape[1], device=logprobs.device) < lengths[:, None]          # (N, L)
        denom = len(lengths) * self.cfg.max_new_tokens if self.cfg.norm == "const" else mask.sum().clamp(min=1)
        loss, stats = clipped_loss(logprobs, old_logprobs, ref_logprobs, advantages.to(logprobs.device), mask,
                                   self.cfg.epsilon, self.cfg.beta, denom, self._compiling(logprobs.device))
        # §3.10 log: mean |A| over the rows (train.py weights micro-batches by their share of the normaliser: rows
        # under norm=const, so the logged value is the mini-batch's; the fraction of non-degenerate groups is
        # train.py's 1 - frac_reward_zero_std)
        return loss, {**stats, "adv/abs_mean": advantages.abs().mean().item()}

    def loss_normaliser(self, rollout: Rollout) -> float:
        """What `loss` divides by (§3.7): rows · max_new_tokens (const), or the answer tokens (tokens). train.py weights
        a micro-batch's loss by its share of the mini-batch's normaliser, so the accumulated gradient is the same."""
        if self.cfg.norm == "const":
            return float(len(rollout.answer_ids) * self.cfg.max_new_tokens)
        return float(max(1, sum(len(a) for a in rollout.answer_ids)))

    def gradient_variance(self, model, records: list[dict], reward_fn, num_generations: int, repeats: int,
                          generator: torch.Generator) -> dict[str, float]:
        """The spread of the policy-gradient estimate at fixed weights (§4.6, for the "variance reduction" claim):
        `repeats` independent rollout batches of `records` (dicts with question and answer), G = num_generations
        each, one gradient g_r of the loss at θ_old per batch (§4.5: −(1/N) Σ_k A_k ∇log π(y_k | x, m_k)).

        grad_var = tr Cov[g] = (1/(R−1)) Σ_r ||g_r − ḡ||² (unbiased), grad_mean_sq_norm = ||ḡ||², and per batch on
        average: frac_nondegenerate (groups whose rewards differ) and adv_abs_mean (mean |A|). Compare mask modes
        (shared vs per_step) at equal p by calling it with each Config. Running sums: memory 2x the parameters."""
        if repeats < 2:
            raise ValueError(f"gradient_variance needs repeats >= 2, got {repeats}")
        params = [x for x in model.parameters() if x.requires_grad]
        total, sq_norms, nondegenerate, abs_adv = None, 0.0, 0.0, 0.0
        questions = [r["question"] for r in records]
        for _ in range(repeats):
            ro = self.rollout(model, questions, num_generations, generator)
            rewards = torch.tensor([reward_fn(t, r["answer"]) for r, t in
                                    zip((r for r in records for _ in range(num_generations)), ro.texts)])
            rewards = rewards.view(len(records), num_generations)
            adv = self.advantages(rewards, ro, None)
            lp = self.logprobs(model, ro)
            loss, _ = self.loss(lp, lp.detach(), None, adv, ro)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            g = torch.cat([(torch.zeros_like(x) if d is None else d).flatten().double() for x, d in zip(params, grads)])
            total = g if total is None else total + g
            sq_norms += g.square().sum().item()
            nondegenerate += (rewards.std(1) > 0).double().mean().item() if num_generations > 1 else 0.0
            abs_adv += adv.abs().mean().item()
        mean = total / repeats
        # Σ_r ||g_r − ḡ||² = Σ_r ||g_r||² − R ||ḡ||²
        var = (sq_norms - repeats * mean.square().sum().item()) / (repeats - 1)
        return {"grad_var": var, "grad_mean_sq_norm": mean.square().sum().item(),
                "frac_nondegenerate": nondegenerate / repeats, "adv_abs_mean": abs_adv / repeats}

    def metrics(self, rollout: Rollout) -> dict[str, float]:
        """dropout/distinct_answers_per_group: how many different answers a group explores (1 = collapsed);
        dropout/latent_spread: per-feature std of h_T within a group, averaged (0 = one shared trajectory);
        latent/mean_steps: thoughts per rollout."""
        distinct, spread, i = [], [], 0
        while i < len(rollout.texts):
            g = int(rollout.group_size[i])
            distinct.append(len(set(rollout.texts[i:i + g])))
            spread.append(rollout.last_hidden[i:i + g].std(0, correction=0).mean().item())
            i += g
        return {"dropout/distinct_answers_per_group": sum(distinct) / len(distinct),
                "dropout/latent_spread": sum(spread) / len(spread),
                "latent/mean_steps": rollout.num_latent.float().mean().item()}
