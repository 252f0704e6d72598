"""Multi-process training under ``torchrun``: process-group set-up, sharded loading and cross-rank reductions.

``torchrun --nproc_per_node N -m blindspot.cli train …`` starts ``N`` processes with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment (multi-node: ``--nnodes`` and a rendezvous
endpoint). :meth:`DistContext.from_env` reads them and joins the process group with **nccl** when each process has a
GPU and **gloo** on CPU. Without those variables it returns a single-process context, and every helper here becomes
a no-op, so the same training code runs alone or under ``torchrun``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from blindspot.errors import BlindspotError


@dataclass
class DistContext:
    """Where this process sits in a (possibly single-process) job.

    Attributes:
        rank: global rank (0 … world_size − 1).
        local_rank: rank on this node (selects the GPU).
        world_size: number of processes.
        device: this process's device.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` when no process group is used.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "auto", backend: str | None = None,
                 timeout: timedelta | None = None) -> "DistContext":
        """Join the process group described by ``torchrun``'s environment, or return a single-process context.

        Args:
            device: ``"auto"`` (the local GPU if there is one, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            backend: force ``"gloo"`` or ``"nccl"``; default nccl with GPUs, gloo on CPU.
            timeout: how long a collective (a barrier) waits for the other ranks before it fails (``None``: torch's
                default); a rank that died then ends the job instead of hanging it.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank if world_size > 1 else None)
        if world_size <= 1:
            return cls(0, 0, 1, dev, None)
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            extra = {} if timeout is None else {"timeout": timeout}
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **extra)
        return cls(rank, local_rank, world_size, dev, backend)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    # -- collectives (no-ops for one process) ---------------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (returns a new tensor on this process's device)."""
        out = values.detach().to(self.device, torch.float64).clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def reduce_means(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Global means of per-rank sums: ``Σ_ranks sums[k] / Σ_ranks count`` for every key (same keys on all ranks)."""
        keys = sorted(sums)
        total = self.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64))
        n = float(total[-1])
        return {k: float(total[i]) / n if n > 0 else float("nan") for i, k in enumerate(keys)}

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def shutdown(self) -> None:
        """Leave the process group (call once at the end of a distributed run)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # -- data -----------------------------------------------------------------------------------------------------
    def sampler(self, dataset: Dataset, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DistributedSampler:
        """This rank's shard. Also used with one process, so the order of samples (a permutation drawn from
        ``seed + epoch``) and hence each *global* batch is the same for any number of processes."""
        return DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )

    def loader(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        collate_fn: Callable[[Sequence[Any]], Any] | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> DataLoader:
        """A loader over this rank's shard with a per-rank batch of ``batch_size`` (call ``loader.sampler.set_epoch``
        each epoch when shuffling). Evaluation shards (``shuffle=False``) may repeat a few samples to even out the
        ranks; de-duplicate gathered results by key."""
        generator = torch.Generator().manual_seed(seed * 1000 + self.rank)  # worker seeds
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler(dataset, shuffle, seed, drop_last),
            collate_fn=collate_fn,
            num_workers=num_workers,
            drop_last=drop_last,
            generator=generator,
            persistent_workers=False,  # workers copy the data set each epoch, so its set_epoch state reaches them
        )


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``"auto"`` → the (local) GPU if there is one, else CPU; ``"cuda"`` → ``cuda:local_rank``; errors are one line.

    ``local_rank`` defaults to ``torchrun``'s ``LOCAL_RANK`` (0 without it), so that every process of a job started
    with ``--nproc_per_node N`` gets its own GPU.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BlindspotError(None, f"unknown device {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BlindspotError(None, f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank or 0)
    return dev
