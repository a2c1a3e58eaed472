import pytest
import torch
from torch import nn

from dino_fast.models import DINOHead
from dino_fast.optim import cancel_last_layer_grads, clip_gradients, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = DINOHead(8, 12, norm_last_layer=False, nlayers=2, hidden_dim=16, bottleneck_dim=4)

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def test_param_groups_exclude_biases_and_1d_params_from_decay():
    model = Tiny()
    reg, noreg = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in reg["params"]} == {"lin.weight", "head.mlp.0.weight", "head.mlp.2.weight",
                                           "head.last_layer.parametrizations.weight.original0",
                                           "head.last_layer.parametrizations.weight.original1"}
    assert {names[id(p)] for p in noreg["params"]} == {"lin.bias", "norm.weight", "norm.bias", "head.mlp.0.bias",
                                                       "head.mlp.2.bias"}
    assert noreg["weight_decay"] == 0.0
    frozen = DINOHead(8, 12, norm_last_layer=True, nlayers=1)
    assert all(p.requires_grad for g in param_groups(frozen) for p in g["params"])


def test_per_parameter_clipping_matches_the_reference_loop():
    torch.manual_seed(0)
    model = Tiny()
    model(torch.randn(4, 6)).pow(2).sum().mul(50).backward()
    for p in model.parameters():  # make some gradients small enough to be left alone
        if p.ndim == 1:
            p.grad.mul_(1e-3)
    expected = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        norm = g.norm(2)
        coef = 3.0 / (norm + 1e-6)
        expected[n] = g * coef if coef < 1 else g
    norms = clip_gradients(model, 3.0)
    assert norms.shape == (len(expected),)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-6, atol=0)
        assert p.grad.norm() <= 3.0 + 1e-4
    assert any(n > 3 for n in norms.tolist()) and any(n < 3 for n in norms.tolist())


def test_last_layer_freeze_drops_only_last_layer_grads_and_adamw_skips_it():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(param_groups(model), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(4, 6)).sum().backward()
    cancel_last_layer_grads(model)
    opt.step()
    for n, p in model.named_parameters():
        if "last_layer" in n:
            assert p.grad is None and torch.equal(p, before[n])  # no gradient step, no weight decay
        else:
            assert not torch.equal(p, before[n])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_clipping_reaches_deepspeed_gradients_under_every_zero_stage(stage):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from dino_fast.engine import init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(param_groups(model), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0})
    loss = engine(torch.randn(4, 6)).pow(2).sum() * 100
    engine.backward(loss)
    before = [safe_get_full_grad(p).clone() for p in engine.module.parameters() if p.requires_grad]
    norms = clip_gradients(engine.module, 0.01)
    after = [safe_get_full_grad(p) for p in engine.module.parameters() if p.requires_grad]
    torch.testing.assert_close(norms, torch.stack([g.norm() for g in before]))
    for b, a in zip(before, after):
        expected = b * min(1.0, 0.01 / (b.norm().item() + 1e-6))
        torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-9)
    assert max(g.norm().item() for g in after) <= 0.01 + 1e-6 < max(g.norm().item() for g in before)
    engine.step()


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer_keeps_the_reference_groups_and_settings(name, kind):
    """optim.name: the same two groups (lr 0 until the schedule sets it, no decay on the second); AdamW fused with
    the config's betas and eps, SGD with the reference's momentum 0.9 (the LARS rule: tests/test_lars.py)."""
    from dino_fast.config import load_config
    from dino_fast.optim import build_optimizer

    model = Tiny()
    opt = build_optimizer(load_config(None, [f"optim.name={name}"]).optim, model)
    assert type(opt) is kind and [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in param_groups(model)]
    assert opt.param_groups[1]["weight_decay"] == 0.0
    if name == "adamw":
        assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    else:
        assert opt.defaults["momentum"] == 0.9 and not opt.defaults["nesterov"]
