"""DALI multi-crop loader: each image is decoded once, then 2 global + N local crops are cut from it.

Graph (one ``pipeline_def``, the same on CPU and GPU): ``fn.readers.file`` over the image list, sharded by rank
→ ``fn.decoders.image`` (``device="mixed"``: nvJPEG on the GPU, ``"cpu"``: libjpeg-turbo without one) → per crop
G1, G2, L1..LN: random-resized-crop (area ``scale``, aspect 3/4–4/3, bicubic with antialiasing) → colour jitter
p=0.8 → grayscale p=0.2 → Gaussian blur (p 1.0 / 0.1 / 0.5, sigma ~ U(0.1, 2), window 2·ceil(3·sigma)+1, so it
covers ±3 sigma) → solarize p=0.2 on G2 (a lookup table inverting values ≥ 128) → flip p=0.5, mean/std
normalisation and HWC→CHW float in one ``fn.crop_mirror_normalize``. Per-sample probabilities are DALI
conditionals (``if`` on ``fn.random.coin_flip``), so a skipped op costs nothing. Output order, shapes, dtypes and
normalisation follow the batch contract of ``pipelines.loader``; on a GPU the crops never leave it.

Where it differs from the reference (torchvision on PIL, ``pipelines.torch_loader``):

- Colour jitter runs in one fixed order, brightness → contrast → saturation → hue, not in one of the 24 random
  orders torchvision draws. Factors are drawn as the reference draws them: brightness and contrast uniform in
  [0.6, 1.4], saturation in [0.8, 1.2], hue in [−0.1, 0.1] of a turn (±36°). The four adjustments are composed
  into one affine colour map per crop (``fn.coord_transform``, see :func:`colour_jitter`), rounded and clamped once
  instead of after each adjustment: brightness, contrast (about the crop's mean grey, as torchvision) and
  saturation (a blend with the pixel's grey) are torchvision's formulas (within a level of its output). The hue
  shift, which torchvision makes in HSV space (piecewise, keeping each pixel's max and min channel), is a rotation
  about the grey axis by the same angle, a linear stand-in: at 0.1 of a turn it errs by ~14 levels on average on
  natural images where leaving the hue alone errs by ~20 (DALI's YIQ-space ``fn.hsv``/``fn.color_twist``: ~20,
  no better than nothing); at small angles the gain is smaller. Grayscale is exact: PIL's ``L``
  (``fn.color_space_conversion`` to GRAY) copied into three equal channels.
- The flip is applied at normalisation time instead of right after the crop; every op in between is
  mirror-symmetric, so the result is the same.
- DALI's random-resized-crop has its own aspect-ratio sampling and fallback after 10 failed tries; the measured
  area distributions match the reference's within a few percent of the range (``tests/test_dali.py``). Bicubic
  resampling and the Gaussian blur are DALI's, not PIL's (PIL's blur approximates the Gaussian with box filters).

Epochs and shuffling: the reader shuffles the whole list after every epoch with a seed shared by all ranks
(``shuffle_after_epoch``), so within an epoch the shards are disjoint and together cover every image, as long as
every rank iterates the same epochs (as the trainer does). Each rank's shard is padded by DALI to the same number
of batches (``pad_last_batch``) so that no epoch bleeds into the next; the loader yields ``steps_per_epoch =
(images // world_size) // batch_size`` full batches and reads and drops the rest of the shard (at most one batch
of work per epoch; also the rest of an epoch a caller stopped iterating early). Augmentation seeds are per rank.

Resuming: ``set_epoch(epoch, start_step)`` skips ``start_step`` batches by reading and discarding them (the cost
of that many steps of loading, once). The DALI shuffle follows the pipeline's own epoch counter, so a restarted
run sees a different (equally random) order and different crops than an uninterrupted one would; only the
torch loader reproduces them exactly.

Output: the crops are handed to torch zero-copy as DLPack views, as DALI's own torch iterator does (the dynamic
executor gives every run fresh buffers, which live as long as the tensors); on a GPU the pipeline runs with torch's
current stream, so its outputs are ordered on it without a host wait.

GPU (``mixed``) mode: nvJPEG decodes with the hardware JPEG decoder taking ``hw_decoder_load`` of the work
(A100/H100/H200 have one) and with buffers preallocated for ImageNet's largest image (NVIDIA's ResNet-50 example);
the colour jitter's per-crop mean stays on the GPU (:func:`colour_jitter`). Nothing returns to the host.

Bad files: DALI stops the whole pipeline on a file it cannot decode, so the list is checked before the graph is
built (:func:`check_images`): each file is opened with PIL and verified (header, PNG checksums), and a JPEG must
end with its end-of-image marker (catches truncated downloads, which the PIL header check does not). Unreadable
files are dropped with one warning that gives their count and the first few paths; the check reads the headers
with a thread pool.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from pipelines.folder import DataError, ImageList
from pipelines.loader import MultiCropBatch, MultiCropLoader, derive_seed
from pipelines.spec import LUMA, CropSpec, MultiCropSpec

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"data.backend=dali needs NVIDIA DALI ({exc}): pip install nvidia-dali-cuda130 (or use data.backend=torch)"
    ) from exc

ALL_OPS = frozenset({"flip", "jitter", "gray", "blur", "solarize"})
DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}


def _problem(path: str) -> str | None:
    """Why DALI could not decode ``path`` (a short reason), or None when the file looks sound."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt not in DALI_FORMATS:
            return f"{fmt} images are not decoded by DALI"
        if fmt in ("JPEG", "MPO"):
            with open(path, "rb") as f:
                f.seek(max(0, size - 1024))
                if b"\xff\xd9" not in f.read():  # the end-of-image marker; a cut-off download lacks it
                    return "truncated JPEG (no end-of-image marker)"
    except Exception as exc:  # PIL raises many types for corrupt or non-image files
        return f"{type(exc).__name__}: {exc}"
    return None


