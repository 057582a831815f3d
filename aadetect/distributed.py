"""Data-parallel training under `torchrun`: the process group and what the processes share.

`torchrun --nproc_per_node=N -m aadetect train DATA` starts N processes, each with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment. Each trains on its share of every batch,
through `DistributedDataParallel` (gloo on the CPU, NCCL on GPUs, one GPU per process); the robust rule,
early stopping and the batch-norm statistics are made the same on all of them (`gather_rows`, `average`,
`average_batch_norm`), and `check_same_weights` makes sure they end with the same model. Rank 0 alone
fits the density and writes the model folder (`aadetect.pipeline.train`).

Outside torchrun none of this runs: without a process group every function here is what one process
would do (rank 0 of 1), and training is exactly as before.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from aadetect.devices import resolve_device
from aadetect.errors import UserError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# how long the other processes wait for rank 0 to fit the density and write the model (the process group's
# own timeout, 10 minutes with NCCL, is for collectives that should take seconds); a rank 0 that fails
# ends the run sooner: torchrun then stops them
WRITER_TIMEOUT = timedelta(hours=24)
_patient_group = None  # a gloo group with that timeout, for `barrier`


def launched() -> bool:
    """Started by torchrun (or anything else that sets its environment)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Is there a process group: is this process one of several training together?"""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a process on its own: the one that writes files and reports progress."""
    return rank() == 0


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join torchrun's process group for the block; gives this process's device: `cpu` (gloo), or the GPU
    of its LOCAL_RANK (NCCL) for `cuda` or `auto` where CUDA is present."""
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(f"started as one of several processes (RANK is set) but {missing[0]} is not set; "
                        f"start training with torchrun")
    name = resolve_device(device)
    if name.startswith("cuda"):
        if ":" in device:
            raise UserError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                            f"pass --device cuda")
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA device(s) present")
        name = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if name.startswith("cuda") else "gloo")
    global _patient_group
    _patient_group = dist.new_group(backend="gloo", timeout=WRITER_TIMEOUT)
    try:
        yield name
    finally:
        dist.destroy_process_group()
        _patient_group = None


def barrier() -> None:
    """Wait until every process gets here, however long rank 0 takes to write the model."""
    if active():
        dist.barrier(group=_patient_group)


def wrap(module: nn.Module, device: str) -> nn.Module:
    """`module` whose gradients are averaged over the processes at each backward pass; itself alone.
    Buffers are not broadcast at each step: `average_batch_norm` makes them agree once an epoch."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if str(device).startswith("cuda") else None
    # broadcast_buffers is deprecated for forward_sync_buffers in newer torch (both sync buffers at the start)
    options = inspect.signature(DistributedDataParallel).parameters
    keep_buffers = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=device_ids, **{keep_buffers: False})


def _on_wire(tensor: torch.Tensor) -> torch.Tensor:
    """Where the backend can send it from: NCCL sends GPU tensors only."""
    if dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def share(count: int) -> torch.Tensor:
    """Positions 0..count-1 that this process handles: every size()-th one from its rank."""
    return torch.arange(rank(), count, size())


def gather_rows(local: torch.Tensor, count: int) -> torch.Tensor:
    """Every process's rows for its `share(count)`, put back in order: the same (count, ...) tensor on all."""
    if not active():
        return local
    per_process = -(-count // size())
    padded = local.new_zeros((per_process, *local.shape[1:]))
    padded[:len(local)] = local
    padded = _on_wire(padded)
    parts = [torch.empty_like(padded) for _ in range(size())]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).flatten(0, 1)[:count].to(local.device)  # row i of rank r is position i*size + r


def average(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the processes (floating point), the same on all."""
    if not active():
        return tensor
    total = _on_wire(tensor.clone())
    dist.all_reduce(total)
    return (total / size()).to(tensor.device)


def average_batch_norm(model: nn.Module) -> None:
    """Set every batch norm's running mean and variance to their mean over the processes: each saw its own
    share of the batches (SyncBatchNorm would share each batch's statistics, but does not run on the CPU)."""
    if not active():
        return
    buffers = [buffer for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
               for buffer in (module.running_mean, module.running_var) if buffer is not None]
    if not buffers:
        return
    flat = average(torch.cat([buffer.flatten() for buffer in buffers]))
    for buffer, values in zip(buffers, flat.split([buffer.numel() for buffer in buffers])):
        buffer.copy_(values.view_as(buffer))


def check_same_weights(model: nn.Module) -> None:
    """Raise on every process unless all of them hold bit for bit the same weights and buffers: rank 0
    writes its model as the one they trained together."""
    if not active():
        return
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.tensor(int.from_bytes(digest.digest()[:7], "big"), dtype=torch.int64)
    digests = gather_rows(mine.view(1), size())
    if not bool((digests == digests[0]).all()):
        raise RuntimeError(f"the {size()} training processes ended with different weights (digests "
                           f"{[hex(int(d)) for d in digests]}); the model was not written")
