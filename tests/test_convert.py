"""dino-fast-convert with real FFCV: round trip, bad files skipped, atomic output, --subset, CLI errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.convert import convert_folder, main
from pipelines.folder import DataError

from beton_reader import stored_images

REPO = Path(__file__).resolve().parents[1]


def _smooth(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, str]]:
    """3 classes × 3 good images (one larger than max_resolution, one RGBA PNG) plus three bad files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    sizes = [(40, 30), (150, 90), (33, 47)]
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            _smooth(rng, w, h).save(root / f"class{c}" / f"img{i}.jpg", quality=95)
    _smooth(rng, 20, 24).convert("RGBA").save(root / "class1" / "img3.png")
    (root / "class0" / "empty.jpg").write_bytes(b"")
    good = (root / "class0" / "img1.jpg").read_bytes()
    (root / "class1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class2" / "text.jpg").write_text("this is not an image\n" * 20)
    bad = {"empty.jpg": "empty file", "truncated.jpg": "truncated", "text.jpg": "not an image"}
    return root, bad


def test_round_trip_skips_bad_files(folder, tmp_path):
    root, bad = folder
    dst = tmp_path / "out" / "train.beton"
    s = convert_folder(root, dst, max_resolution=64, workers=2, progress=False, verify=True)
    assert s.images_written == 10 and s.verified == 10 and s.classes == ["class0", "class1", "class2"]
    assert s.bytes_written == dst.stat().st_size > 0
    assert sorted(Path(p).name for p, _ in s.skipped) == sorted(bad)
    for path, reason in s.skipped:
        assert bad[Path(path).name] in reason
    assert not list(dst.parent.glob("*.tmp-*"))

    lines = [ln.rsplit(" ", 1) for ln in Path(s.file_list).read_text().splitlines()]
    assert s.file_list == f"{dst}.files.txt" and len(lines) == 10
    assert all(Path(p).exists() and Path(p).name not in bad for p, _ in lines)
    images, labels = stored_images(dst)
    assert labels.tolist() == [int(lab) for _, lab in lines] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    for (path, _), img in zip(lines, images):
        with Image.open(path) as im:
            src = np.asarray(im.convert("RGB"))
        if max(src.shape[:2]) <= 64:
            assert img.shape == src.shape
        else:  # longest side brought to max_resolution (63 when ffcv's float product rounds down), aspect kept
            assert max(img.shape[:2]) in (63, 64)
            assert abs(img.shape[0] / img.shape[1] - src.shape[0] / src.shape[1]) < 0.05
        want = cv2.resize(src, img.shape[1::-1], interpolation=cv2.INTER_AREA)
        ok, enc = cv2.imencode(".jpg", cv2.cvtColor(want, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        jpeg90 = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(float)
        # the same pixels through the same encoder: equal, but for the large JPEG (DCT-downscaled when loaded)
        assert np.abs(img - jpeg90).mean() < (0.01 if max(src.shape[:2]) <= 64 else 2.0)


def test_subset_spreads_over_classes_and_raw_mode(folder, tmp_path):
    root, _ = folder
    for name in ("empty.jpg", "truncated.jpg", "text.jpg"):
        next(root.rglob(name)).unlink()
    s = convert_folder(root, tmp_path / "sub.beton", subset=4, write_mode="raw", workers=1, file_list=False,
                       progress=False, verify=True)
    assert s.images_written == 4 and s.file_list is None and not (tmp_path / "sub.beton.files.txt").exists()
    from ffcv.reader import Reader

    reader = Reader(str(tmp_path / "sub.beton"))
    assert reader.metadata["f1"].tolist() == [0, 1, 1, 2] and (reader.metadata["f0"]["mode"] == 1).all()


def test_failed_conversion_keeps_the_old_file(folder, tmp_path):
    root, _ = folder
    dst = tmp_path / "keep.beton"
    convert_folder(root, dst, workers=1, progress=False)
    before = dst.read_bytes()
    with pytest.raises(DataError, match="--jpeg-quality"):
        convert_folder(root, dst, jpeg_quality=0, progress=False)
    with pytest.raises(DataError, match="only applies with --write-mode proportion"):
        convert_folder(root, dst, compress_probability=0.5, progress=False)
    for f in root.rglob("img*"):
        f.write_bytes(b"")
    with pytest.raises(DataError, match="none of the 13 images"):
        convert_folder(root, dst, workers=1, progress=False)
    assert dst.read_bytes() == before and not list(tmp_path.glob("*.tmp-*"))


def _convert_cmd(src: Path, dst: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.convert", str(src), str(dst), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed or removed meanwhile
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_conversion_leaves_no_valid_looking_file(tmp_path, sig):
    """Interrupt while ffcv writes (the temp file exists): DST never appears; SIGINT also removes the temp file."""
    src = tmp_path / "noise"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(160):  # noise compresses badly: writing takes a few seconds with one worker
        Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(src / f"{i:03d}.png",
                                                                                   compress_level=0)
    dst = tmp_path / "out.beton"
    # SIGINT at its default, as in a terminal: a test run started in the background by a non-interactive shell
    # (`make test &`) ignores SIGINT, and an ignored SIGINT is inherited by the converter.
    proc = subprocess.Popen(_convert_cmd(src, dst, "--workers", "1", "--max-resolution", "400"), env=_env(),
                            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    # wait for the first 2 MiB data page: ffcv's workers are then running (a SIGINT during their fork is swallowed
    # by CPython's at-fork hooks, and the conversion would simply complete)
    while not any(_size(p) > 2**21 for p in tmp_path.glob("out.beton.tmp-*")):
        assert proc.poll() is None and time.time() < deadline, "the conversion ended before writing started"
        time.sleep(0.01)
    os.killpg(proc.pid, sig)  # the whole group, as Ctrl-C in a terminal (the writer's workers too)
    stdout, stderr = proc.communicate(timeout=60)
    assert not dst.exists() and not Path(f"{dst}.files.txt").exists(), (proc.returncode, stdout, stderr[-2000:])
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted: no output written" in stderr
        assert not list(tmp_path.glob("out.beton.tmp-*"))
    else:
        assert proc.returncode == -signal.SIGKILL


def test_cli_missing_source_and_bad_arguments(tmp_path, capsys):
    proc = subprocess.run(_convert_cmd(tmp_path / "nope", tmp_path / "x.beton"), env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: data path '{tmp_path / 'nope'}' does not exist" in proc.stderr
    assert main([str(tmp_path), str(tmp_path / "x.beton"), "--max-resolution", "0"]) == 2
    assert "--max-resolution 0 must be in 1..65535" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path)]) == 2  # an empty folder: no images
    assert "holds no images" in capsys.readouterr().err


def test_cli_prints_settings_progress_and_summary(folder, tmp_path, capsys):
    root, _ = folder
    assert main([str(root), str(tmp_path / "cli.beton"), "--max-resolution", "48", "--workers", "1", "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.index("max_resolution=48") < out.index("check: 13/13 images") < out.index("write: 10/10 images")
    assert "img/s, ETA" in out and "wrote 10 images (3 classes)" in out and "verified: 10 images re-read" in out
    assert "skipped 3 unreadable files:" in out and "empty.jpg: empty file (0 bytes)" in out
