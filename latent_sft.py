"""
Latent-SFT (arXiv 2510.15522, "chain of superposition"): Latent-GRPO's initialisation, in one file.

Read it beside `specs/latent_sft.md` (the spec, written from the official code); every equation and mask rule below
carries the spec section it comes from.

Starting from the explicit CoT-SFT model (1.1), a *Latent Token Encoder* (a second copy of the body plus one compress
token, 1.2) reads the CoT and writes one latent per chunk of c CoT tokens: a top-K distribution over the vocabulary,
mapped through the decoder's (detached) input embeddings. Stage 1 (1.4) teaches the encoder to write latents and the
decoder to read them, under the induction mask (encoder) and the supervision mask (decoder, dual-track positions):

    stage 1  (1a) encoder only    (1b) decoder only    (1c) both          CE on spacers, </think>, answer, EOS
    stage 2  the encoder is dropped; the decoder learns to *emit* the (Gumbel-augmented) teacher latents (1.6, 4):
             KL(teacher top-K || student) at the position before each latent + CE on </think>, answer, EOS

At inference (2) the decoder feeds back its own top-K renormalised output as the next input until the argmax is the
first id of `</think>`: exactly Latent-GRPO's deterministic latent policy, so `latent_grpo.LatentGRPO.generate` is the
inference loop and nothing of it is repeated here.

Deliberate simplifications, all [I] in the spec (6.2):
  * Full fine-tuning instead of LoRA. The decoder's input embeddings (and, when tied, its LM head) stay frozen in
    every stage-1/2 step, as the official decoder's; the encoder trains all of its own weights and its compress row.
  * The compress token is the encoder's own parameter vector, not a new vocabulary entry, so the decoder's tokenizer
    and checkpoint stay exactly those Latent-GRPO rolls out.
  * Teacher labels are computed on the fly by the frozen stage-1c encoder (eval(), no grad), not cached.
  * The encoder sequence ends in one `</think>` position (its first id); it is after every compress token, so no
    latent depends on it.
  * Masks are built from lengths (never from a pad id); padded rows attend only to themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import decode
import distributed
import latent_grpo

INITIAL, LATENT, SPACER, FINAL = 0, 1, 2, 3   # decoder segment kinds (spec 3)


# ------------------------------------------------------------------------------------------------------------------
# Pure functions (spec 1.3, 3, 1.6): one example, no padding, True = may attend
# ------------------------------------------------------------------------------------------------------------------

def chunk_sizes(cot_len: int, c: int) -> list[int]:
    """Spec 1.3: a compress token after every c CoT tokens, plus one at the end if L mod c != 0: m = ceil(L / c)."""
    m = math.ceil(cot_len / c)
    return [min(c, cot_len - j * c) for j in range(m)]


def _causal(S: int) -> torch.Tensor:
    return torch.ones(S, S, dtype=torch.bool).tril()


def induction_mask(prompt_len: int, cot_len: int, c: int) -> torch.Tensor:
    """Spec 3, induction mask, for the encoder sequence  prompt | S_1 L_1 ... S_m L_m | </think>  -> (S, S)."""
    compress = []
    for size in chunk_sizes(cot_len, c):
        compress += [False] * size + [True]
    is_L = torch.tensor([False] * prompt_len + compress + [False])                    # (S,)
    S = len(is_L)
    # causal, except that no query may attend to an *earlier* compress token (it still sees itself)
    earlier = torch.arange(S)[None, :] < torch.arange(S)[:, None]                     # key k < query i
    return _causal(S) & ~(is_L[None, :] & earlier)


def decoder_segments(prompt_len: int, cot_len: int, c: int, answer_len: int):
    """Spec 1.3: the decoder sequence  prompt | Z_1 S_2 Z_2 ... S_m Z_m | </think> answer EOS  as (kind, j) per
    position: kind in INITIAL / LATENT / SPACER / FINAL, j the latent a latent or spacer belongs to (0-based)."""
    sizes = chunk_sizes(cot_len, c)
    kind, group = [INITIAL] * prompt_len, [-1] * prompt_len
    for j in range(len(sizes)):
        kind.append(LATENT), group.append(j)
        # Z_j is followed by the next chunk S_{j+1} (the first chunk S_1 is dropped)
        if j + 1 < len(sizes):
            kind += [SPACER] * sizes[j + 1]
            group += [j] * sizes[j + 1]
    kind += [FINAL] * answer_len
    group += [-1] * answer_len
    return torch.tensor(kind), torch.tensor(group)


def supervision_mask(prompt_len: int, cot_len: int, c: int, answer_len: int) -> torch.Tensor:
    """Spec 3, supervision mask, for the decoder sequence (decoder_segments) -> (S', S'). Causal, and:
    initial -> initial; Z_j -> initial + Z_1..Z_j; spacer after Z_j -> its own chunk + Z_j only;
    final -> initial + every Z + the final segment."""
    kind, group = decoder_segments(prompt_len, cot_len, c, answer_len)
    q_kind, k_kind = kind[:, None], kind[None, :]
    same_group = group[:, None] == group[None, :]
    rule = torch.where(
        q_kind == INITIAL, k_kind == INITIAL,
        torch.where(q_kind == LATENT, (k_kind == INITIAL) | (k_kind == LATENT),
                    torch.where(q_kind == SPACER, same_group & ((k_kind == SPACER) | (k_kind == LATENT)),
                                k_kind != SPACER)))
    return _causal(len(kind)) & rule


def dual_track_positions(prompt_len: int, cot_len: int, c: int, answer_len: int) -> torch.Tensor:
    """Spec 1.3, dual-track positions: latents count consecutively from prompt_len as if the spacers were absent;
    a spacer continues from its latent's position; </think> and the answer continue after the last latent."""
    kind, group = decoder_segments(prompt_len, cot_len, c, answer_len)
    pos, last_latent = [], prompt_len - 1
    for i, (k, j) in enumerate(zip(kind.tolist(), group.tolist())):
        if k == INITIAL:
            pos.append(i)
        elif k == LATENT:
            last_latent = prompt_len + j
            pos.append(last_latent)
        elif k == SPACER:
            pos.append(pos[-1] + 1)
        else:
            pos.append((last_latent if kind[i - 1] != FINAL else pos[-1]) + 1)
    return torch.tensor(pos)


