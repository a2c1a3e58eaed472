"""``data.backend=ffcv``: multi-crop batches from a ``.beton`` written by ``dino-fast-convert``.

Per batch: FFCV's loader thread runs :class:`pipelines.ffcv.decoder.MultiCropDecoder` (numba, ``data.num_workers``
threads): each image is decoded once and all 2 + N crops are cut and flipped from it into one packed uint8 row.
The loader then unpacks the rows and applies the photometric chain of ``pipelines.ffcv.augment`` with per-sample
parameters on ``device`` (torch ops on CUDA, the fused numba kernel on CPU), yielding the batch contract of
``pipelines.loader``.

Sharding: FFCV's ``distributed=True`` needs an initialised torch.distributed and shuffles with its own sampler;
instead every rank reads the loader contract's epoch order (``pipelines.loader.epoch_indices``: one permutation per
epoch, rank r takes every world-th index), through a custom FFCV traversal order. Shuffle, crops and photometric
draws are therefore the same functions of (seed, epoch, step) as in an uninterrupted run when
``set_epoch(epoch, start_step)`` resumes.

Costs to know: the numba pipeline compiles on the first batch of a new loader (the per-image helpers and the
photometric kernel are cached on disk by numba, the FFCV closures are not, so every new loader pays that compile).
FFCV honours ``NUMBA_DISABLE_JIT=1`` (pure Python, for debugging). FFCV's ``Compiler.set_num_threads`` also sets
torch's intra-op thread count to the loader's thread count.
"""

from __future__ import annotations

import queue
from pathlib import Path

import numba
import numpy as np
import torch
from ffcv.traversal_order.base import TraversalOrder

from pipelines.ffcv.augment import PhotometricAugment
from pipelines.folder import DataError
from pipelines.loader import MultiCropBatch, MultiCropLoader
from pipelines.spec import MultiCropSpec


class _EpochOrder(TraversalOrder):
    """FFCV traversal order: the epoch order of our loader (its epoch and ``start_step`` at the time FFCV asks).

    FFCV calls ``order(loader)`` when its loader is built, so the instance hands itself back from ``__call__``.
    """

    def __init__(self, owner: MultiCropLoader):
        self.owner = owner

    def __call__(self, ffcv_loader) -> _EpochOrder:
        return self

    def sample_order(self, _ffcv_epoch: int) -> np.ndarray:
        return self.owner.epoch_order().astype(np.int64)


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


def _stop(it) -> None:
    """Stop an FFCV EpochIterator and wait for its thread.

    FFCV's ``close()`` only raises a flag: its daemon thread goes on decoding until its queue is full (up to
    ``batches_ahead`` more batches, in numba's TBB threads), and a process that exits while the thread is inside a
    TBB parallel region aborts ("terminate called without an active exception"). At the epoch's end the thread may
    instead wait, without a timeout, to put its end marker into a full queue: taking one batch out lets it finish.
    """
    it.terminate_event.set()
    while it.is_alive():
        it.join(timeout=0.6)  # the thread checks the flag after each 0.5 s put that finds the queue full
        if it.is_alive():
            try:
                it.output_queue.get_nowait()
            except queue.Empty:
                pass
    it.close()


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


class FFCVMultiCropLoader(MultiCropLoader):
    """Batches of :class:`MultiCropBatch` from a ``.beton`` (the constructor and the batch: ``pipelines.loader``).

    Args:
        path: the ``.beton`` written by ``dino-fast-convert`` (``data.ffcv_path``); the rest as every backend.
    """

    def __init__(self, path: str, spec: MultiCropSpec, batch_size: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: torch.device | str = "cpu"):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec

        from pipelines.ffcv.decoder import MultiCropDecoder, unpack

        self._unpack = unpack
        reader = open_beton(path)
        self.path = str(path)
        super().__init__(int(reader.num_samples), self.path, spec, batch_size, num_workers, rank, world_size, seed,
                         device)
        # numba refuses more threads than NUMBA_NUM_THREADS (the CPU count by default)
        self.threads = max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))
        if numba.config.THREADING_LAYER == "default":
            # FFCV's thread and the CPU photometric kernel launch parallel regions concurrently: numba's fallback
            # "workqueue" layer aborts on that, so ask for TBB or OpenMP (read at numba's first parallel launch)
            numba.config.THREADING_LAYER = "threadsafe"
        self.order = _EpochOrder(self)
        self.decoder = MultiCropDecoder(spec, seed)
        self.loader = Loader(self.path, batch_size=batch_size, num_workers=self.threads, order=self.order,
                             pipelines={"image": PipelineSpec("image", decoder=self.decoder),
                                        "label": PipelineSpec("label", decoder=IntDecoder())}, drop_last=True,
                             batches_ahead=2)
        self.augment = PhotometricAugment(spec, self.device, seed, rank)
        if rank == 0:
            jit = "off (NUMBA_DISABLE_JIT)" if numba.config.DISABLE_JIT else "on"
            print(f"ffcv loader: {self.num_images} images in {self.path}, decode-once multi-crop op "
                  f"({self.threads} numba threads, JIT {jit}), photometric={self.augment.impl} on {self.device}",
                  flush=True)

    def iter_uint8(self):
        """The epoch's batches before photometric augmentation: ``(step, globals [B, 2, G, G, 3] uint8,
        locals [B, N, L, L, 3] uint8, labels [B] int64)`` as CPU tensors viewing FFCV's buffers; FFCV may overwrite
        a batch's buffer as soon as the next batch is fetched, so consume (copy) each batch before that."""
        self.decoder.set_epoch(self.epoch)
        it = iter(self.loader)
        try:
            for k in range(self.steps_per_epoch - self.start_step):
                rows, labels = _next_batch(it)
                glob, loc = self._unpack(torch.from_numpy(rows), self.spec)
                yield self.start_step + k, glob, loc, torch.from_numpy(labels).view(-1).to(torch.int64)
        finally:
            _stop(it)

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
