"""``dino-fast-convert``: an image folder → an FFCV ``.beton`` (+ a DALI file list), robust to bad files.

    dino-fast-convert SRC DST.beton [--max-resolution 256] [--jpeg-quality 90] [--write-mode jpg]
                      [--compress-probability P] [--workers 2] [--subset N] [--no-file-list] [--verify]

SRC is a folder with class sub-folders (labels = sorted class index) or a flat folder (label −1), listed by
``pipelines.folder.list_images``. Two phases, each with a progress bar (images/s, ETA; plain lines without a TTY):

1. check: every file is opened and fully decoded (JPEGs at 1/8 scale, which still reads every byte) in ``workers``
   processes; zero-byte, truncated, corrupt and non-image files are skipped and listed in the summary.
2. write: FFCV's ``DatasetWriter`` stores the readable images (longest side ≤ max resolution, JPEG at the given
   quality) with their int64 labels into ``DST.tmp-<pid>``, renamed to DST only when complete, so an interrupted
   conversion never leaves a file that looks valid (and an older DST stays intact).

``DST.files.txt`` lists the same images, one ``path label`` per line in .beton order (for ``data.file_list``).
``--verify`` re-reads the result: sample count, labels, and every stored image decodes.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.folder import DataError, list_images
from pipelines.progress import Progress

WRITE_MODES = ("jpg", "raw", "proportion", "smart")


@dataclass
class ConvertSummary:
    """What a conversion produced."""

    images_written: int
    bytes_written: int
    skipped: list[tuple[str, str]]  # (path, reason) of every file left out
    dst: str
    file_list: str | None
    seconds: float
    verified: int | None = None  # images re-read by --verify
    classes: list[str] = field(default_factory=list)


def check_image(path: str) -> str | None:
    """Why ``path`` cannot be used as an RGB image (a one-line reason), or None if it decodes completely."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            im.verify()  # structure and checksums where the format has them (PNG)
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))  # JPEG: DCT-scaled, still reads all
            im.load()
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify the format)"
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"corrupt or truncated ({type(exc).__name__}: {exc})"
    return None


def load_rgb(path: str, max_resolution: int) -> np.ndarray:
    """The image as uint8 RGB ``[H, W, 3]``; JPEGs are DCT-downscaled to no less than the size FFCV will resize to."""
    with Image.open(path) as im:
        scale = max_resolution / max(im.size)
        if scale < 1:
            im.draft("RGB", (max(1, int(im.width * scale)), max(1, int(im.height * scale))))
        return np.asarray(im.convert("RGB"))


class _FolderDataset:
    """Indexable (image, label) for ffcv's DatasetWriter; runs in its worker processes (fork).

    It never raises (a worker exception would hang ffcv's writer): an image that fails here after passing the check
    is written as a 1-pixel placeholder and flagged, and the conversion is then failed by the parent.
    """

    def __init__(self, files: list[str], labels: list[int], max_resolution: int):
        self.files, self.labels, self.max_resolution = files, labels, max_resolution
        self.done = mp.Value("Q", 0)
        self.failed = mp.Array("b", len(files), lock=False)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        try:
            image = load_rgb(self.files[i], self.max_resolution)
        except Exception:
            self.failed[i] = 1
            image = np.zeros((1, 1, 3), dtype=np.uint8)
        with self.done.get_lock():
            self.done.value += 1
        return image, self.labels[i]


def _check_all(files: list[str], workers: int, progress: Progress) -> list[str | None]:
    progress.phase("check", len(files))
    reasons: list[str | None] = []
    if workers <= 1:
        for path in files:
            reasons.append(check_image(path))
            progress.update(len(reasons))
        return reasons
    with mp.get_context("fork").Pool(workers) as pool:
        for reason in pool.imap(check_image, files, chunksize=16):
            reasons.append(reason)
            progress.update(len(reasons))
    return reasons