def topk_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Spec 1.6, kd_kl_loss_topk: KL(q || p) = sum_k q_k (log q_k - log p_k), q the teacher's top-K renormalised,
    p the student's full-vocabulary softmax gathered at the teacher's ids.
    student_logits (..., V), teacher_probs / teacher_ids (..., K) -> (...)."""
    q = teacher_probs / teacher_probs.sum(-1, keepdim=True)
    # log p_k = log_softmax(z)[id_k], read at the K ids only
    log_p = decode.selective_log_softmax(student_logits, teacher_ids)
    return (torch.special.xlogy(q, q) - q * log_p).sum(-1)


def gumbel_augment(q: torch.Tensor, noise_scale: float, temperature: float, generator=None) -> torch.Tensor:
    """Spec 4: p~ = softmax((log(q + 1e-10) + g) / tau), g = clamp(s * Gumbel, -1.5, 3); the indices stay fixed.
    (Scale, then clamp: the official training augmentation; Latent-GRPO's rollout noise clamps first.)
    q (..., K) -> (..., K)."""
    # g = -log(Exp(1)) ~ Gumbel(0, 1);  g <- clamp(s * g, -1.5, 3)
    g = -torch.empty_like(q).exponential_(generator=generator).log()
    g = (noise_scale * g).clamp(-1.5, 3.0)
    return ((torch.log(q + 1e-10) + g) / temperature).softmax(-1)


def augment_with_guard(q: torch.Tensor, ids: torch.Tensor, end_id: int, noise_scale: float, temperature: float,
                       tries: int = 100, generator=None) -> torch.Tensor:
    """Spec 4 guard: redraw an example's noise (up to `tries` times) while any of its slots has the first </think> id
    as its noisy top-1, so the model is never taught to stop early. q, ids (m, K) of one example -> (m, K)."""
    for _ in range(tries):
        p = gumbel_augment(q, noise_scale, temperature, generator)
        if not (ids.gather(-1, p.argmax(-1, keepdim=True)) == end_id).any():
            return p
    return q   # the official code gives up after 100 tries; the clean teacher never stops early unless q itself does


# ------------------------------------------------------------------------------------------------------------------
# The encoder (spec 1.2) and the latent (spec 1.2, 6.1.2)
# ------------------------------------------------------------------------------------------------------------------

class LatentEncoder(torch.nn.Module):
    """A second copy of the CoT-SFT body (no LM head) plus one trainable compress-token embedding (spec 1.2)."""

    def __init__(self, model):
        super().__init__()
        self.body = distributed.ordinary_copy(model.base_model)   # copy.deepcopy, also of a sharded body (fsdp)
        E = self.body.get_input_embeddings().weight   # the decoder's embeddings, copied
        # the new token starts at the mean embedding, a neutral point (as Latent-GRPO's added tokens)
        self.compress = torch.nn.Parameter(E.detach().mean(0).clone())

    def forward(self, ids, is_compress, mask, positions) -> torch.Tensor:
        """ids, is_compress (B, T), mask (B, 1, T, T) additive -> last hidden states (after the final norm) at the
        compress positions, (n_latent, d), in row-major order."""
        x = self.body.get_input_embeddings()(ids)
        x = torch.where(is_compress[..., None], self.compress.to(x.dtype), x)
        h = self.body(inputs_embeds=x, attention_mask=mask, position_ids=positions).last_hidden_state
        return h[is_compress]


def latents(hidden: torch.Tensor, embedding: torch.Tensor, top_k: int):
    """Spec 1.2: logits = h E^T with E the decoder's input embeddings, detached; top-K; softmax at T = 1.
    hidden (n, d), embedding (V, d) -> ids (n, K), weights (n, K), Z = sum_k w_k E[idx_k] (n, d)."""
    E = embedding.detach()                       # the gradient reaches the encoder only through the weights (1.4)
    logits = hidden.to(E.dtype) @ E.T                                                  # (n, V)
    top, ids = logits.topk(top_k, dim=-1)
    w = decode.wide(top).softmax(-1)           # at least float32 (float64 stays float64)
    return ids, w, latent_grpo.soft_embedding(E, ids, w)


def _additive(masks: list[torch.Tensor], T: int, dtype) -> torch.Tensor:
    """Per-example boolean masks -> one right-padded (B, 1, T, T) additive mask; padded rows see only themselves."""
    out = torch.eye(T, dtype=torch.bool).repeat(len(masks), 1, 1)
    for b, m in enumerate(masks):
        out[b, :len(m), :len(m)] = m
    return torch.zeros(out.shape, dtype=dtype).masked_fill(~out, torch.finfo(dtype).min)[:, None]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    T = max(map(len, rows))
    return torch.tensor([r + [value] * (T - len(r)) for r in rows])


# ------------------------------------------------------------------------------------------------------------------
# Stages 1a/1b/1c and 2
# ------------------------------------------------------------------------------------------------------------------

STAGES = {1: "1a", 2: "1b", 3: "1c", 4: "2"}   # the algorithm's SFT stage number -> the spec's step


class LatentSFT:
    """Latent-SFT's stages behind LatentGRPO's SFT interface. c and K are Latent-GRPO's c_latent and top_k, so the
    latents it trains are the ones Latent-GRPO rolls out."""

    def __init__(self, c: int, top_k: int, end_id: int, eos_id: int, pad_id: int, noise_scale: float,
                 gumbel_temperature: float):
        self.c, self.top_k, self.end_id, self.eos_id, self.pad_id = c, top_k, end_id, eos_id, pad_id
        self.noise_scale, self.gumbel_temperature = noise_scale, gumbel_temperature
        self.encoder: LatentEncoder | None = None

    # ---- which parameters each step trains (spec 1.4 table) ----

    def parameters(self, model, stage: int) -> list[torch.nn.Parameter]:
        """Build the encoder at step 1a (from the CoT-SFT model), set train / eval modes and requires_grad for this
        step, and return the parameters it trains. The decoder's input embeddings are never trained (1.4)."""
        if self.encoder is None:
            self.encoder = LatentEncoder(model).to(model.device)
        train_encoder, train_decoder = {1: (True, False), 2: (False, True), 3: (True, True), 4: (False, True)}[stage]
        self.encoder.train(train_encoder).requires_grad_(train_encoder)
        model.train(train_decoder).requires_grad_(train_decoder)
        model.get_input_embeddings().weight.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        return params + (list(self.encoder.parameters()) if train_encoder else [])

    def drop_encoder(self):
        """Stage 2 is the last use of the encoder: the checkpoint is the decoder alone (spec 1.6)."""
        self.encoder = None

    # ---- sequences (spec 1.3) ----

    def batch(self, prompts: list[list[int]], cots: list[list[int]], finals: list[list[int]], dtype) -> dict:
        """prompts (ending in <think>), CoT ids, final ids (</think> answer EOS) -> the encoder and decoder batches of
        stage 1 and the plain-causal layout of stage 2, right-padded."""
        enc, dec, dec_labels, dec_latent, s2, s2_latent, s2_labels, m_list = [], [], [], [], [], [], [], []
        enc_masks, enc_pos, dec_masks, dec_pos = [], [], [], []
        for P, cot, fin in zip(prompts, cots, finals):
            sizes = chunk_sizes(len(cot), self.c)
            chunks = [cot[sum(sizes[:j]):sum(sizes[:j + 1])] for j in range(len(sizes))]
            # encoder: P | S_1 L_1 ... S_m L_m | </think>   (compress slots written as -1)
            enc.append(P + [t for ch in chunks for t in ch + [-1]] + [self.end_id])
            enc_masks.append(induction_mask(len(P), len(cot), self.c))
            enc_pos.append(list(range(len(enc[-1]))))
            # decoder: P | Z_1 S_2 Z_2 ... S_m Z_m | </think> answer EOS   (latent slots written as -1)
            ids = P + [t for j in range(len(chunks)) for t in [-1] + (chunks[j + 1] if j + 1 < len(chunks) else [])]
            dec.append(ids + fin)
            dec_masks.append(supervision_mask(len(P), len(cot), self.c, len(fin)))
            dec_pos.append(dual_track_positions(len(P), len(cot), self.c, len(fin)).tolist())
            # labels: spacers, </think>, answer, EOS keep their ids; prompt and Z slots are -100
            dec_labels.append([-100] * len(P) + [t if t >= 0 else -100 for t in ids[len(P):]] + fin)
            # stage 2: P | Z x m | </think> answer EOS, plain causal attention, CE on the final segment only
            s2.append(P + [-1] * len(sizes) + fin)
            s2_labels.append([-100] * (len(P) + len(sizes)) + fin)
            m_list.append(len(sizes))
        T_enc, T_dec = max(map(len, enc)), max(map(len, dec))
        enc_ids, dec_ids, s2_ids = _pad(enc, self.pad_id), _pad(dec, self.pad_id), _pad(s2, self.pad_id)
        return {
            "enc_ids": enc_ids.clamp(min=0), "enc_compress": enc_ids == -1,
            "enc_mask": _additive(enc_masks, T_enc, dtype), "enc_pos": _pad(enc_pos, 0),
            "dec_ids": dec_ids.clamp(min=0), "dec_latent": dec_ids == -1, "dec_labels": _pad(dec_labels, -100),
            "dec_mask": _additive(dec_masks, T_dec, dtype), "dec_pos": _pad(dec_pos, 0),
            "s2_ids": s2_ids.clamp(min=0), "s2_latent": s2_ids == -1, "s2_labels": _pad(s2_labels, -100),
            "s2_attention": _pad([[1] * len(r) for r in s2], 0), "num_latent": torch.tensor(m_list),
        }

    # ---- forward passes ----

    def encode(self, model, b):
        """The encoder's latents for every slot of the batch: ids, weights (n, K), Z (n, d) (spec 1.2)."""
        h = self.encoder(b["enc_ids"], b["enc_compress"], b["enc_mask"], b["enc_pos"])
        return latents(h, model.get_input_embeddings().weight, self.top_k)

    def decoder_logits(self, model, b, Z: torch.Tensor) -> torch.Tensor:
        """Stage-1 decoder: token embeddings with the j-th latent slot overwritten by the j-th latent (the j-th
        compress position's, 1.3), supervision mask, dual-track positions -> logits (B, T, V)."""
        x = model.get_input_embeddings()(b["dec_ids"])
        x = x.masked_scatter(b["dec_latent"][..., None], Z.to(x.dtype))
        return model(inputs_embeds=x, attention_mask=b["dec_mask"], position_ids=b["dec_pos"]).logits

    def loss(self, model, b: dict, stage: int) -> torch.Tensor:
        b = {k: v.to(model.device) for k, v in b.items()}
        if stage < 4:
            # 1.4: one token-level CE over the decoder's labels (shifted: the logit at Z_j predicts S_{j+1}'s first)
            _, _, Z = self.encode(model, b)
            logits = decode.wide(self.decoder_logits(model, b, Z))
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), b["dec_labels"][:, 1:].flatten(), ignore_index=-100)
        return self.stage2_loss(model, b)

    def normaliser(self, b: dict, stage: int):
        """What `loss` divides by: the labelled tokens of stage 1's CE; stage 2's two terms, by name: the labelled
        tokens of its CE and its examples (the KL's mean over examples). The loop sums them over ranks."""
        if stage < 4:
            return float((b["dec_labels"][:, 1:] != -100).sum())
        return {"tokens": float((b["s2_labels"][:, 1:] != -100).sum()), "examples": float(len(b["num_latent"]))}

    def stage2_loss(self, model, b: dict) -> dict[str, torch.Tensor]:
        """Spec 1.6: L = CE(</think>, answer, EOS) + KL(p~ || student) at the position before each latent slot, with
        the teacher latents of the frozen stage-1 encoder, Gumbel-augmented (4) on the input and the target alike.
        -> the two terms by the count each is a mean over (`normaliser`): {"tokens": CE, "examples": KL}; L is
        their sum."""
        with torch.no_grad():
            self.encoder.eval()
            ids, q, _ = self.encode(model, b)                                          # (n, K) teacher labels
            counts = b["num_latent"].tolist()
            p = torch.cat([augment_with_guard(qe, ie, self.end_id, self.noise_scale, self.gumbel_temperature)
                           if self.noise_scale > 0 else qe
                           for qe, ie in zip(q.split(counts), ids.split(counts))])
        E = model.get_input_embeddings().weight
        x = E[b["s2_ids"]].masked_scatter(b["s2_latent"][..., None], latent_grpo.soft_embedding(E, ids, p).to(E.dtype))
        logits = decode.wide(model(inputs_embeds=x, attention_mask=b["s2_attention"]).logits)   # (B, T, V)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["s2_labels"][:, 1:].flatten(), ignore_index=-100)
        # the logit one position before latent slot t (the last <think> token, then each previous latent) scores it
        before = b["s2_latent"][:, 1:]                                                 # (B, T-1)
        kl = topk_kl(logits[:, :-1][before], p, ids)                                   # (n,)
        # mean over an example's latents, then over the batch
        example = torch.repeat_interleave(torch.arange(len(counts), device=kl.device), b["num_latent"])
        per_example = kl.new_zeros(len(counts)).index_add(0, example, kl) / b["num_latent"].clamp(min=1)
        return {"tokens": ce, "examples": per_example.mean()}
