"""Multi-process training (``accelerate launch`` / ``torchrun``): the few collective operations DDPO needs.

One process per GPU, each with its own vector environment. Per epoch:

1. **Sampling is split by sample batch**: process r samples batches r, r + W, r + 2W, ... of the epoch, each
   seeded by its *global* index, so the epoch's trajectories are exactly those of a one-process run.
2. **The rollout buffer is gathered** (:func:`sync_rollout_buffer`): every process then holds the whole
   epoch — latents, log-probs, rewards, prompts — as a one-process run would (the same memory as one
   process holding the epoch's samples, which a single GPU does anyway). Rewards and prompts are global, so
   the per-prompt advantages are computed over the global batch, identically on every process.
3. **Training splits every minibatch**: the shuffle is drawn from the same seeded generator on every
   process; process r trains on the r-th contiguous chunk of each global minibatch, and the adapter's
   gradients are averaged (:meth:`Distributed.all_reduce_grads`) before each optimizer step. Equal chunks
   make the average of per-process means the global mean, so one update equals a one-process update on the
   same global batch up to float summation order (``tests/test_real_scale_distributed.py`` checks it).
4. **Logging, images, evaluation and checkpoints** happen on the main process only; training metrics
   (losses, KL, clip fractions) are averaged over processes first.

With one process (no launcher), :class:`Distributed` is inert and training is bit-identical to before.
The process group is created from the launcher's environment variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Tensors of DenoisingRolloutBuffer filled per sample batch (rows of trajectories); zeros elsewhere.
BUFFER_TENSORS = ("latents", "timesteps", "log_probs", "rewards", "prompt_embeds", "prompt_ids")


class Distributed:
    """Rank, world size and collectives; every method is a no-op (or identity) with one process.

    Args:
        rank: This process's global rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)

    @classmethod
    def from_environment(cls, device: str = "cpu") -> Distributed:
        """Join the process group a launcher set up (``WORLD_SIZE > 1``), or a single-process instance."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)  # before the process group: NCCL binds to the current device
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> torch.device:
        """This process's device: ``cuda`` becomes ``cuda:<local_rank>`` when distributed."""
        dev = torch.device(device)
        if self.enabled and dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.local_rank)
        return dev

    def local_batches(self, num_batches: int) -> range:
        """The global sample-batch indices this process samples: ``rank, rank + W, ...``."""
        return range(self.rank, num_batches, self.world_size)

    def shard(self, indices: Tensor) -> Tensor:
        """This process's contiguous chunk of a global minibatch's trajectory indices."""
        if not self.enabled:
            return indices
        size = len(indices) // self.world_size
        return indices[self.rank * size : (self.rank + 1) * size]

    # -- collectives ------------------------------------------------------------------------------
    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over processes."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average gradients over processes (one flat all-reduce).

        Parameters without a gradient are left alone (every process runs the same graph, so the set is the
        same everywhere), as AdamW skips them in a one-process run too.
        """
        if not self.enabled:
            return
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_sum_(flat).div_(self.world_size)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            count = grad.numel()
            param.grad = flat[offset : offset + count].view_as(param).clone()
            offset += count

    def broadcast_parameters(self, params: Iterable[Tensor], src: int = 0) -> None:
        """Copy ``src``'s values into every process's ``params`` (the adapters start identical)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for param in params:
                dist.broadcast(param.data, src=src)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (``[obj]`` with one process)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def average_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of each float metric over processes (losses of equal shards average to the global loss)."""
        if not self.enabled or not metrics:
            return metrics
        keys = list(metrics)  # the same keys in the same order on every process: the same code ran
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            values = values.cuda()
        values = self.all_reduce_sum_(values) / self.world_size
        return {key: float(value) for key, value in zip(keys, values.tolist(), strict=True)}

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def sync_rollout_buffer(dist: Distributed, buffer: Any, owned_rows: Sequence[int]) -> None:
    """Give every process the whole epoch: the union of the rows each process filled.

    Each process filled only its own trajectories (rows ``owned_rows``), leaving zeros elsewhere (the buffer
    is zeroed at reset), so a sum over processes *is* the gather, exactly. Prompts and group ids (not
    tensors) travel as objects. Afterwards the buffer is full and identical on every process.

    Args:
        dist: The process group.
        buffer: A ``DenoisingRolloutBuffer`` filled on ``owned_rows``.
        owned_rows: Trajectory rows this process filled.
    """
    rows = np.asarray(list(owned_rows), dtype=np.int64)
    if dist.enabled:
        for name in BUFFER_TENSORS:
            dist.all_reduce_sum_(getattr(buffer, name))
        parts = dist.gather_objects((rows, [buffer.prompts[i] for i in rows], buffer.group_ids[rows]))
        for part_rows, prompts, group_ids in parts:
            for row, prompt in zip(part_rows, prompts, strict=True):
                buffer.prompts[int(row)] = prompt
            buffer.group_ids[part_rows] = group_ids
    buffer.full = True


__all__ = ["Distributed", "sync_rollout_buffer"]