def check_images(images: ImageList, threads: int = 16) -> ImageList:
    """``images`` without the files DALI could not decode, with one warning listing them.

    Raises:
        DataError: no readable image is left.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(_problem, images.files))
    bad = [(f, why) for f, why in zip(images.files, problems) if why is not None]
    if not bad:
        return images
    keep = [i for i, why in enumerate(problems) if why is None]
    if not keep:
        raise DataError(f"none of the {len(images.files)} images in '{images.root}' can be decoded; first: "
                        f"{bad[0][0]} ({bad[0][1]})")
    listed = "; ".join(f"{f} ({why})" for f, why in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    warnings.warn(f"skipping {len(bad)} of {len(images.files)} images in '{images.root}' that cannot be decoded: "
                  f"{listed}{more}", stacklevel=2)
    return ImageList([images.files[i] for i in keep], [images.labels[i] for i in keep], images.classes, images.root)


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _uniform(bounds: tuple[float, float]):
    """A draw from U(lo, hi) per sample; lo itself when the range is empty (a jitter strength or blur σ range of
    zero width, which DALI's ``range`` refuses)."""
    lo, hi = bounds
    return fn.random.uniform(range=(lo, hi)) if hi > lo else fn.random.uniform(values=[float(lo)])


GREY_ROWS = np.array([[*LUMA, 0.0]] * 3, dtype=np.float32)  # x ↦ (L·x, L·x, L·x)


def colour_jitter(crop, brightness, contrast, saturation, hue_turns):
    """torchvision's four colour adjustments in the order b → c → s → h as one affine map ``x ↦ A·x + t·1``.

    Brightness: b·x. Contrast about the mean grey μ of the crop: c·x + (1 − c)·μ. Saturation, a blend with the
    pixel's grey: s·x + (1 − s)·(L·x)·1. Hue: a rotation by ``hue_turns`` of a turn about the grey axis (1, 1, 1),
    a linear stand-in for torchvision's HSV hue shift. Rotation and saturation keep grey pixels, so the map is
    A = b·c·(s·R + (1 − s)·1·Lᵀ), t = b·(1 − c)·μ. Rounded and clamped to uint8 once at the end.

    A depends on the random draws alone (CPU argument inputs, as ``coord_transform`` wants them); t needs the crop's
    mean, so it is added by an arithmetic op on the crop's own device: on a GPU nothing returns to the host.
    """
    rotation = fn.transforms.rotation(angle=hue_turns * 360.0, axis=[1.0, 1.0, 1.0])  # [3, 4], last column 0
    mt = (rotation * saturation + types.Constant(GREY_ROWS) * (1.0 - saturation)) * (brightness * contrast)
    mapped = fn.coord_transform(crop, MT=mt, dtype=types.FLOAT)
    rgb_mean = fn.reductions.mean(crop, axes=(0, 1))  # [3] per crop, where the crop is
    grey = rgb_mean[0] * LUMA[0] + rgb_mean[1] * LUMA[1] + rgb_mean[2] * LUMA[2]
    shift = brightness * (1.0 - contrast)
    if crop.device == "gpu":
        shift = shift.gpu()  # one float per crop goes to the GPU (host → device, no wait)
    return fn.cast(mapped + grey * shift, dtype=types.UINT8)  # rounds and clamps


def _colour(crop, spec: MultiCropSpec, ops: Collection[str]):
    """Colour jitter (p=0.8, order b → c → s → h) then grayscale (p=0.2); see the module docstring."""
    jitter = _coin(spec.jitter_p) if "jitter" in ops else None
    gray = _coin(spec.gray_p) if "gray" in ops else None
    if jitter is not None:
        # brightness, contrast, saturation factors and the hue shift in turns (as torchvision's hue factor)
        b, c, s, h = [_uniform(bounds) for bounds in spec.jitter_ranges()]
        if jitter:
            crop = colour_jitter(crop, b, c, s, h)
    if gray is not None:
        if gray:
            luma = fn.color_space_conversion(crop, image_type=types.RGB, output_type=types.GRAY)  # = PIL's "L"
            crop = fn.cat(luma, luma, luma, axis=2)
    return crop, jitter, gray


def _crop_branch(image, crop_spec: CropSpec, spec: MultiCropSpec, ops: Collection[str], aux: bool):
    """One crop of every image of the batch, as float CHW; with ``aux`` also its random draws (for tests)."""
    size = crop_spec.size
    crop = fn.random_resized_crop(image, size=(size, size), random_area=crop_spec.scale,
                                  random_aspect_ratio=spec.ratio, interp_type=types.INTERP_CUBIC, antialias=True)
    crop, jitter, gray = _colour(crop, spec, ops)
    sigma = _uniform(spec.blur_sigma)
    blur = _coin(crop_spec.blur_p) if "blur" in ops and 0 < crop_spec.blur_p < 1 else None
    if "blur" in ops and crop_spec.blur_p >= 1:
        crop = fn.gaussian_blur(crop, sigma=sigma)  # window defaults to 2·ceil(3·sigma)+1
    elif blur is not None:
        if blur:
            crop = fn.gaussian_blur(crop, sigma=sigma)
    solarize = _coin(crop_spec.solarize_p) if "solarize" in ops and crop_spec.solarize_p > 0 else None
    if solarize is not None:
        if solarize:
            t = spec.solarize_threshold
            crop = fn.lookup_table(crop, keys=list(range(256)), values=[v if v < t else 255 - v for v in range(256)],
                                   dtype=types.UINT8)
    flip = fn.random.coin_flip(probability=spec.flip_p) if "flip" in ops else None
    out = fn.crop_mirror_normalize(crop, mirror=0 if flip is None else flip, mean=[255 * m for m in spec.mean],
                                   std=[255 * s for s in spec.std], dtype=types.FLOAT, output_layout="CHW")
    if not aux:
        return out, None

    def as_float(node, constant: bool):
        return fn.cast(_coin(float(constant)) if node is None else node, dtype=types.FLOAT)

    always_blurred = "blur" in ops and crop_spec.blur_p >= 1
    draws = [as_float(flip, False), as_float(jitter, False), as_float(gray, False), as_float(blur, always_blurred),
             sigma, as_float(solarize, False)]
    return out, fn.stack(*draws)


AUX_FIELDS = ("flip", "jitter", "gray", "blur", "sigma", "solarize")


# NVIDIA's ResNet-50 example: nvJPEG's buffers sized once for ImageNet's largest image, so no decode reallocates
NVJPEG_HINTS = {"device_memory_padding": 211025920, "host_memory_padding": 140544512,
                "preallocate_width_hint": 5980, "preallocate_height_hint": 6430}
HW_DECODER_LOAD = 0.65  # DALI's default share of the JPEG work sent to the GPU's hardware decoder (A100, H100, H200)


def decoder_args(gpu: bool, hw_decoder_load: float = HW_DECODER_LOAD) -> dict:
    """``fn.decoders.image`` arguments: nvJPEG's hardware share and preallocation on a GPU, none on the CPU."""
    if not gpu:
        return {}
    if not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(f"hw_decoder_load={hw_decoder_load} must be in [0, 1] (the share sent to the HW decoder)")
    return {"hw_decoder_load": float(hw_decoder_load), **NVJPEG_HINTS}


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(files: list[str], labels: list[int], spec: MultiCropSpec, shard_id: int, num_shards: int,
                       shuffle_seed: int, decode_device: str, ops: Collection[str] = ALL_OPS, aux: bool = False,
                       decoder: dict | None = None):
    """(G1, G2, L1..LN, labels) per batch; with ``aux`` also one [n_crops, 6] tensor of draws (AUX_FIELDS).
    ``decoder``: extra ``fn.decoders.image`` arguments (:func:`decoder_args`)."""
    jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                   shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed,
                                   pad_last_batch=True, name="Reader")
    # "mixed": the one CPU → GPU point; every op after it runs on the GPU
    image = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **(decoder or {}))
    outs, draws = [], []
    for crop_spec in spec.crops():
        out, d = _crop_branch(image, crop_spec, spec, ops, aux)
        outs.append(out)
        draws.append(d)
    if aux:
        return (*outs, label, fn.stack(*draws))
    return (*outs, label)


