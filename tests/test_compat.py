"""compat.py: the KV cache goes to each model under the name its forward declares, so no release warns."""
import warnings

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import compat


class OldForward(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return past_key_values


class NewForward(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return cache


def test_the_name_follows_the_forward_signature():
    marker = object()
    for cls, name in ((OldForward, "past_key_values"), (NewForward, "cache")):
        model = cls()
        assert compat.cache_arg(model, marker) == {name: marker}
        assert model(**compat.cache_arg(model, marker)) is marker
        wrapped = torch.nn.Module()
        wrapped.module = model   # DDP's layout: the model it wraps is .module
        assert compat.cache_arg(wrapped, marker) == {name: marker}


def test_a_cached_forward_fills_the_cache_without_a_deprecation_warning():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).eval()
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(input_ids=torch.tensor([[1, 2, 3]]), **compat.cache_arg(model, cache), use_cache=True)
    assert cache.get_seq_length() == 3 and compat.output_cache(out) is cache
