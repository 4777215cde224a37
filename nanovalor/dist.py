"""The little torch.distributed that train.py needs: the same script alone, under torchrun with DDP, or with FSDP2;
and how a rank's batch runs: micro-batches (gradient accumulation) under bf16 autocast on CUDA.

    python train.py ...                               # one process: every helper here is a no-op
    torchrun --nproc_per_node=2 train.py ...          # gloo on CPU, NCCL on GPU
"""
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist


def init():
    """(rank, world size, device); starts the process group under torchrun (idempotent)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def print0(*args):
    """print on rank 0 only, flushed (the log of a run)."""
    if rank_and_world()[0] == 0:
        print(*args, flush=True)


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(x, device):
    """A number (or list of numbers) summed over ranks, as a float64 tensor."""
    t = torch.as_tensor(x, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_min(n, device):
    """The smallest of an integer over ranks."""
    t = torch.tensor(n, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def micro_batches(n, size):
    """Slices that cut n rows into micro-batches of `size` (the last may be shorter)."""
    return [slice(i, i + size) for i in range(0, n, size)]


def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights, fp32 log-softmax inside token_logprobs); fp32 on CPU."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def shard(module, blocks):
    """FSDP2: fully_shard each of `blocks` (one unit each), then `module`, the root, which holds the rest. Done on
    the meta device, before the weights are read, so that each rank reads only its own rows. Every training pass must
    go through the root's forward: the gathering, gradient and resharding hooks run only there."""
    from torch.distributed.fsdp import fully_shard
    for block in blocks:
        fully_shard(block)
    return fully_shard(module)


def replicate(module):
    """DDP under torchrun with more than one rank (its weights in place: DDP broadcasts rank 0's), else `module`."""
    return torch.nn.parallel.DistributedDataParallel(module) if rank_and_world()[1] > 1 else module


def no_sync_unless_last(wrapped, i, n):
    """DDP all-reduces gradients on the last of n micro-batches only (gradient accumulation)."""
    return wrapped.no_sync() if hasattr(wrapped, "no_sync") and i < n - 1 else nullcontext()


@contextmanager
def gathered(module, fsdp):
    """FSDP: all-gather the parameters once for a whole rollout, not once per decoded token, and reshard after."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]  # the root first
    # FSDP decides which unit is the root lazily, at the first forward; here the decoder blocks run before the root
    # ever has, so make the root claim that role first (else each block would take itself for a root).
    units[0]._get_fsdp_state()._lazy_init()
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(True)
            m.reshard()
