"""The reference's optimisation details: param groups, the optimizers (AdamW, SGD, the reference's LARS),
per-parameter clipping, last-layer freeze.

``optim.name`` picks the optimizer as ``main_dino.py --optimizer`` does: ``adamw`` (for ViTs), ``sgd`` (torch's SGD,
momentum 0.9: the reference's ResNet-50 recipe) or ``lars`` (:class:`LARS`, for convnets and large batches). All
three take the same two groups (:func:`param_groups`), lr from the schedule on both and the weight-decay schedule on
the regularised one; AdamW decouples the decay (p ← p·(1 − lr·wd)), SGD and LARS add wd·p to the gradient.
"""

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


class LARS(torch.optim.Optimizer):
    """The reference's LARS (``utils.LARS`` of facebookresearch/dino, from Barlow Twins), not timm's ``Lars``.

    For each parameter p with gradient g, per step (group values lr, wd, momentum μ, η)::

        d = g + wd·p                     if p has more than one dimension, else d = g   (coupled weight decay)
        d = d · η‖p‖/‖d‖                 if p has more than one dimension and ‖p‖ > 0 and ‖d‖ > 0 (trust ratio)
        mu = μ·mu + d;  p = p − lr·mu    (momentum on the scaled update; state "mu", zeros at the start)

    timm's ``Lars`` differs: its trust ratio is η‖p‖/(‖g‖ + wd‖p‖ + ε) and it skips groups without weight decay.
    Here every parameter of more than one dimension is adapted, whichever group it is in (the reference's rule;
    with :func:`param_groups` those are exactly the regularised ones). Parameters without a gradient are skipped.
    Each group runs as a few multi-tensor kernels (norms, scaling, momentum), with no host sync.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            adapted = [i for i, p in enumerate(params) if p.ndim != 1]
            if adapted:
                w = [params[i] for i in adapted]
                d = torch._foreach_add([updates[i] for i in adapted], w, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(w))
                d_norm = torch.stack(torch._foreach_norm(d))
                ratio = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                    torch.ones_like(w_norm))
                torch._foreach_mul_(d, list(ratio.unbind()))
                for i, t in zip(adapted, d):
                    updates[i] = t
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            mu = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(mu, group["momentum"])
            torch._foreach_add_(mu, updates)
            torch._foreach_add_(params, mu, alpha=-group["lr"])


OPTIMIZERS = ("adamw", "sgd", "lars")


def build_optimizer(optim_cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names over :func:`param_groups` of ``model``, lr 0 until the schedule sets it.

    adamw: torch's fused AdamW (betas, eps from the config); sgd: ``torch.optim.SGD(momentum=0.9)`` as the reference;
    lars: :class:`LARS` (momentum 0.9, η 0.001) as the reference.
    """
    groups = param_groups(model)
    if optim_cfg.name == "adamw":  # one multi-tensor kernel per group (torch has it for CPU and CUDA)
        return torch.optim.AdamW(groups, lr=0.0, betas=optim_cfg.betas, eps=optim_cfg.eps, fused=True)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    if optim_cfg.name == "lars":
        return LARS(groups)
    raise ValueError(f"optim.name={optim_cfg.name!r} is not one of {', '.join(OPTIMIZERS)}")


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

    Under ZeRO 1/2 the gradient lives in DeepSpeed's buffers and cannot be removed; it is zeroed instead, so the
    optimizer still applies its weight decay (and SGD its momentum) to the last layer (a documented difference to the
    reference).
    """
    from deepspeed.utils import safe_set_full_grad

    for p in last_layer_params(model):
        if p.grad is not None:
            p.grad = None
        elif p.requires_grad and hasattr(p, "_hp_mapping"):
            safe_set_full_grad(p, torch.zeros_like(p, dtype=torch.float32))
