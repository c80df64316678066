"""The ops of a lookahead step. ops.py defines each once (`torch.ops.lookahead.<op>`) with a CPU implementation
(the C++ ops of cpu/) and a CUDA one (the Triton kernels of triton/, one op per module); reference.py holds their
torch references. The functions below are the documented kernel API (docs/API.md): on CUDA tensors the Triton
kernel, elsewhere the torch reference; LOOKAHEAD_KERNELS=torch|triton forces one (dispatch.py)."""

from lookahead.kernels.dispatch import HAS_TRITON, backend
from lookahead.kernels.ops import LAYER_WEIGHTS, exact_mode, fused_decoder
from lookahead.kernels.triton.accept_longest_path import accept_longest_path
from lookahead.kernels.triton.compact_kv import compact_kv
from lookahead.kernels.triton.gumbel_noise import gumbel_noise
from lookahead.kernels.triton.invariant_linear import invariant_linear
from lookahead.kernels.triton.rms_norm import rms_norm
from lookahead.kernels.triton.tree_attention import ancestor_bits, tree_attention

__all__ = ["HAS_TRITON", "LAYER_WEIGHTS", "backend", "exact_mode", "fused_decoder", "tree_attention",
           "ancestor_bits", "accept_longest_path", "compact_kv", "gumbel_noise", "invariant_linear", "rms_norm"]
