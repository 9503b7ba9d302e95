"""
Running the one loop on N processes (torchrun): rank and world, reductions, weight sharding, rank-0 writing.

    torchrun --nproc_per_node 8 train.py --preset latent-grpo-gsm8k-llama --model DIR                 # replicated
    torchrun --nproc_per_node 8 train.py --preset latent-grpo-gsm8k-llama --model DIR --parallel fsdp   # sharded

Without torchrun (no WORLD_SIZE in the environment) every function here is the identity or a no-op, so one process
runs exactly the code it runs without this module.

--parallel ddp keeps a full copy of the weights on every rank and averages the gradients after each backward pass
(`average_gradients`): the arithmetic of DistributedDataParallel, without its wrapper, because the algorithms call the
Hugging Face model's own methods (`get_input_embeddings`, `config`, `device`), run many forward calls per backward
(a latent chain) and compare `model is self.model`; a wrapper would hide the first and break the other two.

--parallel fsdp shards weights, gradients and AdamW states with FSDP2 (`fully_shard` on every decoder layer, then on
the whole model, which keeps the embeddings, final norm and head). `fully_shard` changes the model's class in place,
so the model object, its methods and the forward hooks on its inner modules stay as they are. Rollouts, log-prob
passes, the update and evaluation run on the gathered weights (`gathered`: one all-gather per phase, not one per
decoding step): the algorithms read the embeddings outside a forward call, and Dropout-GRPO runs many forward calls
per backward pass, which per-layer resharding after each call would break. Gradients and AdamW states stay sharded.
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join torchrun's process group (env:// rendezvous) when WORLD_SIZE > 1: NCCL on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))  # torchrun sets RANK


def is_main() -> bool:
    return rank() == 0


def device(name: str) -> str:
    """torchrun's LOCAL_RANK picks this process's GPU when the device is `auto` or a bare `cuda`."""
    if world() > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return name


def seed(base: int) -> int:
    """A per-rank seed: `base` on rank 0 (one process draws exactly what it drew before), distinct on the others."""
    return base + 1_000_003 * rank()


# --------------------------------------------------------------------------------------------------------------
# Reductions (each a no-op in one process)


def sum_int(x: int) -> int:
    return int(_reduce(torch.tensor([x], dtype=torch.float64), dist.ReduceOp.SUM)[0]) if world() > 1 else x


def min_int(x: int) -> int:
    return int(_reduce(torch.tensor([x], dtype=torch.float64), dist.ReduceOp.MIN)[0]) if world() > 1 else x


def sum_float(x: float) -> float:
    return float(_reduce(torch.tensor([x], dtype=torch.float64), dist.ReduceOp.SUM)[0]) if world() > 1 else x


def mean_metrics(metrics: dict) -> dict:
    """Every numeric metric averaged over ranks (each rank holds the same number of groups, so the mean of the
    per-rank means is the global mean). Every rank must log the same keys."""
    if world() == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    values = _reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64), dist.ReduceOp.SUM) / world()
    return {**metrics, **dict(zip(keys, values.tolist()))}


def _reduce(x: torch.Tensor, op) -> torch.Tensor:
    # gloo reduces CPU tensors, NCCL CUDA ones
    on = x.to(f"cuda:{torch.cuda.current_device()}") if dist.get_backend() == "nccl" else x
    dist.all_reduce(on, op=op)
    return on.cpu()


def share(items: list) -> list:
    """This rank's share of `items`, strided (rank, rank + world, ...): the shares differ by at most one item."""
    return items[rank()::world()]


def gather_shares(mine: list, n: int) -> list:
    """The inverse of `share` over all ranks: the n items in their original order, on every rank."""
    if world() == 1:
        return mine
    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    out = [None] * n
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


# --------------------------------------------------------------------------------------------------------------
# Weights: replicated (ddp) or sharded (fsdp)


