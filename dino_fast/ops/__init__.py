"""Fused kernels (Triton) beside their eager references; each op module holds both."""
