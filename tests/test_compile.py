"""Config.compile: the compiled rollout (torch.compile on a static KV cache) and the compiled log-prob and loss maths
give what the eager path gives. One smoke test per algorithm on a tiny float64 GPT-2 on CPU: the same generator must
give the very same rollouts, and the log-probs, losses and gradients must agree to rounding."""
import copy
from types import SimpleNamespace

import pytest
import torch

import data
import dropout_grpo as dg
import latent_grpo as lg
from test_decode import gen, tiny_gpt2   # the decode tests' float64 GPT-2 and generator

QUESTIONS = ["Ann has 3 pens.", "Ben has 12 cards. Then Ben finds 4 more."]


def assert_same_rollout(eager, compiled, exact: tuple[str, ...], close: tuple[str, ...]):
    for name in exact:
        a, b = getattr(eager, name), getattr(compiled, name)
        assert (a.tolist() if torch.is_tensor(a) else [x.tolist() if torch.is_tensor(x) else x for x in a]) == \
               (b.tolist() if torch.is_tensor(b) else [x.tolist() if torch.is_tensor(x) else x for x in b]), name
    for name in close:
        a, b = getattr(eager, name), getattr(compiled, name)
        for x, y in zip(*((a, b) if isinstance(a, list) else ([a], [b]))):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=name)


def assert_all_close(eager: list, compiled: list):
    """Log-probs, losses, gradients (tensors) and loss statistics (dicts of floats), to rounding."""
    for a, b in zip(eager, compiled, strict=True):
        if isinstance(a, dict):
            assert b == pytest.approx(a, rel=1e-9, abs=1e-12)
        else:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("module", [dg, lg])
def test_compile_flag(module):
    with pytest.raises(ValueError, match="--compile"):
        module.Config(compile="yes")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, on, off = (module.Config(compile=c) for c in ("auto", "true", "false"))
    resolve = (dg.DropoutGRPO if module is dg else lg.LatentGRPO)._compiling      # reads only self.cfg
    assert [resolve(SimpleNamespace(cfg=c), d) for c in (auto, on, off) for d in (cpu, cuda)] == \
           [False, True, True, True, False, False]


def test_dropout_grpo_compiled_matches_eager():
    tok = copy.deepcopy(data.build_tokenizer())
    tok.add_tokens(["<bot>", "<eot>", "<latent>"], special_tokens=True)
    runs = {}
    for flag in ("false", "true"):
        model = tiny_gpt2(len(tok))
        cfg = dg.Config(p=0.3, c_thought=1, max_latent_stage=3, max_new_tokens=6, beta=0.1, compile=flag)
        algo = dg.DropoutGRPO(model, tok, cfg, add_tokens=False)
        algo.stage = 3                                                         # 3 thoughts
        # masked rollouts: the mask hooks run inside the compiled forward; the second reuses the first's cache
        ro, cache = algo.rollout(model, QUESTIONS, 4, gen(1)), algo._spare
        again = algo.rollout(model, QUESTIONS, 4, gen(2))
        assert algo._spare is cache and (cache is not None) == (flag == "true")
        lp = algo.logprobs(model, ro)
        adv = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]] * 2, dtype=torch.float64)
        loss, stats = algo.loss(lp, lp.detach() + 0.05, lp.detach() * 0.9, adv, ro)
        loss.backward()
        runs[flag] = ro, again, lp.detach(), loss.detach(), stats, model.transformer.h[0].mlp.c_fc.weight.grad
    (ro, again, *rest), (ro_c, again_c, *rest_c) = runs["false"], runs["true"]
    assert len(set(ro.texts)) > 1                                              # the masks made the rollouts differ
    for eager, compiled in ((ro, ro_c), (again, again_c)):
        assert_same_rollout(eager, compiled, ("texts", "answer_ids", "lengths", "truncated"),
                            ("sampler_logprobs", "last_hidden"))
    assert_all_close(rest, rest_c)


def test_latent_grpo_compiled_matches_eager():
    tok = copy.deepcopy(data.build_tokenizer())
    tok.add_tokens([lg.THINK, lg.END_THINK], special_tokens=True)
    runs = {}
    for flag in ("false", "true"):
        model = tiny_gpt2(len(tok))
        with torch.no_grad():                      # a likely </think> and EOS, so that rows leave latent mode and stop
            W = model.get_output_embeddings().weight
            for i, token in enumerate((lg.END_THINK, tok.eos_token)):
                W[tok.convert_tokens_to_ids(token)] = torch.randn(W.shape[1], generator=gen(i), dtype=W.dtype)
        cfg = lg.Config(max_response_length=16, noise_scale=1.0, beta=0.1, compile=flag)
        algo = lg.LatentGRPO(model, tok, cfg, add_tokens=False)
        ro, cache = algo.rollout(model, QUESTIONS, 4, gen(1)), algo._spare
        again = algo.rollout(model, QUESTIONS, 4, gen(2))                        # on the first one's cache
        assert algo._spare is cache and (cache is not None) == (flag == "true")
        old = algo.logprobs(model, ro).detach()
        adv = algo.advantages(torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.float64), ro, old)
        new = algo.logprobs(model, ro, adv)                                    # FlipGrad on
        loss, stats = algo.loss(new, old + 0.05, old * 0.9, adv, ro)
        loss.backward()
        runs[flag] = ro, again, old, new.detach(), loss.detach(), stats, model.transformer.h[0].mlp.c_fc.weight.grad
    (ro, again, *rest), (ro_c, again_c, *rest_c) = runs["false"], runs["true"]
    assert 0 < int(ro.num_latent.sum()) < int(ro.lengths.sum())               # latent and token steps both taken
    for eager, compiled in ((ro, ro_c), (again, again_c)):
        assert_same_rollout(eager, compiled, ("texts", "token_ids", "topk_ids", "num_latent", "lengths", "truncated"),
                            ("topk_scores",))
    assert_all_close(rest, rest_c)
