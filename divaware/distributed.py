"""Data-parallel training over ``torchrun`` ranks: every piece of rank logic the training loop needs.

``divaware train`` started by ``torchrun --nproc_per_node N -m divaware train --config ...`` trains with
PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel`; started without torchrun, :func:`setup`
returns a one-rank :class:`Ranks` whose methods hand their inputs back unchanged, so the single-process run
is exactly today's. The loop in :mod:`divaware.train` calls these methods and holds no rank logic itself.

What stays correct when a batch is spread over ranks, and how:

* **The batch is global.** ``batch_size`` is the number of cases per optimiser step over *all* ranks, so a
  config means the same run on any number of ranks (and a run may be resumed on another number). The global
  batches of epoch e are those the single-process loader would draw, from a permutation seeded by
  (seed, epoch) only (:func:`global_batches`); rank r takes a contiguous slice of each (:func:`rank_slices`),
  so every training case is seen exactly once per epoch across ranks. A rank left without a case in a short
  last batch computes one case with coefficient 0 (DDP needs every rank in every gradient all-reduce), which
  contributes nothing.
* **Weights and online strategies see the global batch.** :meth:`Ranks.gather_losses` all-gathers the
  per-case ``(patient_id, loss)`` pairs of the step; every rank then calls ``strategy.batch_weights`` on the
  same global batch, so weights are looked up by ``patient_id`` and GroupDRO's q is updated from the group
  losses over all ranks' cases: every rank holds the same q (checked each epoch by :meth:`Ranks.check_same`).
* **The objective is normalised over the global batch**, whatever normalisation the objective uses
  (Σwℓ/Σw over the batch, or 1/B with training-set-mean weights): :meth:`Ranks.objective` evaluates the
  objective on the gathered losses, takes dL/dℓᵢ for the rank's own cases and back-propagates
  ``N · Σᵢ (dL/dℓᵢ) ℓᵢ``; DDP's gradient *average* over N ranks then equals the gradient of the
  single-process objective on the global batch (exactly, in exact arithmetic, for any objective).
* **Validation is sharded and gathered.** Each rank validates ``val_ids[rank::N]``; :meth:`Ranks.gather_frame`
  concatenates the per-case scores in the original order, so the refresh and model selection see every
  validation case exactly once.
* **Only rank 0 writes**, through :meth:`Ranks.on_main`, which also hands rank 0's result, or its error, to
  every rank (an error on rank 0 stops all ranks with the same message instead of leaving them waiting).

Checkpoints hold the unwrapped model and rank-independent state, so resuming works on any number of ranks.
Augmentations draw from per-rank streams seeded by (seed, epoch, rank): with augmentation on, a run on N
ranks is a different (equally valid) random draw from a run on 1; without it, the runs agree to float
rounding (tested on CPU with gloo).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

PAD_KEY = "divaware_pad"  # marks a rank's placeholder step in a short last batch (coefficient 0)


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` launch (its environment variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def global_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The epoch's global batches of dataset positions: a permutation of ``range(n)`` drawn from a generator
    seeded ``seed``, cut into batches of ``batch_size`` (the last one shorter). A function of (n, batch_size,
    seed) only, so one process and N ranks step through the same global batches."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def seed_rank(rank: int, seed: int, epoch: int) -> None:
    """Give rank ``rank`` > 0 its own global torch generator stream for ``epoch`` (dropout and any other
    draw from it), seeded by (seed, epoch, rank) so a resumed run replays it; rank 0, and so a one-process
    run, keeps the stream it has always had. Without this every rank draws identical dropout masks."""
    if rank <= 0:
        return
    digest = hashlib.sha256(repr((int(seed), "rank stream", int(epoch), int(rank))).encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def rank_slices(size: int, world: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` shares of a batch of ``size`` over ``world`` ranks, as even as possible
    (the first ``size % world`` ranks hold one more); a share may be empty when ``size < world``."""
    base, extra = divmod(size, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


class Ranks:
    """This process's place among the ranks of a run (``world == 1``: a plain single-process run)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, owns_group: bool = False) -> None:
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self._owns_group = owns_group

    @property
    def distributed(self) -> bool:
        return self.world > 1 or self._owns_group

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files or shows progress."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world={self.world}, local_rank={self.local_rank})"

    # -- model ----------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (which broadcasts rank 0's initial weights), or as is."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    # -- training data ----------------------------------------------------------------------------
    def train_loader(self, dataset: Any, batch_size: int, seed: int, rank_seed: int, num_workers: int,
                     pin_memory: bool, pad_batch: bool) -> Any:
        """The epoch's training batches of this rank: its slice of each global batch of
        :func:`global_batches` (``seed``), with random transforms seeded by ``rank_seed`` (one rank: ``seed``,
        so a single process draws exactly what it always drew for this order).

        The order is fixed here, not by iterating a shuffling loader, because how often a loader's iterator
        is created (``tqdm.auto`` creates one eagerly) shifts a shuffling sampler's draws. A step where this
        rank has no case yields the first case of the global batch marked ``PAD_KEY``.
        """
        from divaware import data as D

        batches = global_batches(len(dataset), batch_size, seed)
        if not self.distributed:
            return D.make_loader(dataset, batch_size, shuffle=False, seed=seed, num_workers=num_workers,
                                 pin_memory=pin_memory, pad_batch=pad_batch, batches=batches)
        steps, pads = [], []
        for batch in batches:
            start, stop = rank_slices(len(batch), self.world)[self.rank]
            steps.append(batch[start:stop] or batch[:1])
            pads.append(stop == start)
        loader = D.make_loader(dataset, batch_size, shuffle=False, seed=rank_seed, num_workers=num_workers,
                               pin_memory=pin_memory, pad_batch=pad_batch, batches=steps)
        return _Marked(loader, pads, pad_batch, self.world)

    def gather_losses(self, batch: Any, ids: Sequence[str], losses: np.ndarray
                      ) -> tuple[list[str], np.ndarray, slice | None]:
        """The step's global batch: ``(ids, per-case losses, this rank's slice of them)``.

        Every rank receives the same arrays, in rank order, which is the single-process batch order. The
        slice is ``None`` on a placeholder step (this rank holds no case of the batch)."""
        if not self.distributed:
            return list(ids), losses, slice(0, len(ids))
        pad = bool(batch.get(PAD_KEY, False)) if isinstance(batch, dict) else False
        mine = ([], np.zeros(0)) if pad else (list(ids), np.asarray(losses, dtype=float))
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, mine)
        start = sum(len(p[0]) for p in parts[: self.rank])
        all_ids = [i for p in parts for i in p[0]]
        all_losses = np.concatenate([np.asarray(p[1], dtype=float) for p in parts])
        return all_ids, all_losses.astype(losses.dtype, copy=False), None if pad else slice(start, start + len(ids))

    def objective(self, per_case: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
                  all_losses: np.ndarray, mine: slice | None) -> torch.Tensor:
        """The loss to back-propagate on this rank.

        One rank: ``objective(per_case)``. N ranks: ``N · Σ_{i mine} (∂L/∂ℓᵢ) ℓᵢ`` with L = ``objective``
        of the global batch's losses, so that DDP's gradient average is the gradient of L (the objective's
        normalisation, per batch or by the training-set mean, is over the global batch by construction)."""
        if not self.distributed:
            return objective(per_case)
        leaf = torch.tensor(np.asarray(all_losses, dtype=np.float64), requires_grad=True)
        (coeff,) = torch.autograd.grad(objective(leaf), leaf)
        if mine is None:
            local = torch.zeros(per_case.shape, dtype=per_case.dtype, device=per_case.device)
        else:
            local = coeff[mine].to(per_case.device, per_case.dtype)
        return float(self.world) * (local * per_case).sum()

    # -- validation -------------------------------------------------------------------------------
    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of ``items`` (round robin; every item on exactly one rank)."""
        return list(items)[self.rank :: self.world]

    def gather_frame(self, frame: pd.DataFrame, order: Sequence[Any]) -> pd.DataFrame:
        """The rows of every rank's ``frame``, indexed in ``order`` (each index value once over ranks)."""
        if not self.distributed:
            return frame
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, frame)
        joined = pd.concat([p for p in parts if p is not None and len(p)])
        missing = sorted(set(map(str, order)) - set(map(str, joined.index)))
        if missing or joined.index.has_duplicates:
            raise RuntimeError(f"gathered validation scores: missing {missing[:10]}, or duplicated cases")
        return joined.loc[list(order)]

    # -- writes and agreement ---------------------------------------------------------------------
    def on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on rank 0 only (the ranks' only file writes) and return its result on every rank;
        an exception on rank 0 is raised on every rank with the same type and message."""
        if not self.distributed:
            return fn(*args, **kwargs)
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn(*args, **kwargs))
            except Exception as err:  # handed to the other ranks, then raised here too
                box[0] = ("error", err)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            if self.is_main:
                raise value
            raise value from None
        return value

    def check_same(self, what: str, state: Any) -> None:
        """Raise if ``state`` (any picklable object) differs between ranks, e.g. the weighting strategy's q."""
        if not self.distributed:
            return
        digest = hashlib.sha256(pickle.dumps(state)).hexdigest()
        digests: list[Any] = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"{what} differs between ranks ({digests}); the ranks have diverged")

    def close(self) -> None:
        """Leave the process group if :func:`setup` created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


class _Marked:
    """This rank's share of the epoch's global batches (see :meth:`Ranks.train_loader`).

    Batches at placeholder steps carry ``PAD_KEY``. With ``pad_to_global``, whole volumes are padded (at
    the end, with zeros, like the collate function) to the largest shape among *all* ranks' cases of the
    step, so each case's loss (which averages over the padded voxels too) is the one it has in the
    single-process batch.
    """

    def __init__(self, loader: Any, pads: Sequence[bool], pad_to_global: bool, world: int) -> None:
        self.loader, self.pads, self.pad_to_global, self.world = loader, list(pads), pad_to_global, world

    def __len__(self) -> int:
        return len(self.pads)

    def __iter__(self) -> Iterator[Any]:
        from divaware import data as D

        for batch, pad in zip(self.loader, self.pads, strict=True):
            if pad:
                batch[PAD_KEY] = True
            if self.pad_to_global:
                shape = tuple(batch[D.IMAGE].shape[2:])
                shapes: list[Any] = [None] * self.world
                # a placeholder step's case is not part of the global batch: it must not widen it
                dist.all_gather_object(shapes, None if pad else shape)
                target = np.max([s for s in shapes if s is not None] or [shape], axis=0)
                for key in (D.IMAGE, D.LABEL):
                    if key in batch:
                        batch[key] = _pad_end(batch[key].as_subclass(torch.Tensor), target)
            yield batch


def _pad_end(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial dims (after batch and channel) of ``tensor`` at the end up to ``shape``."""
    extra = [int(t) - int(s) for s, t in zip(tensor.shape[2:], shape, strict=True)]
    if not any(extra):
        return tensor
    widths: list[int] = []
    for e in reversed(extra):  # F.pad lists the last dimension first
        widths += [0, max(e, 0)]
    return torch.nn.functional.pad(tensor, widths)


def setup(device: str) -> tuple[Ranks, str]:
    """Join the torchrun process group when launched by torchrun; returns ``(ranks, device)``.

    Under torchrun each rank drives one GPU, ``cuda:LOCAL_RANK`` (NCCL), when ``device`` is ``auto`` or
    ``cuda``; on CPU the ranks use gloo. Without torchrun: one rank and ``device`` unchanged.
    """
    if dist.is_available() and dist.is_initialized():  # a caller set the group up itself
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))), device
    if not launched_by_torchrun():
        return Ranks(), device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if device not in ("auto", "cuda", f"cuda:{local}"):
            warnings.warn(f"device {device!r} ignored under torchrun: rank {rank} uses cuda:{local}", stacklevel=2)
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Ranks(rank, world, local, owns_group=True), device
