"""Reduction of watch statistics across the ranks of a `torch.distributed` job.

In data-parallel training (DDP, or FSDP2's `fully_shard`) each rank runs its
own micro-batch, and the gradients are averaged across ranks. The watch
therefore reduces what it measures so that every rank records the values of
one process training on the global batch:

- Parameter gradients. DDP leaves the averaged gradient on every rank, so its
  norms are already global. A parameter sharded by FSDP2 is a `DTensor`
  of which each rank stores a slice of the averaged gradient. The squared norm of its
  local slice is summed across ranks.
- The loss is averaged across ranks, as DDP averages the gradients.
- Activations. Sums of squares, element counts, non-finite counts, attention
  entropy sums and row counts are summed, and max |x| and the max attention
  logit take the max across ranks.
- Stream gradients dLoss/d`resid_post`. A rank's backward pass differentiates
  its own loss, and the global loss is the mean of the ranks' losses, so each
  rank's gradient is divided by the world size before squares are summed.

Each optimizer step makes one small all-reduce (the loss and the gradient
norms), and each flush step one all-gather of everything else.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 keeps it in a private module
        from torch.distributed._tensor import DTensor
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Return True for a DTensor with at least one `Shard` placement."""
    if not isinstance(tensor, _dtensor_type()):
        return False
    return any(placement.is_shard() for placement in tensor.placements)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """Return the rank's local tensor of a DTensor, and any other tensor unchanged."""
    if isinstance(tensor, _dtensor_type()):
        return tensor.to_local()
    return tensor


class RankReducer:
    """The reductions a watch makes across the ranks of one process group."""

    def __init__(self, group, sharded_params: list[bool], device: torch.device) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = device
        self.any_sharded = any(sharded_params)
        self._sharded_params = torch.tensor(sharded_params, dtype=torch.bool, device=device)

    @classmethod
    def detect(cls, process_group, params: list[torch.Tensor], device: torch.device) -> "RankReducer | None":
        """Return a reducer for the job that `params` train in, or None outside one.

        `process_group` is "auto" (the default group when `torch.distributed`
        is initialized with more than one rank), None (no reduction), or a
        process group.
        """
        if process_group is None:
            return None
        if isinstance(process_group, str):
            if process_group != "auto":
                raise ValueError(f"process_group must be 'auto', None or a process group, got {process_group!r}")
            if not (dist.is_available() and dist.is_initialized()):
                return None
            # None stands for the default group in every collective, so the
            # watch does not keep the group alive after destroy_process_group().
            group, process_group = dist.group.WORLD, None
        else:
            group = process_group
        if dist.get_world_size(group) == 1:
            return None

        sharded = [is_sharded(p) for p in params]
        group_ranks = sorted(dist.get_process_group_ranks(group))
        for param, param_sharded in zip(params, sharded):
            if not param_sharded:
                continue
            mesh = param.device_mesh
            if mesh.ndim != 1 or sorted(dist.get_process_group_ranks(mesh.get_group())) != group_ranks:
                raise ValueError(
                    "the watch supports parameters sharded over a 1-D device mesh of the same ranks as its "
                    f"process group {group_ranks}; got a mesh of shape {tuple(mesh.shape)} "
                    "(pass process_group= to choose the group)"
                )
        return cls(process_group, sharded, device)

    def contribution_mask(self, sharded: torch.Tensor) -> torch.Tensor:
        """Return where this rank adds its value to a sum: sharded entries on every rank, others on rank 0."""
        if self.rank == 0:
            return torch.ones_like(sharded)
        return sharded

    def sum_step(self, loss: torch.Tensor, grad_sq: torch.Tensor, slice_sq: torch.Tensor, slice_sharded: torch.Tensor):
        """Return the mean loss and the global squared gradient norms, with one all-reduce."""
        mask = torch.cat([self.contribution_mask(self._sharded_params), self.contribution_mask(slice_sharded)])
        squares = torch.cat([grad_sq, slice_sq]).float()
        squares = torch.where(mask, squares, torch.zeros_like(squares))
        packed = torch.cat([(loss.float() / self.world).reshape(1), squares])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        count = grad_sq.numel()
        return packed[0], packed[1 : 1 + count], packed[1 + count :]

    def sum_sharded(self, values: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
        """Return `values` summed over ranks where sharded and taken from rank 0 elsewhere."""
        values = torch.where(self.contribution_mask(sharded), values, torch.zeros_like(values))
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def gather_flush(self, sums: torch.Tensor, maxima: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `sums` summed and `maxima` maxed across ranks, with one all-gather (float64)."""
        local = torch.cat([sums.double(), maxima.double()])
        gathered = torch.empty(self.world * local.numel(), dtype=local.dtype, device=local.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, local, group=self.group)
        rows = gathered.view(self.world, local.numel())
        count = sums.numel()
        # amax propagates NaN, so a NaN on any rank stays visible.
        return rows[:, :count].sum(dim=0), rows[:, count:].amax(dim=0)
