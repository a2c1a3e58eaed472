"""Image-folder listing shared by every backend: class sub-folders (ImageFolder layout) or a flat folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.spec import IMAGE_EXTENSIONS


class DataError(ValueError):
    """A data path or file a user gave is unusable; the message says what to do."""


@dataclass(frozen=True)
class ImageList:
    files: list[str]  # absolute paths, sorted (class by class)
    labels: list[int]  # class index per file; -1 for a flat folder
    classes: list[str]  # sorted sub-folder names; [] for a flat folder
    root: str


def list_images(path: str | Path) -> ImageList:
    """List the images under ``path``: ``root/<class>/<img>`` gives labels by sorted class name; images directly
    in ``root`` (and no class folders) give label −1. Hidden files and non-image extensions are ignored.

    Raises:
        DataError: the path does not exist, is not a folder, or holds no images.
    """
    root = Path(path).expanduser()
    if not str(path):
        raise DataError("no data path given: set data.path=/path/to/images (or data.path=demo for the demo set)")
    if not root.exists():
        raise DataError(f"data path '{root}' does not exist: set data.path to a folder of images")
    if not root.is_dir():
        raise DataError(f"data path '{root}' is not a folder: set data.path to a folder of images")

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        it = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(
            p for p in it
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(x.startswith(".") for x in p.parts[-2:])
        )

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    if class_dirs:
        for d in class_dirs:
            found = images_in(d, recursive=True)
            if found:
                labels += [len(classes)] * len(found)
                classes.append(d.name)
                files += [str(p.resolve()) for p in found]
    flat = images_in(root, recursive=False)
    if flat and not files:
        files = [str(p.resolve()) for p in flat]
        labels = [-1] * len(files)
    if not files:
        raise DataError(
            f"data path '{root}' holds no images ({', '.join(IMAGE_EXTENSIONS)}) directly or in class sub-folders"
        )
    return ImageList(files=files, labels=labels, classes=classes, root=str(root.resolve()))


def read_file_list(path: str | Path) -> ImageList:
    """The ``path label`` list written by ``dino-fast-convert`` (only images that decoded fully), as an ImageList.

    Raises:
        DataError: the list is missing, empty or malformed.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"file list '{p}' does not exist (dino-fast-convert writes <output>.beton.files.txt)")
    files, labels = [], []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.rpartition(" ")
        try:
            labels.append(int(label))
        except ValueError:
            raise DataError(f"file list '{p}' line {n} is not 'path label': {line[:80]!r}") from None
        files.append(name)
    if not files:
        raise DataError(f"file list '{p}' lists no images")
    n_classes = max(labels) + 1
    return ImageList(files=files, labels=labels, classes=[str(i) for i in range(n_classes)], root=str(p.parent))
