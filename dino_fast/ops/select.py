"""Which implementation of an op runs (the loss, the EMA): one rule for every op with a fused path."""

from __future__ import annotations

import os

import torch


def select_impl(what: str, implementations: dict, requested: str = "auto", device: torch.device | str = "cpu", *,
                env: str, fallback: str) -> str:
    """The environment variable ``env`` > ``requested`` > auto: the Triton kernel on CUDA when it is registered in
    ``implementations``, else ``fallback``. Raises ValueError naming what is available.

    Args:
        what: the op's name in the error message ("loss", "EMA").
        implementations: the op module's ``IMPLEMENTATIONS`` (name → function).
        requested: the config's choice ("auto" or a name).
        device: where the op's tensors live.
    """
    choice = os.environ.get(env, requested) or "auto"
    if choice == "auto":
        choice = "triton" if torch.device(device).type == "cuda" and "triton" in implementations else fallback
    if choice not in implementations:
        raise ValueError(f"{what} implementation '{choice}' is not available (have: {', '.join(implementations)})")
    return choice
