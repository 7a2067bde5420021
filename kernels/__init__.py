"""Triton kernels for routed LoRA (CUDA). Filled by the fast-inference work; the PyTorch path is the reference."""
