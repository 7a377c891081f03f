"""The processes of a run, for training and generation alike: rank, world size and local rank
from the launcher's environment (``torchrun`` or ``deepspeed``; one process when unset), the
device (one GPU per local rank, else the CPU) and the process group (nccl on GPUs, gloo on the
CPU), created here unless the launcher's code already did.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch


class Distributed:
    """Rank and world size of this process; ``timeout`` is the process group's (None: torch's
    default), for runs where some ranks wait long for rank 0 at a barrier."""

    def __init__(self, timeout: Optional[datetime.timedelta] = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self._owns_group = False
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(
                backend, **({} if timeout is None else dict(timeout=timeout)))
            self._owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """``obj`` from rank 0 on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self._owns_group:
            torch.distributed.destroy_process_group()
