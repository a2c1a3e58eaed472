"""Data pipelines: the reference multi-crop spec, the baseline torch loader, and the fast backends."""

from pipelines.spec import MultiCropBatch, MultiCropSpec

__all__ = ["MultiCropBatch", "MultiCropSpec"]
