"""Triton kernels for the route phase of routed LoRA (CUDA; the CPU interpreter for tests).

One kernel per file: ``route`` (scores + top-k + mixing weights), ``align`` (pairs sorted by expert, padded to
blocks), ``shrink`` (x A^T with the routing weight folded in), ``expand`` (h B^T added into the output), ``dense``
(the small-library variant without sorting); ``launch.triton_routed_forward`` chains them. Set TRITON_INTERPRET
before importing ``kernels.launch``.
"""