def _write(tmp: str, dataset: _FolderDataset, workers: int, max_resolution: int, jpeg_quality: int,
           compress_probability: float, write_mode: str, progress: Progress) -> None:
    import ffcv.writer as ffcv_writer
    from ffcv.fields import IntField, RGBImageField

    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality, compress_probability=compress_probability),
              "label": IntField()}
    progress.phase("write", len(dataset))
    stop = threading.Event()

    def poll() -> None:  # ffcv's writer blocks this thread's sibling; the counter is bumped by its workers
        while not stop.wait(0.2):
            progress.update(dataset.done.value)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    ffcv_bar = ffcv_writer.tqdm
    ffcv_writer.tqdm = functools.partial(ffcv_bar, disable=True)  # our bar replaces the writer's tqdm bar
    try:
        writer = ffcv_writer.DatasetWriter(tmp, fields, page_size=ffcv_writer.MIN_PAGE_SIZE, num_workers=workers)
        writer.from_indexed_dataset(dataset, chunksize=32)
    finally:
        ffcv_writer.tqdm = ffcv_bar
        stop.set()
        poller.join()
    progress.update(len(dataset))


def verify_beton(path: str, labels: list[int]) -> int:
    """Re-read ``path``: the sample count and labels must match and every stored image must decode; returns the count.

    Raises:
        RuntimeError: describing the first mismatch.
    """
    import cv2
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    reader = Reader(path)
    if int(reader.num_samples) != len(labels):
        raise RuntimeError(f"verify: {path} holds {reader.num_samples} samples, expected {len(labels)}")
    if not np.array_equal(reader.metadata["f1"], np.asarray(labels, dtype=np.int64)):
        raise RuntimeError(f"verify: labels in {path} differ from the source folder's")
    table = np.sort(reader.alloc_table, order="ptr")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for i, meta in enumerate(reader.metadata["f0"]):
        at = np.searchsorted(table["ptr"], meta["data_ptr"])
        blob = data[int(meta["data_ptr"]):int(meta["data_ptr"]) + int(table["size"][at])]
        shape = (int(meta["height"]), int(meta["width"]), 3)
        if meta["mode"] == IMAGE_MODES["jpg"]:
            img = cv2.imdecode(np.asarray(blob), cv2.IMREAD_COLOR)
            ok = img is not None and img.shape == shape
        else:
            ok = blob.size >= np.prod(shape)
        if not ok:
            raise RuntimeError(f"verify: image {i} in {path} does not decode to {shape}")
    return int(reader.num_samples)


