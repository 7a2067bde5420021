"""Triton kernels for the route phase of routed LoRA (CUDA; the CPU interpreter for tests).

Inside the package, never a top-level ``kernels`` folder: that is the name of Hugging Face's compute-kernels package,
which transformers imports. Torch and Triton only: plain tensors in, nothing of the rest of peft_routing imported.

One kernel per file: ``route`` (scores + top-k + mixing weights), ``align`` (pairs sorted by expert, padded to
blocks), ``shrink`` (x A^T with the routing weight folded in), ``expand`` (h B^T added into the output), ``dense``
(the small-library variant without sorting), ``fused_decode`` (all of it for a few tokens, in one launch);
``launch.triton_routed_lora_`` chains them as one custom op. Set
TRITON_INTERPRET before importing ``peft_routing.kernels.launch``.
"""