def rank_seed(seed: int, rank: int) -> int:
    """The augmentation seed of ``rank``: distinct per rank, fixed by the run seed."""
    return derive_seed(seed, rank) & 0x7FFF_FFFF


def build_pipeline(images: ImageList, spec: MultiCropSpec, batch_size: int, num_threads: int, rank: int,
                   world_size: int, seed: int, device: torch.device, ops: Collection[str] = ALL_OPS,
                   aux: bool = False, hw_decoder_load: float = HW_DECODER_LOAD):
    """The built DALI pipeline behind :class:`DaliMultiCropLoader` (also used directly by the tests).

    ``exec_dynamic``: DALI's dynamic executor gives every run fresh output buffers, so outputs can be handed to
    torch zero-copy (DLPack) and outlive later runs, as DALI's own torch iterator does."""
    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    pipe = multicrop_pipeline(images.files, images.labels, spec, rank, world_size, seed & 0x7FFF_FFFF,
                              "mixed" if gpu else "cpu", frozenset(ops), aux, decoder_args(gpu, hw_decoder_load),
                              batch_size=batch_size,
                              num_threads=max(1, num_threads), device_id=device_id, seed=rank_seed(seed, rank),
                              prefetch_queue_depth=2, exec_dynamic=True)
    pipe.build()
    return pipe


