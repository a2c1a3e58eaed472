"""Reads a .beton back without FFCV's loader (test helper shared by the converter and loader tests)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def stored_images(beton: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image of a .beton read independently (JPEGs decoded by cv2), and the labels."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    data = np.fromfile(beton, dtype=np.uint8)
    table = np.sort(reader.alloc_table, order="ptr")
    images = []
    for meta in reader.metadata["f0"]:
        size = table["size"][np.searchsorted(table["ptr"], meta["data_ptr"])]
        blob = data[int(meta["data_ptr"]):int(meta["data_ptr"] + size)]
        if meta["mode"] == 0:  # jpg
            images.append(cv2.cvtColor(cv2.imdecode(blob, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        else:
            images.append(blob[:meta["height"] * meta["width"] * 3].reshape(meta["height"], meta["width"], 3))
    return images, reader.metadata["f1"].copy()
