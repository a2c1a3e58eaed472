"""The SGD and LARS of ``optim.name``: N steps over the reference's two param groups equal the reference's update rules
written out here from their formulas (main_dino.py's SGD: momentum 0.9, weight decay added to the gradient; utils.LARS:
trust ratio η‖w‖/‖g + wd·w‖ for every parameter of more than one dimension, momentum on the scaled update), with the
lr and weight-decay schedules set per step as the trainer sets them (lr on both groups, wd on the first)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_fast.config import load_config
from dino_fast.optim import LARS, build_optimizer, param_groups

LRS = [0.5, 0.3, 0.2, 0.1, 0.05]
WDS = [1e-2, 2e-2, 5e-2, 0.1, 0.2]


class Net(nn.Module):
    """Every case the rules tell apart: matrices, a conv kernel, biases and a norm's 1-D weight, a parameter that is
    all zeros (‖w‖ = 0: trust ratio 1) and one that gets no gradient in some steps (skipped)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.zero = nn.Parameter(torch.zeros(5, 5))
        self.sometimes = nn.Parameter(torch.randn(5, 3))

    def forward(self, x: torch.Tensor, use_sometimes: bool) -> torch.Tensor:
        h = self.fc(self.norm(self.conv(x)).mean((2, 3)))
        h = h + h @ self.zero
        return (h[:, :3] @ self.sometimes.T if use_sometimes else h).pow(2).mean()


def _grads(model: Net, step: int) -> dict[str, torch.Tensor | None]:
    """Fresh random gradients (independent of the weights, so both sides see the same ones); ``sometimes`` has none
    on odd steps."""
    gen = torch.Generator().manual_seed(100 + step)
    return {n: None if n == "sometimes" and step % 2 else torch.randn(p.shape, generator=gen)
            for n, p in model.named_parameters()}


def _reference_sgd(weights: dict, grads: list[dict], decayed: set) -> dict:
    """torch.optim.SGD(momentum=0.9) as main_dino.py builds it: d = g + wd·w; buf = d (first step) else 0.9·buf + d;
    w ← w − lr·buf; the weight decay only on the regularised group."""
    w = {n: v.clone().double() for n, v in weights.items()}
    buf: dict[str, torch.Tensor] = {}
    for step, g in enumerate(grads):
        for n in w:
            if g[n] is None:
                continue
            d = g[n].double() + (WDS[step] * w[n] if n in decayed else 0.0)
            buf[n] = d if n not in buf else 0.9 * buf[n] + d
            w[n] = w[n] - LRS[step] * buf[n]
    return w


def _reference_lars(weights: dict, grads: list[dict], decayed: set, eta: float = 0.001) -> dict:
    """utils.LARS of the reference, per parameter: for w of more than one dimension d = g + wd·w, then
    d ← d·η‖w‖/‖d‖ when both norms are > 0; mu ← 0.9·mu + d (mu starts at 0); w ← w − lr·mu."""
    w = {n: v.clone().double() for n, v in weights.items()}
    mu = {n: torch.zeros_like(v) for n, v in w.items()}
    for step, g in enumerate(grads):
        for n in w:
            if g[n] is None:
                continue
            d = g[n].double()
            if w[n].ndim != 1:
                wd = WDS[step] if n in decayed else 0.0
                d = d + wd * w[n]
                wn, dn = w[n].norm(), d.norm()
                if wn > 0 and dn > 0:
                    d = d * (eta * wn / dn)
            mu[n] = 0.9 * mu[n] + d
            w[n] = w[n] - LRS[step] * mu[n]
    return w


@pytest.mark.parametrize("name, reference", [("sgd", _reference_sgd), ("lars", _reference_lars)])
def test_steps_equal_the_reference_rule(name, reference):
    torch.manual_seed(0)
    model = Net()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in param_groups(model)[0]["params"]}
    assert decayed == {"conv.weight", "fc.weight", "zero", "sometimes"}  # the 1-D ones are not regularised
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(load_config(None, [f"optim.name={name}"]).optim, model)
    assert isinstance(opt, torch.optim.SGD if name == "sgd" else LARS)
    grads = []
    for step in range(len(LRS)):
        for i, group in enumerate(opt.param_groups):  # as DINOStep.set_values
            group["lr"] = LRS[step]
            if i == 0:
                group["weight_decay"] = WDS[step]
        g = _grads(model, step)
        for n, p in model.named_parameters():
            p.grad = g[n]
        opt.step()
        grads.append(g)
    want = reference(start, grads, decayed)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), want[n], rtol=1e-6, atol=1e-7, msg=n)
        assert not torch.equal(p.detach(), start[n]) or n == "zero" and name == "lars", n
    if name == "lars":
        assert set(opt.state[model.fc.weight]) == {"mu"}


def test_lars_trust_ratio_is_the_references_not_timms():
    """One step on one matrix: the update is lr·η‖w‖/‖g + wd·w‖·(g + wd·w); timm's Lars would divide by
    ‖g‖ + wd·‖w‖ instead (a different number whenever g and w are not parallel)."""
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(6, 4))
    g = torch.randn(6, 4)
    lr, wd, eta = 0.7, 0.3, 0.001
    before = w.detach().clone()
    opt = LARS([w], lr=lr, weight_decay=wd, eta=eta)
    w.grad = g.clone()
    opt.step()
    d = g + wd * before
    ours = before - lr * eta * before.norm() / d.norm() * d
    timm_rule = before - lr * eta * before.norm() / (g.norm() + wd * before.norm()) * d
    torch.testing.assert_close(w.detach(), ours, rtol=1e-6, atol=1e-7)
    assert (w.detach() - timm_rule).abs().max() > 1e-5
