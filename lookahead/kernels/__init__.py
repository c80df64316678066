"""The ops of a lookahead step, one module each (`<op>.py`: Triton kernel, launcher and input checks); their
torch references are together in reference.py. CUDA tensors run Triton where it is installed, everything else
the references; LOOKAHEAD_KERNELS=torch|triton forces one (dispatch.py)."""

from lookahead.kernels.triton.accept_longest_path import accept_longest_path
from lookahead.kernels.triton.compact_kv import compact_kv
from lookahead.kernels.dispatch import HAS_TRITON, backend
from lookahead.kernels.triton.gumbel_noise import gumbel_noise
from lookahead.kernels.triton.invariant_linear import invariant_linear
from lookahead.kernels.triton.rms_norm import rms_norm
from lookahead.kernels.triton.tree_attention import ancestor_bits, tree_attention

__all__ = ["HAS_TRITON", "backend", "tree_attention", "ancestor_bits", "accept_longest_path", "compact_kv",
           "gumbel_noise", "invariant_linear", "rms_norm"]
