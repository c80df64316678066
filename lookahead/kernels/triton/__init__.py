"""The Triton kernels of a step, one op per module (kernel, launcher and input checks); lookahead.kernels picks
them on CUDA tensors."""
