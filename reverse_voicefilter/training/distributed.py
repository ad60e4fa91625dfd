"""Several processes, one run: DistributedDataParallel under ``torchrun``.

Without torchrun everything here is a no-op for rank 0 of 1, so the training
code reads the same either way. Rank 0 validates, logs, writes checkpoints and holds the run folder's lock;
the others wait at :func:`barrier`.
"""
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from reverse_voicefilter.core.cli import pick_device
from reverse_voicefilter.core.errors import UserError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Dist:
    """This process's place in the run: rank 0 of 1 without torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return torch_dist.is_available() and torch_dist.is_initialized()


def setup_distributed(device_name):
    """One device per process. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) join the
    process group: nccl with cuda:LOCAL_RANK on GPUs, gloo on CPU."""
    if not all(k in os.environ for k in TORCHRUN_VARIABLES):
        return Dist(device=pick_device(device_name))
    rank, world, local = (int(os.environ[k]) for k in TORCHRUN_VARIABLES)
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"multi-process training runs on CUDA or CPU, not {device.type} (pass --device cpu)")
    torch_dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def barrier(dist):
    if dist.active:
        if dist.device.type == "cuda":
            torch_dist.barrier(device_ids=[dist.local_rank])
        else:
            torch_dist.barrier()


def wrap(model, dist):
    """``model`` in DistributedDataParallel when there are several processes; itself otherwise."""
    if dist.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_step(loss, signum, dist):
    """The step's loss as a float (averaged over processes) and the signal any process got (0: none).

    A synchronization point, once per step (the original's ``loss.item()``): every process
    learns of a Ctrl-C on any of them at the same step, so they all stop and save together.
    """
    if not dist.active:
        return loss.item(), signum
    loss = loss.float().clone()
    torch_dist.all_reduce(loss)
    flag = torch.tensor([signum], device=dist.device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return loss.item() / dist.world_size, int(flag.item())
