"""Linear probe: the batched heads against torch.optim.SGD one head at a time and against a float64 Newton solve of
the same regularised logistic regression; block features against timm's own forward; both modes and the CLI on
images a random network already separates (solid colours)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dino_fast.eval import linear
from dino_fast.eval.knn import extract_features
from dino_fast.eval.linear import accuracy, block_features, linear_fast, linear_full, train_heads


def _tiny_vit(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=depth, patch_size=8,
                             img_size=32, dynamic_img_size=True, global_pool="token").eval()


def _blobs(n_per_class: int, dim: int, classes: int, seed: int, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + spread * rng.standard_normal((len(y), dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_batched_heads_follow_torch_sgd_one_head_at_a_time():
    x, y = _blobs(13, 5, 3, seed=1, spread=1.0)
    lrs, wds, epochs, batch = [0.05, 0.3, 0.3], [0.0, 0.0, 0.01], 4, 16
    grid = train_heads(x, y, 3, lrs, wds, epochs=epochs, batch_size=batch, seed=7)
    for h, (lr, wd) in enumerate(zip(lrs, wds)):
        gen = torch.Generator().manual_seed(7)  # the documented draw order: the init, then one permutation per epoch
        w0 = 0.01 * torch.randn(len(lrs), 5, 3, generator=gen)
        w = torch.nn.Parameter(w0[h].T.clone())  # nn.Linear layout [C, D]
        b = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for s in range(0, len(y), batch):
                i = order[s:s + batch]
                loss = torch.nn.functional.cross_entropy(x[i] @ w.T + b, y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        torch.testing.assert_close(grid.weight[h], w.detach().T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grid.bias[h], b.detach(), rtol=1e-4, atol=1e-6)


def _newton_logreg(x: np.ndarray, y: np.ndarray, classes: int, wd: float) -> np.ndarray:
    """argmin mean CE(softmax(x·W + b), y) + wd/2·(‖W‖² + ‖b‖²), float64 Newton iterations on θ = [W; b]."""
    xb = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    n, d = xb.shape
    onehot = np.eye(classes)[y]
    theta = np.zeros((d, classes))
    for _ in range(50):
        z = xb @ theta
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (xb.T @ (p - onehot) / n + wd * theta).reshape(-1)
        hess = wd * np.eye(d * classes)
        for i in range(n):  # Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ x_i x_iᵀ / n, with θ flattened row-major as [d, C]
            hess += np.kron(np.outer(xb[i], xb[i]), np.diag(p[i]) - np.outer(p[i], p[i])) / n
        step = np.linalg.solve(hess, grad)
        theta -= step.reshape(d, classes)
        if np.abs(step).max() < 1e-12:
            break
    return theta


def test_heads_reach_the_float64_logistic_regression_optimum():
    """Full-batch momentum SGD with a cosine schedule converges to the unique minimiser of the L2-regularised
    multinomial logistic regression on a tiny separable set; Newton's method in float64 finds it independently."""
    x, y = _blobs(10, 3, 3, seed=2)
    wd = 0.05
    theta = _newton_logreg(x.numpy(), y.numpy(), 3, wd)
    grid = train_heads(x, y, 3, [0.5, 0.2], [wd, wd], epochs=400, batch_size=len(y), seed=0)
    for h in range(2):
        np.testing.assert_allclose(grid.weight[h].numpy(), theta[:3], atol=2e-4)
        np.testing.assert_allclose(grid.bias[h].numpy(), theta[3], atol=2e-4)
    top1, top5 = accuracy(grid.logits(x), y)
    assert top1.tolist() == [100.0, 100.0] and top5.tolist() == [100.0, 100.0]


def test_block_features_match_timms_forward():
    model = _tiny_vit(depth=3)
    x = torch.randn(2, 3, 32, 40)  # non-square: 4 × 5 patches
    with torch.no_grad():
        f = block_features(model, x, 2, True)
        assert f.shape == (2, 3 * 192)
        torch.testing.assert_close(f[:, 192:384], model(x), rtol=0, atol=1e-5)  # last block's CLS after the norm
        torch.testing.assert_close(f[:, 384:], model.forward_features(x)[:, 1:].mean(1), rtol=0, atol=1e-5)
        t = model._pos_embed(model.patch_embed(x))  # block 2 of 3 written out
        t = model.blocks[1](model.blocks[0](t))
        torch.testing.assert_close(f[:, :192], model.norm(t)[:, 0], rtol=0, atol=1e-5)
    assert linear.default_layout(model) == (4, False)
    assert linear.default_layout(timm.create_model("vit_base_patch16_224", depth=1, num_classes=0)) == (1, True)


