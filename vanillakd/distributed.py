"""torch.distributed for the training scripts: launched by torchrun (single- or multi-node) or by the legacy
``python -m torch.distributed.launch`` (which passes ``--local-rank=N``). NCCL on GPUs, gloo on the CPU.

One process per device; rank 0 alone writes files and prints progress.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0


def launched_processes(local_rank_flag: int = 0) -> tuple[int, int, int]:
    """(world size, rank, local rank) of this launch: torchrun / torch.distributed.launch (``WORLD_SIZE``),
    or one task of a multi-task ``srun`` step; else one process. The names are read with timm's
    ``world_info_from_env``; unlike timm's ``is_distributed_env``, a shell of a multi-task allocation
    (``SLURM_NTASKS`` > 1 but no srun step of several tasks) is one process, not a rank waiting for others."""
    from timm.utils import world_info_from_env
    local_rank, rank, world = world_info_from_env()
    if not any(v in os.environ for v in ("LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
                                         "OMPI_COMM_WORLD_LOCAL_RANK")):
        local_rank = local_rank_flag  # a launcher that passes --local-rank only
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), rank, local_rank
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return world, rank, local_rank
    return 1, 0, local_rank


def init_distributed(local_rank_flag: int = 0, want_cuda: bool | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the process group when launched as several processes; otherwise a single process.

    The group is joined here rather than by timm's ``init_distributed_device`` because that takes no timeout,
    and a rank that dies leaves the others blocked in a collective for as long as the timeout says."""
    world, rank, local_rank = launched_processes(local_rank_flag)
    if world <= 1:
        return DistInfo(1, 0, local_rank)
    if dist.is_initialized():
        return DistInfo(dist.get_world_size(), dist.get_rank(), local_rank)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        names = " and ".join(missing)
        raise UserError(f"{world} processes were launched but {names} not set: export rank 0's address and a free "
                        "port (torchrun sets them itself)")
    # torch's env:// rendezvous reads these names (an srun step sets its own, as timm copies them)
    os.environ.update(LOCAL_RANK=str(local_rank), RANK=str(rank), WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available() if want_cuda is None else want_cuda
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_world_size(), dist.get_rank(), local_rank)


def teardown(info: DistInfo) -> None:
    """Barrier, then destroy the group: a rank leaving early under load can otherwise abort the others."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (no gradient); ``t`` itself in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def replicas_in_sync(module: nn.Module) -> bool:
    """Whether every rank holds the same parameters and buffers (a checksum compared across ranks)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    with torch.no_grad():
        values = [t.detach().double().flatten() for t in list(module.parameters()) + list(module.buffers())
                  if t.is_floating_point()]
        local = torch.stack([torch.cat(values).sum(), torch.cat(values).abs().sum(),
                             (torch.cat(values) * torch.arange(sum(v.numel() for v in values), device=values[0].device,
                                                               dtype=torch.float64).remainder(7919)).sum()])
    everyone = all_gather_cat(local[None])
    return bool((everyone == everyone[0]).all())


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
