"""Benchmarks of xnorconv against float and int8 convolution (python -m bench)."""
