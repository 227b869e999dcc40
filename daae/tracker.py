"""Losses summed on the device between log steps, and the non-finite check,
both across every process of a run."""
from __future__ import annotations

import torch

LOSS_NAMES = ("reconstruction", "discriminator_z", "discriminator_y", "adversarial_z",
              "adversarial_y", "supervised", "correlation", "decorrelation", "consistency", "vat",
              "independence")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops before writing another checkpoint."""


class LossTracker:
    """Sums losses on the device and remembers the first non-finite step of
    each, so that the host only syncs when it logs or checkpoints. A step's
    losses go in as one stacked vector: five operators a step, however many
    losses (one at a time took 67 for the shipped configs' eleven, more host
    time than a CUDA-graphed iteration's single replay)."""

    NEVER = torch.iinfo(torch.long).max

    def __init__(self, device):
        self.device = device
        # Keyed by the loss names a step returns, in its order (the set changes
        # when a term starts): sums since the last pop, steps summed, and each
        # loss's first non-finite step (NEVER if none).
        self.sums: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}
        self.first_bad: dict[tuple, torch.Tensor] = {}

    def add(self, step: int, losses: dict) -> None:
        names = tuple(losses)
        values = torch.stack(tuple(losses.values()))
        if names not in self.sums:
            self._begin(names, torch.zeros(len(names), device=self.device), 0)
        self.sums[names] += values
        self.counts[names] += 1
        first_bad = self.first_bad[names]
        self.first_bad[names] = torch.where(torch.isfinite(values), first_bad,
                                            first_bad.clamp_max(step))

    def partial_sums(self) -> list[tuple[tuple, torch.Tensor, int]]:
        """(names, sums, steps summed) of every set of losses since the last
        pop, in the order they first came: a checkpoint carries them."""
        return [(names, sums, self.counts[names]) for names, sums in self.sums.items()]

    def restore(self, names: tuple, sums: torch.Tensor, count: int) -> None:
        """Go on from a checkpoint's ``partial_sums`` entry (no loss was
        non-finite there: the checkpoint is written after the check)."""
        self._begin(names, sums.to(self.device).clone(), count)

    def _begin(self, names: tuple, sums: torch.Tensor, count: int) -> None:
        self.sums[names] = sums
        self.counts[names] = count
        self.first_bad[names] = torch.full((len(names),), self.NEVER, dtype=torch.long,
                                           device=self.device)

    def check(self) -> None:
        """Raises on every process when a loss went non-finite on any: one
        process stopping alone would leave the others waiting in their next
        collective (until NCCL's timeout, under a launcher that does not kill them)."""
        first_bads = _across_processes(self.first_bad, torch.distributed.ReduceOp.MIN)
        bad = [(step, name) for names, first_bad in first_bads.items()
               for step, name in zip(first_bad.tolist(), names) if step != self.NEVER]
        if bad:
            step, name = min(bad)
            raise NonFiniteLossError(f"the {name} loss became non-finite at step {step}")

    def pop_means(self) -> dict[str, float]:
        """Each loss's mean since the last call, over every process's batches
        (every process has run the same steps)."""
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        processes = _process_count()
        all_sums = _across_processes(self.sums, torch.distributed.ReduceOp.SUM)
        for names, sums in all_sums.items():
            if self.counts[names] == 0:
                continue
            for name, total in zip(names, sums.tolist()):
                totals[name] = totals.get(name, 0.0) + total
                counts[name] = counts.get(name, 0) + self.counts[names] * processes
        for sums in self.sums.values():
            sums.zero_()
        self.counts = dict.fromkeys(self.counts, 0)
        return {name: totals[name] / counts[name] for name in sorted(totals, key=LOSS_NAMES.index)}


def _process_count() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def _across_processes(tensors: dict, op) -> dict:
    """``tensors`` reduced with ``op`` over the processes, in one collective;
    the same dict when there is one process. Every process holds the same keys
    in the same order: they come from the same steps."""
    if _process_count() == 1 or not tensors:
        return tensors
    flat = torch.cat(list(tensors.values()))
    torch.distributed.all_reduce(flat, op=op)
    return dict(zip(tensors, flat.split([len(t) for t in tensors.values()])))
