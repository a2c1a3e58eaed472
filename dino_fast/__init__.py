"""dino_fast: fast DINO self-distillation training of vision transformers."""

__version__ = "0.1.0"
