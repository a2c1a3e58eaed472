"""The FFCV backend (``data.backend=ffcv``), read in the direction the data flows:

- ``loader``: :class:`~pipelines.ffcv.loader.FFCVMultiCropLoader`, the loader contract over a ``.beton`` written
  by ``dino-fast-convert``;
- ``decoder``: the FFCV Operation run in FFCV's loader thread: it decodes each image once and cuts all its crops,
  resized with ``bicubic`` (PIL's bicubic resize, bit-exact, in numba);
- ``augment``: the photometric chain on the batch's device, with per-sample draws; its ops, one per file, each with
  a torch and a numba implementation, are in ``photometric``.

Importing this package imports nothing else: ``augment`` and ``photometric`` need numba and torch but not the ffcv
library (a machine without FFCV still runs their tests and ``benchmarks.bench_augment``), and ``pipelines.build``
imports ``loader`` only for ``data.backend=ffcv``.
"""
