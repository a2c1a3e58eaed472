"""The decode-once multi-crop Operation of the FFCV backend (:class:`MultiCropDecoder`), in numba.

FFCV's ``RandomResizedCropRGBImageDecoder`` decodes the JPEG once per pipeline, so 2 + N crop pipelines decode it
2 + N times. This Operation decodes each image **once** (``ffcv.libffcv.imdecode``, libjpeg-turbo), transposes it
once, and cuts every crop from it with the reference's interpolation: PIL's bicubic resize with its antialiasing
support, bit-exact (``pipelines.ffcv.bicubic``: numba, vectorised), with the flip (p = ``spec.flip_p``) folded into the
resize. (FFCV's own compiled resize is OpenCV ``INTER_AREA``, whose crops are less sharp than the reference's.)

Output layout: FFCV gives one output per pipeline, so all crops of one image are packed into one flat uint8 row of
``2·G² ·3 + N·L²·3`` bytes: the two globals as ``[2, G, G, 3]`` (HWC) followed by the locals as ``[N, L, L, 3]``.
:func:`unpack` turns the batch ``[B, row]`` into ``[B, 2, G, G, 3]`` and ``[B, N, L, L, 3]`` views without copying.

Randomness: crop boxes and flips use torchvision's RandomResizedCrop.get_params algorithm (as
``pipelines.torch_loader.sample_resized_crop``) on numba's MT19937, **re-seeded for every image** with the loader
contract's ``sample_seed(seed, epoch, image index)``. A crop is therefore a pure function of that key: the same with
or without numba JIT, on any number of threads or ranks, and when a run resumes mid-epoch. The epoch reaches the
compiled code through a small numpy array read by address each batch (numba freezes captured arrays as compile-time
constants).

The photometric chain that follows (colour jitter, grayscale, blur, solarize) is ``pipelines.ffcv.photometric``.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import ctypes_imdecode, ctypes_memcopy
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba.core import types

from pipelines.ffcv.bicubic import resize_crop, transpose_image
from pipelines.loader import sample_seed
from pipelines.spec import MultiCropSpec

# the loader contract's per-image seed, compiled (it is plain integer arithmetic)
sample_key = numba.njit(cache=True)(sample_seed)


@numba.njit(cache=True)
def sample_resized_crop(height: int, width: int, scale_lo: float, scale_hi: float, log_ratio_lo: float,
                        log_ratio_hi: float) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params on ``np.random``: (top, left, h, w); 10 tries, then a central crop.

    Integers are drawn as ``floor(u · n)`` from ``random()`` (not ``randint``) so that numba and NumPy agree.
    """
    area = height * width
    for _ in range(10):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * np.random.random())
        aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * np.random.random())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(np.random.random() * (height - h + 1))
            left = int(np.random.random() * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < math.exp(log_ratio_lo):
        w, h = width, int(round(width / math.exp(log_ratio_lo)))
    elif in_ratio > math.exp(log_ratio_hi):
        h, w = height, int(round(height * math.exp(log_ratio_hi)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_layout(spec: MultiCropSpec) -> tuple[np.ndarray, np.ndarray, int]:
    """(size per crop, byte offset per crop, bytes per image) of the packed uint8 row, crops in order G1, G2, L1.."""
    sizes = np.array([c.size for c in spec.crops()], dtype=np.int64)
    nbytes = sizes * sizes * 3
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)
    return sizes, offsets, int(nbytes.sum())


def unpack(rows, spec: MultiCropSpec):
    """Packed rows ``[B, bytes]`` (numpy or torch) → views ``[B, 2, G, G, 3]`` and ``[B, N, L, L, 3]``."""
    b, g, n, s = rows.shape[0], spec.global_size, spec.n_local, spec.local_size
    split = 2 * g * g * 3
    return rows[:, :split].reshape(b, 2, g, g, 3), rows[:, split:].reshape(b, n, s, s, 3)


class CFunction(types.WrapperAddressProtocol):
    """A C function of FFCV's compiled library as a numba first-class function (also callable from Python).

    Passed as an argument instead of captured as a global, so the numba functions that call it can be cached on
    disk (numba never caches code holding a ctypes pointer).
    """

    def __init__(self, cfn, sig):
        self.cfn, self._sig = cfn, sig
        self._addr = ctypes.cast(cfn, ctypes.c_void_p).value

    def __wrapper_address__(self) -> int:
        return self._addr

    def signature(self):
        return self._sig

    def __call__(self, *args):
        return self.cfn(*args)


_u32, _ptr = types.uint32, types.uintp
# int imdecode(src*, src_size, src_h, src_w, dst*, crop_h, crop_w, off_x, off_y, scale_num, scale_den, crop?, flip?)
IMDECODE = CFunction(ctypes_imdecode, types.int32(_ptr, types.uint64, _u32, _u32, _ptr, _u32, _u32, _u32, _u32, _u32,
                                                  _u32, types.boolean, types.boolean))
MEMCPY = CFunction(ctypes_memcopy, types.void(_ptr, _ptr, types.uint64))


@numba.njit(cache=True)
def decode_crops(src, src_size, is_jpeg, height, width, temp, rows, ix, key, sizes, offsets, scale, log_r_lo,
                 log_r_hi, flip_p, imdecode_fn, memcpy_fn):
    """Decode image ``ix`` of the batch once (from ``src_size`` bytes at address ``src``) into ``temp[ix]`` and write
    all its crops into ``rows[ix]``, with the RNG seeded by ``key``.

    ``temp[ix]`` holds the decoded image in its first half and the image transposed (the columns the bicubic
    horizontal pass reads) in its second. The image arrives as an address, and the buffers as whole 2-D batch
    arrays: ffcv 1.0.2 flips ``mutable`` on numba's interned 1-D uint8 array type when a Loader is built, which
    corrupts the overload table of any long-lived dispatcher taking such an array (a KeyError when the next Loader
    compiles).
    """
    pixels = height * width * 3
    buf = temp[ix]
    half = buf.size // 2
    if is_jpeg:
        imdecode_fn(src, np.uint64(src_size), np.uint32(height), np.uint32(width), buf.ctypes.data, np.uint32(height),
                    np.uint32(width), np.uint32(0), np.uint32(0), np.uint32(1), np.uint32(1), False, False)
    else:
        memcpy_fn(src, buf.ctypes.data, np.uint64(pixels))
    columns = transpose_image(buf[:pixels].reshape(height, width, 3), buf[half:])
    row = rows[ix]
    np.random.seed(key)
    for c in range(len(sizes)):
        top, left, h, w = sample_resized_crop(height, width, scale[c, 0], scale[c, 1], log_r_lo, log_r_hi)
        size = sizes[c]
        flip = np.random.random() < flip_p
        crop = row[offsets[c]:offsets[c] + size * size * 3].reshape(size, size, 3)
        resize_crop(columns, top, left, h, w, crop, flip)


class MultiCropDecoder(Operation):
    """Decode once, cut 2 global + N local random-resized crops (bicubic, with flips) into one packed uint8 row per
    image.

    Args:
        spec: crop sizes, scales, aspect-ratio range and flip probability.
        seed: run seed; with the epoch (:meth:`set_epoch`) and the image index it keys each image's RNG.
    """

    def __init__(self, spec: MultiCropSpec, seed: int):
        super().__init__()
        self.spec = spec
        self.sizes, self.offsets, self.row_bytes = crop_layout(spec)
        self.scale = np.array([c.scale for c in spec.crops()], dtype=np.float64)
        self._state = np.array([seed, 0], dtype=np.int64)  # read by address from the compiled code

    def set_epoch(self, epoch: int) -> None:
        self._state[1] = epoch

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_pixels = int(self.metadata["width"].max()) * int(self.metadata["height"].max())
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=(self.row_bytes,), dtype=u8),
                (AllocationQuery((self.row_bytes,), u8), AllocationQuery((2 * max_pixels * 3,), u8)))

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        per_image, key_of, copy_c = decode_crops, sample_key, ctypes_memcopy
        imdecode_fn, memcpy_fn = IMDECODE, MEMCPY  # looked up now: a test may wrap them
        jpg = IMAGE_MODES["jpg"]
        state_addr = self._state.ctypes.data
        sizes, offsets, scale = self.sizes, self.offsets, self.scale
        log_r_lo, log_r_hi = math.log(self.spec.ratio[0]), math.log(self.spec.ratio[1])
        flip_p = float(self.spec.flip_p)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            state = np.empty(2, dtype=np.int64)
            copy_c(state_addr, state.ctypes.data, 16)  # (seed, epoch) as set by the loader before this epoch
            for dst_ix in my_range(len(batch_indices)):
                source_ix = np.int64(batch_indices[dst_ix])
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                per_image(data.ctypes.data, data.size, field["mode"] == jpg, np.int64(field["height"]),
                          np.int64(field["width"]), temp_storage, destination, dst_ix,
                          key_of(state[0], state[1], source_ix), sizes, offsets, scale, log_r_lo, log_r_hi, flip_p,
                          imdecode_fn, memcpy_fn)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