def _colour_folder(root, classes: dict[str, tuple[int, int, int]], n: int):
    for cls, colour in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            shade = tuple(max(0, min(255, c + 7 * i - 20)) for c in colour)
            Image.new("RGB", (36, 36), shade).save(root / cls / f"{i}.png")
    return root


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (220, 210, 40)}


@pytest.fixture(scope="module")
def colour_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return _colour_folder(root / "train", COLOURS, 8), _colour_folder(root / "val", COLOURS, 3)


def test_fast_mode_picks_on_held_out_train_and_scores_val(colour_split):
    train, val = colour_split
    res = linear_fast(_tiny_vit(), train, val, lrs=[1e-3, 0.1, 1.0], wds=[0.0, 1e-3], epochs=30, batch_size=8,
                      holdout=0.25, resize=32, crop=32, num_workers=0, progress=False)
    # depth 2: layouts cls1, cls1+avgpool, (cls4 needs 4 blocks) → 2 layouts × 3 lrs × 2 wds.
    assert res["heads"] == 12 == len(res["grid"]) and res["n_train"] == 24 and res["n_val"] == 12
    assert {r["layout"] for r in res["grid"]} == {"cls1", "cls1+avgpool"}
    best = res["best"]
    assert best == max(res["grid"], key=lambda r: (r["select_top1"], -r["select_loss"]))
    assert best["val_top1"] == 100.0 and res["best_val_top1_over_grid"] == 100.0
    # The smallest lr barely moves its heads in 30 small steps: the grid really spans settings.
    loss = {(r["layout"], r["lr"], r["wd"]): r["select_loss"] for r in res["grid"]}
    assert all(loss[(lay, 1e-3, 0.0)] > 2 * loss[(lay, 1.0, 0.0)] for lay in ("cls1", "cls1+avgpool"))


def test_reference_mode_trains_on_augmented_images_and_evaluates_its_head(colour_split):
    train, val = colour_split
    model = _tiny_vit()
    res = linear_full(model, train, val, n_last_blocks=2, avgpool=False, epochs=6, lr=2.0, batch_size=8,
                      resize=32, crop=32, num_workers=0, progress=False, val_every=2)
    assert [h["epoch"] for h in res["history"]] == [2, 4, 6] and res["layout"] == "cls2"
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    # The reported accuracy is the head applied to val features computed here independently.
    feats, labels = extract_features(model, val, resize=32, crop=32, num_workers=0, progress=False,
                                     features_fn=lambda x: block_features(model, x, 2, False))
    with torch.no_grad():
        top1, _ = accuracy(res["head"](feats), labels)
    assert float(top1) == res["history"][-1]["top1"] and res["top1"] == max(h["top1"] for h in res["history"])
    assert res["top1"] == 100.0


def test_cli_fast_writes_json_and_errors_exit_2(colour_split, tmp_path, capsys):
    train, val = colour_split
    torch.save({k: v for k, v in _tiny_vit().state_dict().items()}, tmp_path / "w.pth")
    out = tmp_path / "lin.json"
    linear.main(["--weights", str(tmp_path / "w.pth"), "--train", str(train), "--val", str(val), "--fast",
                 "--epochs", "10", "--lrs", "0.1", "1", "--wds", "0", "--resize", "32", "--crop", "32",
                 "--workers", "0", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert rec["mode"] == "fast" and rec["heads"] == 4 and "picked on the held-out 10% of train" in printed
    assert f"val top-1 {rec['best']['val_top1']:.2f}%" in printed and math.isfinite(rec["seconds"]["heads"])
    for bad, text in ((["--train", str(tmp_path / "nope")], "does not exist"), (["--fast", "--holdout", "1"],
                      "--holdout must be in [0, 1)")):
        args = ["--weights", str(tmp_path / "w.pth"), "--train", str(train), "--val", str(val), "--resize", "32",
                "--crop", "32", "--workers", "0", "--device", "cpu", *bad]
        with pytest.raises(SystemExit) as exc:
            linear.main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and text in err and "Traceback" not in err
