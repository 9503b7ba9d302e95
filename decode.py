"""
Decoding plumbing both algorithms share and no paper specifies: padding, the cached per-position forward (eager, or
compiled on a static KV cache), and log-probabilities read at a few ids without a full-vocabulary copy.

    ids, mask = left_pad(prompts, pad_id)                     # prompts end at the same column
    hidden, logits = step(model, cache, mask, inputs_embeds=x, position_ids=position)
    cache, mask = static_cache(cache, rows, mask, budget, model.config, spare)   # fixed shapes for torch.compile
    hidden, logits = compiled_step(model, cache, mask, inputs_embeds=x, position_ids=position)
    logp = selective_log_softmax(logits, ids, temperature)     # log softmax(z / T) at ids, no (rows, V) copy

latent_grpo.py and dropout_grpo.py import this module and nothing of each other; it imports neither.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, StaticCache

import compat


# ------------------------------------------------------------------------------------------------------------------
# Padding and dtypes
# ------------------------------------------------------------------------------------------------------------------

def left_pad(seqs: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """(B,) ragged 1-D ids -> ids (B, T) and attention mask (B, T), right-aligned: every row ends at the same column
    (a prompt's last token), so one decode step serves all rows."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):], mask[i, T - len(s):] = s, 1
    return ids, mask


def right_pad(seqs: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """(B,) ragged 1-D ids -> ids (B, L) left-aligned and a bool mask (B, L) of the real entries."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, torch.arange(L) < torch.tensor([len(s) for s in seqs])[:, None]


def wide(x: Tensor) -> Tensor:
    """`x` in at least float32: bf16 / fp16 are widened, float64 stays float64 (the exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ------------------------------------------------------------------------------------------------------------------
# Log-probabilities at a few ids: the "selective log-softmax"
# ------------------------------------------------------------------------------------------------------------------

CHUNK_ELEMENTS = 2**22
"""Rows per chunk of selective_log_softmax = max(1, CHUNK_ELEMENTS // V): each chunk's float32 temporaries are about
16 MiB whatever the vocabulary, instead of rows x V for the whole batch."""


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z / T) read at J ids per row, forward and backward one chunk of rows at a time.

    Saved for the backward: z itself (the model's logits, alive anyway), the ids and the (rows,) logsumexp: no
    (rows, V) tensor beyond the gradient of z, which the LM head's backward needs whatever computes it."""

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, temperature: float | Tensor, chunk: int) -> Tensor:
        rows = z.shape[0]
        out = z.new_empty(ids.shape, dtype=torch.promote_types(z.dtype, torch.float32))
        lse = z.new_empty(rows, dtype=out.dtype)
        for i in range(0, rows, chunk):
            T = temperature if isinstance(temperature, float) else temperature[i:i + chunk]  # a float, or (c, 1)
            # float32 is required here: a logsumexp over tens of thousands of bf16 terms loses ~3 significant digits
            zc = z[i:i + chunk].to(out.dtype) / T                                        # (c, V)
            lse[i:i + chunk] = zc.logsumexp(-1)
            # log softmax(z / T)_y = z_y / T - logsumexp_v(z_v / T)
            out[i:i + chunk] = zc.gather(-1, ids[i:i + chunk]) - lse[i:i + chunk, None]
        per_row = not isinstance(temperature, float)
        ctx.save_for_backward(z, ids, lse, *([temperature] if per_row else []))
        ctx.temperature, ctx.chunk = None if per_row else temperature, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        z, ids, lse, *per_row = ctx.saved_tensors
        chunk = ctx.chunk
        grad_z = torch.empty_like(z)
        for i in range(0, z.shape[0], chunk):
            T = per_row[0][i:i + chunk] if per_row else ctx.temperature                  # (c, 1) or a float
            g = grad_out[i:i + chunk].to(lse.dtype)                                      # (c, J)
            # computed in place, in grad_z's own rows when z is float32 / float64: this backward runs at the step's
            # peak (every activation still saved), where each (c, V) temporary would add to it
            zc = z[i:i + chunk]
            if z.dtype == lse.dtype:
                gc = torch.div(zc, T, out=grad_z[i:i + chunk])                           # (c, V)
            else:
                gc = zc.to(lse.dtype).div_(T)                                            # one float32 chunk
            # d/dz_v [z_y / T - logsumexp(z / T)] = (1[v = y] - softmax(z / T)_v) / T, summed over the J ids
            gc.sub_(lse[i:i + chunk, None]).exp_()                                       # softmax(z / T)
            gc.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids[i:i + chunk], g).div_(T)
            if gc.dtype != z.dtype:
                grad_z[i:i + chunk] = gc
        return grad_z, None, None, None


def selective_log_softmax(logits: Tensor, ids: Tensor, temperature: float | Tensor = 1.0,
                          chunk: int | None = None) -> Tensor:
    """log softmax(logits / temperature) read at `ids`: logits (..., V) in any float dtype, ids (..., J) long ->
    (..., J) in at least float32. The same values and gradients as
    `(logits.float() / T).log_softmax(-1).gather(-1, ids)`, without its (..., V) float32 copies (TRL's "selective
    log-softmax", here also in the backward). temperature: one for all rows, or a tensor (...) of one per row (rows
    of different kinds in one pass, so that one (..., V) gradient reaches the logits). chunk: rows per chunk (default:
    CHUNK_ELEMENTS // V)."""
    V = logits.shape[-1]
    chunk = chunk or max(1, CHUNK_ELEMENTS // V)
    z = logits.reshape(-1, V)                                  # a view for the model's contiguous logits
    if torch.is_tensor(temperature):
        temperature = temperature.to(z.device, torch.promote_types(z.dtype, torch.float32)).reshape(-1, 1)
    else:
        temperature = float(temperature)
    out = _SelectiveLogSoftmax.apply(z, ids.reshape(z.shape[0], -1), temperature, chunk)
    return out.view(ids.shape)


# ------------------------------------------------------------------------------------------------------------------
# The per-position forward: eager on any cache, compiled on a static one (Config.compile)
# ------------------------------------------------------------------------------------------------------------------

@functools.cache
def compiled(fn, **options):
    """torch.compile(fn, **options), wrapped once per process (the compilation itself happens at the first call)."""
    return torch.compile(fn, **options)


def step(model, cache, attn: Tensor, **inputs) -> tuple[Tensor, Tensor]:
    """One cached forward of `inputs` (input_ids or inputs_embeds, position_ids, ...): the last-layer hidden states,
    post final norm (the LM head's input, Coconut's `hidden_states[-1]`), and the logits."""
    out = model(**inputs, attention_mask=attn, **compat.cache_arg(model, cache), use_cache=True,
                output_hidden_states=True)
    return out.hidden_states[-1], out.logits


def compiled_step(model, cache: StaticCache, attn: Tensor, **inputs) -> tuple[Tensor, Tensor]:
    """`step` under torch.compile: CUDA graphs on CUDA (mode reduce-overhead), inductor's default mode elsewhere.
    Every call of a rollout has the same shapes (static cache, full-width mask), so a rollout compiles one graph per
    kind of call, and a later rollout of the same rows and cache length none."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.compiler.cudagraph_mark_step_begin()          # the previous replay's outputs were copied out below
    # contiguous: an input may be a strided view (a prefill's last states), which would compile another graph
    inputs = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in inputs.items()}
    compiled_fn = compiled(step, mode="reduce-overhead" if cuda else None, dynamic=False)
    # static shapes: training, evaluation and their last partial batches each add graphs, beyond dynamo's default 8
    with torch._dynamo.config.patch(recompile_limit=64):
        hidden, logits = compiled_fn(model, cache, attn, **inputs)
    return hidden.clone(), logits.clone()                   # a CUDA graph overwrites its outputs at the next replay


def static_cache(cache: DynamicCache, rows: Tensor | None, attn: Tensor, budget: int, config,
                 spare: StaticCache | None = None) -> tuple[StaticCache, Tensor]:
    """The prefilled `cache` as a StaticCache with room for `budget` more positions, its rows picked by `rows` (None:
    all), and the (N, P) attention mask widened to the cache's length. The new columns are 1 from the start: a slot
    not yet written lies after every query, so the causal mask hides it, and the mask never changes shape.
    spare: an earlier rollout's StaticCache, reset and reused when it has the same shape (a CUDA graph is recorded
    against the cache's addresses; a new cache each rollout would make it record again)."""
    # a power of two: the cache length is a constant of the compiled graph, so few lengths mean few compilations
    length = max(64, 1 << ((attn.shape[1] + budget) - 1).bit_length())
    first = cache.layers[0].keys                             # (B, heads, P, d_head)
    layout = len(cache.layers), (len(attn), first.shape[1], length, first.shape[3]), first.dtype, first.device
    old = None if spare is None else spare.layers[0].keys
    if old is not None and (len(spare.layers), old.shape, old.dtype, old.device) == layout:
        static = spare
        static.reset()
    else:
        static = StaticCache(config=config, max_cache_len=length)
    for i, layer in enumerate(cache.layers):
        keys, values = (layer.keys, layer.values) if rows is None else (layer.keys[rows], layer.values[rows])
        static.update(keys, values, i)                       # (N, heads, P, d_head) into slots 0..P-1
    return static, F.pad(attn, (0, length - attn.shape[1]), value=1)


def next_attn(attn: Tensor, cache) -> Tensor:
    """The attention mask for one more position: a DynamicCache grows by a column, a StaticCache's mask is full."""
    return attn if isinstance(cache, StaticCache) else F.pad(attn, (0, 1), value=1)
