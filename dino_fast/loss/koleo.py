"""The KoLeo regulariser (Sablayrolles et al., ICLR 2019, "Spreading vectors for similarity search"), as DINOv2 adds
it to DINO: −mean_i log ‖x_i − x_nn(i)‖ over the L2-normalised student CLS features of one crop's batch, where
nn(i) is i's nearest other row. It rewards spreading the features over the sphere, the opposite of the collapse
in which every image gets the same representation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """features [B, D] (B ≥ 2) → scalar fp32 loss; the nearest neighbour is chosen without gradient."""
    if features.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 rows per batch, got {features.shape[0]}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            sims = x @ x.t()
            sims.fill_diagonal_(-2.0)  # never one's own neighbour
            nn_index = sims.argmax(dim=1)
        distances = (x - x[nn_index]).pow(2).sum(-1).add(eps).sqrt()
        return -torch.log(distances + eps).mean()