def decoder_layers(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def wrap(model, parallel: str):
    """ddp: every rank starts from rank 0's weights. fsdp: fully_shard each decoder layer, then the model."""
    if world() == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    else:
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    return model


def fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def average_gradients(params) -> None:
    """ddp: each gradient of `params` (every parameter the step trains, a second network's too) becomes the mean over
    ranks, as DistributedDataParallel's. fsdp reduce-scatters the gradients of the parameters it shards (DTensors)
    itself; any other trained parameter (Latent-SFT's encoder, which is not sharded) is averaged here."""
    if world() == 1:
        return
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None and not isinstance(p, DTensor)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


@contextlib.contextmanager
def gathered(model, layers: bool = True):
    """fsdp: the full weights for the phase inside (layers=False: only the model's own, non-layer weights, for a
    forward + backward whose layers gather themselves). Elsewhere a no-op.

    The model's own weights (embeddings, final norm, head) may be read outside its forward call (Latent-GRPO mixes
    embedding rows into its inputs), so part of their gradient arrives after FSDP's post-backward hook, which fires
    when the gradient of the forward's inputs is ready and reduce-scatters what has arrived by then. What arrives
    later is left on the gathered weight: it is averaged here when the phase ends, as FSDP averages, and added to
    the sharded gradient. The decoder layers are used only inside their own forward calls."""
    if world() == 1 or not fsdp(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import distribute_tensor

    in_layers = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    sharded = {n: p for n, p in model.named_parameters() if id(p) not in in_layers}   # the model's own, DTensors
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)] if layers else [model]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.unshard()
    full = {n: p for n, p in model.named_parameters() if n in sharded}   # the same weights, gathered
    try:
        yield
        # every rank runs the same computation, so the same weights have a late gradient on every rank, in order
        for n, p in full.items():
            if p.grad is None:
                continue
            dist.all_reduce(p.grad)
            p.grad /= world()                               # g = (1 / world) sum_r g_r, as FSDP's reduce-scatter
            shard = distribute_tensor(p.grad, sharded[n].device_mesh, sharded[n].placements, src_data_rank=None)
            sharded[n].grad = shard if sharded[n].grad is None else sharded[n].grad + shard
            p.grad = None
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)


def ordinary_copy(module: torch.nn.Module) -> torch.nn.Module:
    """copy.deepcopy(module), also of a Hugging Face module that FSDP2 has sharded, or whose layers it has (deepcopy
    refuses those): the copy is then rebuilt from the module's own class and config on the meta device and given
    the full weights, gathered on every rank, and the buffers: an ordinary, unsharded module."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not any(isinstance(m, FSDPModule) for m in module.modules()):
        return copy.deepcopy(module)
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))   # FSDP<cls> -> cls
    with torch.device("meta"):
        out = cls(module.config)
    # every rank gathers every weight, in the same order (state_dict holds the sharded DTensors)
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
             for k, v in module.state_dict().items()}
    out.load_state_dict(state, strict=False, assign=True)
    for name, buffer in module.named_buffers():   # non-persistent buffers too (rotary frequencies)
        owner, _, leaf = name.rpartition(".")
        out.get_submodule(owner)._buffers[leaf] = buffer.detach().clone()
    if hasattr(out, "tie_weights"):
        out.tie_weights()
    assert not any(t.is_meta for t in [*out.parameters(), *out.buffers()]), "a weight was not copied"
    return out.train(module.training)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, whose value is the global norm: fsdp's sharded gradients (DTensors) give a
    DTensor norm, read as its full value; a mix of sharded and ordinary gradients (Latent-SFT's encoder beside the
    sharded decoder) is clipped by the norm of both, ||g|| = sqrt(||g_sharded||^2 + ||g_ordinary||^2)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    parts = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    if world() == 1 or not all(parts):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    norms = [torch.nn.utils.get_total_norm([p.grad for p in part]) for part in parts]
    norm = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]).norm()
    coef = min(1.0, max_norm / (float(norm) + 1e-6))   # clip_grad_norm_'s coefficient, clamped at 1
    for p in params:
        p.grad.mul_(coef)
    return norm


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: one ordinary checkpoint, written by rank 0


def full_state_dict(model) -> dict | None:
    """The model's full state dict on CPU, on rank 0 (None on the others; every rank must call this)."""
    if world() == 1 or not fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, opt) -> dict:
    """The optimiser's state as one process would save it (fsdp: gathered to rank 0)."""
    if world() == 1 or not fsdp(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, state: dict) -> None:
    if world() == 1 or not fsdp(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def per_rank(value):
    """`value` in one process; under torchrun the list of every rank's value, rank order (saved by rank 0)."""
    if world() == 1:
        return value
    parts = [None] * world()
    dist.all_gather_object(parts, value)
    return parts