def convert_folder(src: str | Path, dst: str | Path, *, max_resolution: int = 256, jpeg_quality: int = 90,
                   compress_probability: float = 1.0, write_mode: str = "jpg", workers: int = 2, subset: int = 0,
                   file_list: bool = True, verify: bool = False, progress: bool = True) -> ConvertSummary:
    """Convert the image folder ``src`` into the FFCV file ``dst`` (see the module docstring).

    Args:
        max_resolution: longest stored side; larger images are downscaled (INTER_AREA), smaller ones kept.
        jpeg_quality: 1..100 for stored JPEGs. write_mode: ``jpg`` (all JPEG), ``raw`` (uint8 pixels),
            ``proportion`` (JPEG with probability ``compress_probability``, else raw), ``smart`` (ffcv's choice).
        workers: processes for checking and writing. subset: if > 0, only this many images, spread evenly over the
            sorted list so every class appears. file_list: also write ``<dst>.files.txt``.

    Raises:
        DataError: bad source folder, no readable image, or a bad argument.
    """
    t0 = time.perf_counter()
    if write_mode not in WRITE_MODES:
        raise DataError(f"--write-mode {write_mode!r} is not one of {', '.join(WRITE_MODES)}")
    if not 1 <= max_resolution <= 65535:
        raise DataError(f"--max-resolution {max_resolution} must be in 1..65535 (ffcv stores sizes as uint16)")
    if not 1 <= jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality {jpeg_quality} must be in 1..100")
    if not 0.0 <= compress_probability <= 1.0:
        raise DataError(f"--compress-probability {compress_probability} must be in [0, 1]")
    if compress_probability != 1.0 and write_mode != "proportion":
        raise DataError("--compress-probability only applies with --write-mode proportion")
    if workers < 1 or subset < 0:
        raise DataError("--workers must be ≥ 1 and --subset ≥ 0")
    images = list_images(src)
    dst = Path(dst).expanduser().resolve()
    if dst.is_dir():
        raise DataError(f"destination '{dst}' is a folder: give a file name such as '{dst / 'train.beton'}'")
    dst.parent.mkdir(parents=True, exist_ok=True)
    files, labels = images.files, images.labels
    if 0 < subset < len(files):
        keep = np.unique(np.linspace(0, len(files) - 1, subset).round().astype(np.int64))
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]

    with Progress("auto" if progress else "none", print_seconds=5.0) as bar:
        reasons = _check_all(files, workers, bar)
        skipped = [(f, r) for f, r in zip(files, reasons) if r is not None]
        good = [i for i, r in enumerate(reasons) if r is None]
        files, labels = [files[i] for i in good], [labels[i] for i in good]
        if not files:
            raise DataError(f"none of the {len(reasons)} images under '{images.root}' is readable "
                            f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
        dataset = _FolderDataset(files, labels, max_resolution)
        tmp = f"{dst}.tmp-{os.getpid()}"
        try:
            _write(tmp, dataset, workers, max_resolution, jpeg_quality, compress_probability, write_mode, bar)
            failed = [files[i] for i in np.flatnonzero(np.frombuffer(dataset.failed, dtype=np.int8))]
            if failed:
                raise DataError(f"{len(failed)} images changed or became unreadable during conversion "
                                f"(first: {failed[0]}); nothing was written, run the conversion again")
            verified = verify_beton(tmp, labels) if verify else None  # before the rename: a bad file never lands
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    list_path = None
    if file_list:
        list_path = f"{dst}.files.txt"
        with open(f"{list_path}.tmp-{os.getpid()}", "w") as fh:
            fh.writelines(f"{f} {lab}\n" for f, lab in zip(files, labels))
        os.replace(f"{list_path}.tmp-{os.getpid()}", list_path)
    return ConvertSummary(len(files), dst.stat().st_size, skipped, str(dst), list_path, time.perf_counter() - t0,
                          verified, images.classes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dino-fast-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="image folder: class sub-folders or images directly inside")
    p.add_argument("dst", help="output .beton file (DST.files.txt is written beside it)")
    p.add_argument("--max-resolution", type=int, default=256, help="longest stored side in pixels")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg", choices=WRITE_MODES)
    p.add_argument("--compress-probability", type=float, default=1.0, help="JPEG share with --write-mode proportion")
    p.add_argument("--workers", type=int, default=2, help="processes for checking and writing")
    p.add_argument("--subset", type=int, default=0, help="convert only N images, spread over all classes (0: all)")
    p.add_argument("--no-file-list", action="store_true", help="do not write DST.files.txt")
    p.add_argument("--verify", action="store_true", help="re-read the result and check count, labels, decoding")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, 1 failed verification, 130 interrupted)."""
    args = _parser().parse_args(argv)
    print(f"dino-fast-convert: {args.src} → {args.dst}\n  max_resolution={args.max_resolution} "
          f"write_mode={args.write_mode} jpeg_quality={args.jpeg_quality} "
          f"compress_probability={args.compress_probability} workers={args.workers} subset={args.subset or 'all'} "
          f"file_list={not args.no_file_list} verify={args.verify}", flush=True)
    try:
        s = convert_folder(args.src, args.dst, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                           compress_probability=args.compress_probability, write_mode=args.write_mode,
                           workers=args.workers, subset=args.subset, file_list=not args.no_file_list,
                           verify=args.verify, progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written (an existing destination is unchanged)", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {s.images_written} images ({len(s.classes) or 'no'} classes), {s.bytes_written / 2**20:.1f} MiB "
          f"to {s.dst} in {s.seconds:.1f} s" + (f"; file list {s.file_list}" if s.file_list else ""))
    if s.verified is not None:
        print(f"verified: {s.verified} images re-read, labels match, all decode")
    if s.skipped:
        print(f"skipped {len(s.skipped)} unreadable files:")
        for path, reason in s.skipped:
            print(f"  {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
