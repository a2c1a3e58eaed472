"""``data.backend=ffcv``: multi-crop batches from a ``.beton`` written by ``dino-fast-convert``.

Per batch: FFCV's loader thread runs :class:`pipelines.ffcv_ops.MultiCropDecoder` (numba, ``data.num_workers``
threads): each image is decoded once and all 2 + N crops are cut and flipped from it into one packed uint8 row.
The loader then unpacks the rows and applies the photometric chain of ``pipelines.gpu_augment`` with per-sample
parameters on ``device`` (torch ops on CUDA, the fused numba kernel on CPU), yielding the batch contract of
``pipelines.spec``.

Sharding: FFCV's ``distributed=True`` needs an initialised torch.distributed and shuffles with its own sampler;
instead every rank reads ``pipelines.torch_loader.epoch_indices`` (one permutation per epoch, rank r takes every
world-th index), through a custom FFCV traversal order. Shuffle, crops and photometric draws are therefore the same
functions of (seed, epoch, step) as in an uninterrupted run when ``set_epoch(epoch, start_step)`` resumes.

Costs to know: the numba pipeline compiles on the first batch of a new loader (~5-15 s on a small CPU; the per-image
helpers and the photometric kernel are cached on disk by numba, the FFCV closures are not). FFCV honours
``NUMBA_DISABLE_JIT=1`` (pure Python, for debugging). FFCV's ``Compiler.set_num_threads`` also sets torch's
intra-op thread count to the loader's thread count.
"""

from __future__ import annotations

import queue
from pathlib import Path

import numba
import numpy as np
import torch
from ffcv.traversal_order.base import TraversalOrder

from pipelines.folder import DataError
from pipelines.gpu_augment import PhotometricAugment
from pipelines.spec import MultiCropBatch, MultiCropSpec
from pipelines.torch_loader import epoch_indices


class _EpochOrder(TraversalOrder):
    """FFCV traversal order: this rank's ``epoch_indices`` of the epoch set by the loader, from ``start_step`` on.

    FFCV calls ``order(loader)`` when the loader is built, so the instance hands itself back from ``__call__``.
    """

    def __init__(self, n: int, seed: int, rank: int, world_size: int, batch_size: int, steps: int):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.batch_size, self.steps = batch_size, steps
        self.epoch, self.start_step = 0, 0

    def __call__(self, loader) -> _EpochOrder:
        return self

    def sample_order(self, _ffcv_epoch: int) -> np.ndarray:
        idx = epoch_indices(self.n, self.seed, self.epoch, self.rank, self.world_size)
        return idx[self.start_step * self.batch_size:self.steps * self.batch_size].astype(np.int64)


def _next_batch(it) -> tuple[np.ndarray, np.ndarray]:
    """``next(it)`` of an FFCV EpochIterator that raises instead of waiting forever when its thread has died (an
    exception in the pipeline ends the thread but leaves ``__next__`` blocked on the queue)."""
    while True:
        try:
            item = it.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not it.is_alive():
                raise RuntimeError("the FFCV loader thread stopped with an error (traceback above)") from None
    if item is None:
        raise RuntimeError("the FFCV loader ended the epoch early")
    slot, result = item
    if torch.cuda.is_available():  # as EpochIterator.__next__: wait for work queued on the slot's stream
        torch.cuda.current_stream().wait_stream(it.cuda_streams[slot])
    return result


def open_beton(path: str):
    """An ffcv Reader for ``path``, checked to hold the ``image`` and ``label`` fields of ``dino-fast-convert``.

    Raises:
        DataError: the path is unset, missing or not such a file.
    """
    from ffcv.reader import Reader

    hint = "run dino-fast-convert <image folder> <file.beton> and set data.ffcv_path=<file.beton>"
    if not path:
        raise DataError(f"data.backend=ffcv needs data.ffcv_path: {hint}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.ffcv_path '{p}' does not exist: {hint}")
    try:
        reader = Reader(str(p))
    except Exception as exc:  # ffcv raises AssertionError/ValueError/IndexError for foreign or truncated files
        why = f"{type(exc).__name__}: {exc}"
        raise DataError(f"data.ffcv_path '{p}' is not a readable .beton ({why}): {hint}") from None
    if list(reader.handlers) != ["image", "label"]:
        raise DataError(f"data.ffcv_path '{p}' has fields {list(reader.handlers)}, expected ['image', 'label']: {hint}")
    return reader


