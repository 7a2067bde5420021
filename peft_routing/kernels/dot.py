"""The one matmul rule of the kernels: tensor cores in the weights' half precision, exact fp32 otherwise.

Half inputs (bf16/fp16 models on a GPU) go through tensor cores with fp32 accumulation, as PyTorch's own half matmuls
do; fp32 inputs use IEEE fp32 so that they match the PyTorch reference to rounding (and the CPU interpreter, which
computes in fp32 only, sees nothing else). The dtype test is resolved when the kernel is compiled.
"""

import triton
import triton.language as tl


@triton.jit
def weight_dot(x, w):
    """x @ w in fp32 accumulation; x is cast to w's dtype (the activation may arrive as fp32 scratch, e.g. h)."""
    if w.dtype == tl.float32:
        return tl.dot(x.to(tl.float32), w, input_precision="ieee")
    else:
        return tl.dot(x.to(w.dtype), w)