class DaliMultiCropLoader(MultiCropLoader):
    """Batches of :class:`MultiCropBatch` from a DALI pipeline (the constructor and the batch: ``pipelines.loader``;
    the graph: the module docstring).

    ``ops`` (tests only) leaves out photometric ops; the production graph is built by the same code with all of them.
    """

    def __init__(self, images: ImageList, spec: MultiCropSpec, batch_size: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: torch.device | str = "cpu", *,
                 ops: Collection[str] = ALL_OPS, hw_decoder_load: float = HW_DECODER_LOAD):
        images = check_images(images, threads=max(4, num_workers))
        super().__init__(len(images.files), images.root, spec, batch_size, num_workers, rank, world_size, seed, device)
        self.pipe = build_pipeline(images, spec, batch_size, num_workers, rank, world_size, seed, self.device, ops,
                                   hw_decoder_load=hw_decoder_load)
        meta = self.pipe.reader_meta("Reader")
        # every shard is padded to the same length, then to whole batches: that many runs make one reader epoch
        self.runs_per_epoch = math.ceil(meta["epoch_size_padded"] / meta["number_of_shards"] / batch_size)
        self._runs_done = 0  # runs into the current reader epoch
        if rank == 0:
            decode = "nvJPEG on the GPU (mixed)" if self.device.type == "cuda" else "libjpeg-turbo on the CPU"
            print(f"dali loader: {len(images.files)} images in {images.root}, decode once with {decode}, "
                  f"{max(1, num_workers)} threads, {self.steps_per_epoch} steps/epoch", flush=True)

    def _run(self):
        """One pipeline run; on a GPU its outputs are ordered on torch's current stream (no host wait)."""
        if self.device.type == "cuda":
            outputs = self.pipe.run(torch.cuda.current_stream(self.device).cuda_stream)
        else:
            outputs = self.pipe.run()
        self._runs_done = (self._runs_done + 1) % self.runs_per_epoch
        return outputs

    def _finish_reader_epoch(self) -> None:
        """Read and drop what is left of the reader's epoch (the partial last batch, its padding, or the rest of
        an epoch a caller stopped iterating), so that the next epoch starts on its own first batch."""
        while self._runs_done:
            self._run()

    def _to_torch(self, outputs) -> MultiCropBatch:
        """Zero-copy DLPack views of the crops (CPU or GPU), as DALI's own torch iterator hands them over: the
        dynamic executor allocates fresh output buffers every run and the capsule keeps them alive, so the tensors
        stay valid after later runs. On a GPU, ``torch.from_dlpack`` passes torch's current stream, on which DALI
        orders its outputs (``_run``), so nothing waits on the host."""
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            crops = [torch.from_dlpack(tensor_list.as_tensor()) for tensor_list in outputs[: self.spec.n_crops]]
        labels = torch.from_numpy(np.array(outputs[self.spec.n_crops].as_tensor()).reshape(-1).astype(np.int64))
        return MultiCropBatch(crops, labels.to(self.device, non_blocking=True))

    def __iter__(self):
        self._finish_reader_epoch()
        for _ in range(self.start_step):
            self._run()
        for _ in range(self.start_step, self.steps_per_epoch):
            yield self._to_torch(self._run())
        self._finish_reader_epoch()
