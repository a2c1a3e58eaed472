"""Export a backbone to ONNX: ``pixel_values`` [batch, 3, S, S] → ``features`` [batch, D] (the CLS feature after the
final norm), S = the training (global crop) size, the batch dimension dynamic. Load it with::

    onnxruntime.InferenceSession(FILE).run(["features"], {"pixel_values": images})[0]

Exporter: torch's ``torch.export``-based one (``torch.onnx.export(..., dynamo=True)``, torch's default since 2.9).
The legacy TorchScript tracer (``dynamo=False``) needs only ``onnx`` and gives the same features, but torch marks it
deprecated and slated for removal (it warns "The feature will be removed") and its trace bakes Python-side shape
arithmetic in as constants; timm's ViT is written for ``torch.export`` (``timm.layers.is_exporting``). The price is
one more package: this path needs ``onnx`` and ``onnxscript`` to export and ``onnxruntime`` for the check below.

The spatial size is fixed at S: the position-embedding resampling for other sizes folds away at export time (a
model for several sizes would be one export per size). Above 1.5 GB of weights (ViT-g) torch writes them to
``FILE.data`` beside the graph. After writing, the file is run with onnxruntime (CPU) at batch 1 and 3 and compared
with the backbone; more than :data:`ONNX_TOLERANCE` relative difference is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dino_fast.checkpoint import CheckpointError

INPUT, OUTPUT = "pixel_values", "features"
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - ours| / max |ours|, fp32 (measured: < 1e-6 for ViT-Ti/S on CPU)


def check_path(path: Path) -> None:
    if path.suffix != ".onnx":
        raise CheckpointError(f"output '{path}' must end in .onnx (e.g. {path.with_suffix('.onnx').name})")
    if path.is_dir():
        raise CheckpointError(f"output '{path}' is a folder; --format onnx writes one .onnx file")


def onnx_features(path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """Run an exported file with onnxruntime on CPU. Shape: [B, 3, S, S] → [B, D]."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT], {INPUT: images.numpy()})[0])


def export_onnx(model: nn.Module, path: str | Path, image_size: int, metadata: dict[str, str] | None = None) -> float:
    """Write ``model`` (fp32; put in eval mode) as ONNX with a dynamic batch dimension and check it with onnxruntime.

    Returns:
        max |onnxruntime - ours| / max |ours| over batches of 1 and 3 images; above :data:`ONNX_TOLERANCE` is an error.
    """
    path = Path(path)
    check_path(path)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, image_size, image_size, generator=gen)
    # An example batch of 2: torch.export specialises a dimension whose example size is 0 or 1.
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    program.model.metadata_props.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)  # torch still splits the weights off above 1.5 GB

    err = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, 3, image_size, image_size, generator=gen)
        with torch.no_grad():
            ours = model(x)
        theirs = onnx_features(path, x)
        if theirs.shape != ours.shape:
            raise CheckpointError(f"the ONNX graph in '{path}' gives features {tuple(theirs.shape)} for a batch of "
                                  f"{batch}, the backbone {tuple(ours.shape)}; please report this with the arch")
        err = max(err, ((theirs - ours).abs().max() / ours.abs().max()).item())
    if not err <= ONNX_TOLERANCE:
        raise CheckpointError(f"the ONNX graph in '{path}' differs from the backbone by {err:.2e} "
                              f"(> {ONNX_TOLERANCE:g} relative); please report this with the checkpoint's arch")
    return err
