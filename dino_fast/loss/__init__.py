"""The loss terms of a DINO step: the DINO cross-entropy with its centre (:class:`DINOLoss`), Sinkhorn-Knopp teacher
targets (DINOv2's alternative to centering) and the KoLeo regulariser. Their fused kernels live in ``dino_fast.ops``."""

from dino_fast.loss.dino import DINOLoss
from dino_fast.loss.koleo import koleo_loss
from dino_fast.loss.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "koleo_loss", "sinkhorn_knopp"]
