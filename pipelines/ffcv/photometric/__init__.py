"""The photometric half of the reference augmentation, one operation per file, each file holding both of its
implementations side by side:

- a batched torch op on ``[N, 3, H, W]`` floats in [0, 1] with one parameter per sample (any device; the CUDA path,
  checked against torchvision's functional op on each image);
- a numba loop over one ``[3, S·S]`` float32 crop in place (the CPU path, checked against the torch op).

``jitter`` (brightness, contrast, saturation, hue), ``grayscale``, ``blur``, ``solarize`` (with the final
normalisation); ``params`` draws the per-sample parameters; ``chain`` runs the whole chain with either
implementation; ``pipelines.ffcv.augment`` chooses the implementation and seeds the draws of every batch.
"""
