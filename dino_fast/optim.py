"""The reference's optimisation details: AdamW param groups, per-parameter clipping, last-layer freeze."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: regularised (weight decay from the schedule), and biases + 1-D parameters (no decay).
    Parameters that need no gradient (the frozen last-layer gain) are left out, as in the reference."""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def _grads(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor, bool]]:
    """(param, gradient, owned-by-ZeRO) for every parameter with a gradient. Under ZeRO-0 the gradient is
    ``p.grad``; under ZeRO 1/2 DeepSpeed holds it in its own partitioned buffers (``safe_get_full_grad``)."""
    from deepspeed.utils import safe_get_full_grad

    out = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is not None:
            out.append((p, p.grad, False))
        else:
            g = safe_get_full_grad(p)
            if g is not None:
                out.append((p, g, True))
    return out


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Reference per-parameter clipping: each gradient g is scaled by clip / (‖g‖₂ + 1e-6) when that is < 1.

    All norms come from one multi-tensor kernel and are applied with another, with no host sync per parameter.
    Returns the pre-clip norms (a 1-D tensor, on the gradients' device).
    """
    entries = _grads(model)
    if not entries:
        return torch.zeros(0)
    grads = [g for _, g, _ in entries]
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    coefs = (clip / (norms.float() + 1e-6)).clamp(max=1.0)  # multiplying by exactly 1 leaves g unchanged
    torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    if any(zero for _, _, zero in entries):
        from deepspeed.utils import safe_set_full_grad

        for p, g, zero in entries:
            if zero:
                safe_set_full_grad(p, g)
    return norms


def last_layer_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "last_layer" in n]


@torch.no_grad()
def cancel_last_layer_grads(model: nn.Module) -> None:
    """Drop the head's last-layer gradients (first ``freeze_last_layer`` epochs): the optimizer skips them.

    Under ZeRO 1/2 the gradient lives in DeepSpeed's buffers and cannot be removed; it is zeroed instead, so AdamW
    still applies its decoupled weight decay to the last layer (a documented difference to the reference).
    """
    from deepspeed.utils import safe_set_full_grad

    for p in last_layer_params(model):
        if p.grad is not None:
            p.grad = None
        elif p.requires_grad and hasattr(p, "_hp_mapping"):
            safe_set_full_grad(p, torch.zeros_like(p, dtype=torch.float32))
