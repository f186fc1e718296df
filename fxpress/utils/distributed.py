"""Data parallelism across processes: who am I, my share of the batches, sums over every process.

`torchrun --nproc-per-node N -m fxpress.cli run ...` starts N processes with RANK, WORLD_SIZE and
MASTER_ADDR/PORT in their environment; `init_from_env()` joins them into one process group (gloo on
CPU, nccl for CUDA tensors).  Passes then work on `shard(batches)` - this process's share of the
calibration batches - and add up what they measured with `all_reduce_sum` / `sum_floats`, so every
process ends with the same numbers (up to float summation order) and takes the same decision.  A
trainer either sums gradients (`sum_gradients`, a replicated model) or trains an FSDP2 copy
(`fully_shard_copy`, gradients and optimizer state sharded).  Rank 0 (`is_main()`) writes.

With one process (no WORLD_SIZE, or WORLD_SIZE=1, or no process group) every helper is the identity
and nothing from torch.distributed is touched: the single-process path is exactly the old one.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Iterable, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when no process group is up."""
    if not _group_ready():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on the process that writes artifacts and reports (rank 0; the only one without a group)."""
    return world()[0] == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); True when joined.

    gloo; with CUDA also nccl for CUDA tensors (each process on cuda:LOCAL_RANK, wrapping around the devices there are).  A second call, or
    a single-process environment, does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _group_ready():
        return _group_ready()
    import torch.distributed as dist

    if torch.cuda.is_available():  # nccl for CUDA tensors; gloo still reduces what lives on the CPU
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return True


def close() -> None:
    """Leave the process group (after a barrier, so no process exits while another still reduces)."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every world-size-th item from its rank (``items[rank::size]``).

    Strided, so shares differ in length by at most one and their union, over all ranks, is exactly
    `items` (what a single process sees as a whole).  A rank may get nothing when there are fewer items
    than processes; it still joins every reduction, contributing zeros."""
    rank, size = world()
    return list(items)[rank::size]


def _reduce(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over every process (a new tensor; `tensor` itself with one)."""
    return _reduce(tensor) if _group_ready() else tensor


def sum_floats(values: Iterable[float]) -> list[float]:
    """Python floats summed elementwise over every process (in float64)."""
    values = list(values)
    if not _group_ready():
        return values
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise mean of `tensor` over every process."""
    return all_reduce_sum(tensor) / world()[1]


def sum_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its sum over every process (one flat reduction).

    A parameter without a gradient on this process counts as zeros, so processes that had no batch
    this step still take part; one without a gradient on every process keeps ``grad=None`` (an
    optimizer skips it, as it would in a single process)."""
    params = list(params)
    if not _group_ready() or not params:
        return
    dtype = torch.float32
    for param in params:
        dtype = torch.promote_types(dtype, param.dtype)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype)
    flat = _reduce(torch.cat([*grads, present]))
    offset = 0
    for index, param in enumerate(params):
        count = param.numel()
        seen = bool(flat[-len(params) + index] > 0)
        param.grad = flat[offset: offset + count].view_as(param).to(param.dtype) if seen else None
        offset += count


def fully_shard_copy(module: nn.Module, trainable: set[str]) -> nn.Module:
    """A deep copy of `module` with its parameters sharded over the processes by FSDP2 (`fully_shard`).

    Only the parameters named in `trainable` require grad.  Parameters stay gathered from forward to
    backward (``reshard_after_forward=False``); on backward FSDP2 reduce-scatters the gradients and
    averages them over the processes (its default: gloo has no PREMUL_SUM for another divisor), so a
    process that wants the sum scales its loss by the world size.  Gradients and optimizer state live
    sharded; `gather_parameters` gives the full tensors back."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with warnings.catch_warnings():  # deep-copying a GraphModule warns about torch's own pytree specs
        warnings.simplefilter("ignore", FutureWarning)
        sharded = copy.deepcopy(module)
    for name, param in sharded.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in trainable)
    device = next(sharded.parameters()).device.type
    fully_shard(sharded, mesh=init_device_mesh(device, (world()[1],)), reshard_after_forward=False)
    return sharded


def sharded_method(module: nn.Module, name: str, function: Callable) -> Callable:
    """`function` set as `module.<name>` so that FSDP2 gathers the parameters around each call, as it
    does around `forward` (for code that runs the module another way, e.g. an fx Interpreter)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(module, name, function)
    register_fsdp_forward_method(module, name)
    return getattr(module, name)


def gather_parameters(module: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The full tensors of the named (sharded) parameters of a `fully_shard_copy`, on every process."""
    return {name: module.get_parameter(name).full_tensor().detach() for name in names}


def shard_like(tensor: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """`tensor` (the same on every process) laid out as the sharded parameter `sharded` is."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor, sharded.device_mesh, sharded.placements)