class FFCVMultiCropLoader:
    """Batches of :class:`MultiCropBatch` from ``data_cfg.ffcv_path`` (see the batch contract in ``pipelines.spec``).

    Args:
        data_cfg: a :class:`dino_fast.config.DataConfig` (ffcv_path, batch_size_per_gpu, num_workers).
        spec: the multi-crop augmentation.
        rank, world_size, seed: sharding and randomness keys. device: where the augmented batch is produced.
    """

    def __init__(self, data_cfg, spec: MultiCropSpec, *, rank: int, world_size: int, seed: int,
                 device: torch.device):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec

        from pipelines.ffcv_ops import MultiCropDecoder, unpack

        self._unpack = unpack
        reader = open_beton(data_cfg.ffcv_path)
        self.path, self.spec, self.device = str(data_cfg.ffcv_path), spec, torch.device(device)
        self.num_images = int(reader.num_samples)
        self.batch_size = data_cfg.batch_size_per_gpu
        self.steps_per_epoch = (self.num_images // world_size) // self.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.num_images} images in '{self.path}' are fewer than one batch per rank "
                            f"({self.batch_size} × {world_size} ranks): lower data.batch_size_per_gpu or add images")
        # numba refuses more threads than NUMBA_NUM_THREADS (the CPU count by default)
        self.threads = max(1, min(data_cfg.num_workers, numba.config.NUMBA_NUM_THREADS))
        if numba.config.THREADING_LAYER == "default":
            # FFCV's thread and the CPU photometric kernel launch parallel regions concurrently: numba's fallback
            # "workqueue" layer aborts on that, so ask for TBB or OpenMP (read at numba's first parallel launch)
            numba.config.THREADING_LAYER = "threadsafe"
        self.order = _EpochOrder(self.num_images, seed, rank, world_size, self.batch_size, self.steps_per_epoch)
        self.decoder = MultiCropDecoder(spec, seed)
        self.loader = Loader(self.path, batch_size=self.batch_size, num_workers=self.threads, order=self.order,
                             pipelines={"image": PipelineSpec("image", decoder=self.decoder),
                                        "label": PipelineSpec("label", decoder=IntDecoder())}, drop_last=True,
                             batches_ahead=2)
        self.augment = PhotometricAugment(spec, self.device, seed, rank)
        self.epoch, self.start_step = 0, 0
        if rank == 0:
            jit = "off (NUMBA_DISABLE_JIT)" if numba.config.DISABLE_JIT else "on"
            print(f"ffcv loader: {self.num_images} images in {self.path}, decode-once multi-crop op "
                  f"({self.threads} numba threads, JIT {jit}), photometric={self.augment.impl} on {self.device}",
                  flush=True)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Fix the shuffle, crops and photometric draws of ``epoch``; skip its first ``start_step`` batches."""
        self.epoch, self.start_step = epoch, start_step

    def iter_uint8(self):
        """The epoch's batches before photometric augmentation: ``(step, globals [B, 2, G, G, 3] uint8,
        locals [B, N, L, L, 3] uint8, labels [B] int64)`` as CPU tensors viewing FFCV's buffers; FFCV may overwrite
        a batch's buffer as soon as the next batch is fetched, so consume (copy) each batch before that."""
        self.order.epoch, self.order.start_step = self.epoch, self.start_step
        self.decoder.set_epoch(self.epoch)
        it = iter(self.loader)
        try:
            for k in range(self.steps_per_epoch - self.start_step):
                rows, labels = _next_batch(it)
                glob, loc = self._unpack(torch.from_numpy(rows), self.spec)
                yield self.start_step + k, glob, loc, torch.from_numpy(labels).view(-1).to(torch.int64)
        finally:
            it.close()

    def __iter__(self):
        cuda = self.device.type == "cuda"
        for step, glob, loc, labels in self.iter_uint8():
            crops = self.augment(glob, loc, self.epoch, step)
            labels = labels.to(self.device) if cuda else labels.clone()
            copied = torch.cuda.Event() if cuda else None
            if copied is not None:
                copied.record()
            yield MultiCropBatch(crops, labels)
            if copied is not None:
                copied.synchronize()  # the async host→device copy has left FFCV's buffer before it is reused
