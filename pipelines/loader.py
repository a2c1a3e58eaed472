"""The loader contract: how every backend (``torch``, ``dali``, ``ffcv``) is built, what it yields, and what it shares.

Construction (one signature, :class:`MultiCropLoader`)
------------------------------------------------------
``Backend(source, spec, batch_size, num_workers=0, rank=0, world_size=1, seed=0, device="cpu")``, where ``source``
is an :class:`pipelines.folder.ImageList` (torch, dali) or the path of a ``.beton`` (ffcv); ``pipelines.build`` makes
every backend with this one call.

Batch contract
--------------
Iterating a loader yields :class:`MultiCropBatch` ``(crops, labels)``:

- ``crops``: a list of ``2 + n_local`` float32 tensors in crop order G1, G2, L1..LN. Globals are
  ``[B, 3, global_size, global_size]``, locals ``[B, 3, local_size, local_size]``; normalised with the ImageNet
  mean/std (so a pixel of value v in [0, 1] becomes (v − mean) / std). Row b of every crop comes from the same image.
- ``labels``: int64 ``[B]``, the class index of each image (its sub-folder in sorted order), ``-1`` for a flat folder.
- Tensors are on the device the backend produces them on (the GPU for DALI ``mixed`` / FFCV GPU augmentation,
  else the CPU); the trainer moves them with ``non_blocking=True``.

A loader also has ``steps_per_epoch`` (== ``len(loader)``; the last incomplete batch is dropped) and
``set_epoch(epoch, start_step=0)``, which must be called before iterating an epoch: it fixes the shuffle of that
epoch (seeded from the run seed and the epoch) and skips the first ``start_step`` batches when resuming mid-epoch;
``close()`` releases what a backend keeps between epochs.

Shared keys of randomness
-------------------------
- :func:`epoch_indices`: which images a rank sees, in which order, in an epoch (torch and ffcv; DALI's reader
  shuffles by itself, see ``pipelines.dali``).
- :func:`sample_seed`: the RNG seed of one image in one epoch (torch and ffcv), so that a crop is a pure function of
  (run seed, epoch, image index) and a run resumed mid-epoch sees the crops an uninterrupted run sees. It is plain
  integer arithmetic so that the FFCV op can compile it with numba.
- :func:`derive_seed`: the seed of anything else keyed by a few integers (a batch's photometric draws, a rank).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pipelines.folder import DataError
from pipelines.spec import MultiCropSpec

_MASK32 = 0xFFFFFFFF


class MultiCropBatch(NamedTuple):
    crops: list[torch.Tensor]
    labels: torch.Tensor


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's shuffled indices for ``epoch``: one permutation for all ranks (seeded by seed, epoch), cut to a
    multiple of world_size, rank r takes positions r, r + world, ... (as torch's DistributedSampler)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world_size
    return perm[: per_rank * world_size][rank::world_size]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 32-bit RNG seed of image ``index`` in ``epoch`` of a run seeded with ``seed``: a 32-bit integer hash
    folded over the three keys (every product stays below 2^63, so it is exact in numba's int64 and in Python)."""
    h = 0
    for key in (seed, epoch, index):
        x = (h + (key & _MASK32)) & _MASK32
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
        h = (x >> 16) ^ x
    return h


def derive_seed(*key: int) -> int:
    """A 63-bit seed from a few integers (NumPy's SeedSequence), e.g. (run seed, rank, epoch, step)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF


class MultiCropLoader:
    """What every backend shares: its constructor arguments, the epoch length and the epoch/resume position.

    Args (every backend takes these after its ``source``):
        spec: the multi-crop augmentation.
        batch_size: images per batch on this rank (``data.batch_size_per_gpu``).
        num_workers: decode workers or threads (``data.num_workers``).
        rank, world_size: which shard of every epoch this process reads.
        seed: the run seed; with the epoch and the image index it keys every random draw.
        device: where the batch is produced (the torch backend pins host memory for a CUDA device).

    A backend calls ``super().__init__`` with the number of images it reads and where they are (for messages),
    then implements ``__iter__``.

    Raises:
        DataError: fewer images than one batch per rank.
    """

    def __init__(self, num_images: int, where: str, spec: MultiCropSpec, batch_size: int, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device: torch.device | str = "cpu"):
        self.num_images, self.spec, self.batch_size, self.num_workers = num_images, spec, batch_size, num_workers
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, torch.device(device)
        self.steps_per_epoch = (num_images // world_size) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{num_images} images in '{where}' are fewer than one batch per rank "
                            f"({batch_size} × {world_size} ranks): lower data.batch_size_per_gpu or add images")
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Fix the shuffle and the random draws of ``epoch``; skip its first ``start_step`` batches."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is outside the epoch's 0..{self.steps_per_epoch} steps")
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self) -> np.ndarray:
        """The image indices this rank reads in the current epoch from ``start_step`` on, whole batches only."""
        idx = epoch_indices(self.num_images, self.seed, self.epoch, self.rank, self.world_size)
        return idx[self.start_step * self.batch_size:self.steps_per_epoch * self.batch_size]

    def __iter__(self):
        raise NotImplementedError

    def close(self) -> None:
        """Release what outlives an epoch (the torch backend's workers); the trainer calls it when it is done."""
