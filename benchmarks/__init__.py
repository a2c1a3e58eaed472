"""Throughput benchmarks of each dino_fast piece against the reference algorithm."""
