"""GGUF files run as they are: the file is memory-mapped and every weight of a supported block format stays in it,
a uint8 view [N, K / block_elems, block_bytes] that the quantized CPU ops (kernels/cpu/quant.cpp) read in place.
No dequantized copy, no conversion cache: loading reads the metadata and maps the tensors, except that linear
weights are copied once into quant_repack's interleaved blocks (8 outputs a vector,
no cross-lane reduction; docs/gguf.md), the file's pages under each released as it is copied.

F32/F16/BF16 tensors (the norms) become float tensors in the activation dtype; a tensor of any other type is
dequantized once by gguf-py, said once in the log. The q and k rows of a llama GGUF are permuted for ggml's
adjacent-pair RoPE (convert_hf_to_gguf.py); the model runs them as they are with `rope_interleaved=True`, the same
attention scores.
"""

from __future__ import annotations

import logging
import mmap
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lookahead.kernels import cpu as cpu_ops
from lookahead.models.causal_lm import CausalLM
from lookahead.models.config import rope_inv_freq
from lookahead.models.checkpoint import EMBEDDED, embedded_gguf

log = logging.getLogger("lookahead.models.gguf")

# quant.cpp's FORMATS: type -> (elements, bytes) per block
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
QUANTIZED = tuple(BLOCKS)
# quant_repack's layouts (quant.cpp): a linear layer's weight interleaved by 8 outputs at load, the bytes of a unit
# of 8 rows x one file block (K-quants) or two (the 32-element formats)
REPACKED = {"Q3_K": 912, "Q4_K": 1184, "Q5_K": 1440, "Q6_K": 1680, "Q8_0": 544, "Q4_0": 288, "Q4_1": 320,
            "Q5_0": 352, "Q5_1": 384}
FLOATS = ("F32", "F16", "BF16")
ARCHITECTURES = ("llama",)
QUANTIZATION = ("auto", "gguf", None)  # from_pretrained's quantization= values (docs/gguf.md)


def gguf_file(name_or_path) -> Path | None:
    """The GGUF file behind an embedded name or a .gguf path, else None (an HF dir)."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED:
        return embedded_gguf(key.lower())
    path = Path(name_or_path).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


class SplitLinear(nn.Module):
    """A projection whose parts (q, k, v or gate, up) cannot be one uint8 tensor (different GGUF types, or not
    adjacent in the file): each part's output, concatenated. decode_layers takes `rest` in its WK/WV/W3 slots and
    computes the same thing (kernels/cpu/decoder.cpp)."""

    def __init__(self, parts: list[torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(parts[0], requires_grad=False)
        self.rest = nn.ParameterList([nn.Parameter(p, requires_grad=False) for p in parts[1:]])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs, offset = [], 0
        for w in [self.weight, *self.rest]:
            bias = None if self.bias is None else self.bias[offset:offset + w.shape[0]]
            outs.append(torch.ops.lookahead.linear(x, w, bias))
            offset += w.shape[0]
        return torch.cat(outs, dim=-1)


class QuantEmbedding(nn.Module):
    """A token embedding table in GGUF blocks: the rows asked for, dequantized to act_dtype (quant_embedding)."""

    def __init__(self, weight: nn.Parameter, act_dtype: torch.dtype):
        super().__init__()
        self.weight, self.act_dtype = weight, act_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.lookahead.quant_embedding(self.weight, ids, self.act_dtype)


class _TensorInfo:
    __slots__ = ("name", "tensor_type", "shape", "data_offset", "n_bytes", "data")


class _Reader:
    """A GGUF file's metadata and tensor table, read with `struct` over a numpy memmap: what gguf-py's GGUFReader
    gives (`fields`: key -> value, `tensors`, `data`: the map), without its per-element views of the metadata's
    arrays, which took ~2.3 s of a 1B file's ~3.5 s load (its 49,152 tokens and their merges). Arrays are kept as
    their offsets and decoded on request (`_Array.contents`). Little-endian GGUF v2 / v3; anything else raises
    ValueError."""

    SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    STRING, ARRAY = 8, 9

    def __init__(self, path: Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.data = np.memmap(path, mode="r")
        buf = memoryview(self.data)
        magic, version = struct.unpack_from("<4sI", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a little-endian GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_fields = struct.unpack_from("<QQ", buf, 8)
        self._buf, at = buf, 24
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key, at = self._string(at)
            (kind,), at = struct.unpack_from("<I", buf, at), at + 4
            self.fields[key], at = self._value(kind, at)
        self.tensors = []
        for _ in range(n_tensors):
            t = _TensorInfo()
            t.name, at = self._string(at)
            (n_dims,) = struct.unpack_from("<I", buf, at)
            t.shape = np.array(struct.unpack_from(f"<{n_dims}Q", buf, at + 4), dtype=np.uint64)
            kind, t.data_offset = struct.unpack_from("<IQ", buf, at + 4 + 8 * n_dims)
            at += 4 + 8 * n_dims + 12
            t.tensor_type = GGMLQuantizationType(kind)
            elems, block = GGML_QUANT_SIZES[t.tensor_type]
            t.n_bytes = int(np.prod(t.shape, dtype=np.uint64)) // elems * block
            self.tensors.append(t)
        align = int(self.fields.get("general.alignment", 32))
        start = -(-at // align) * align
        for t in self.tensors:
            t.data_offset += start
            if t.data_offset + t.n_bytes > len(self.data):
                raise ValueError(f"tensor {t.name} runs past the end of the file")
            t.data = self._tensor_data(t)

    def _string(self, at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, at)
        return bytes(self._buf[at + 8:at + 8 + n]).decode("utf-8", errors="replace"), at + 8 + n

    def _value(self, kind: int, at: int) -> tuple[object, int]:
        if kind in self.SCALARS:
            fmt = self.SCALARS[kind]
            return struct.unpack_from(fmt, self._buf, at)[0], at + struct.calcsize(fmt)
        if kind == self.STRING:
            return self._string(at)
        if kind == self.ARRAY:
            item, count = struct.unpack_from("<IQ", self._buf, at)
            at += 12
            array = _Array(self, item, count, at)
            if item in self.SCALARS:
                return array, at + count * struct.calcsize(self.SCALARS[item])
            for _ in range(count):  # strings (or nested arrays): walk their lengths
                _, at = self._value(item, at)
            return array, at
        raise ValueError(f"unknown GGUF metadata type {kind}")

    def _tensor_data(self, t: _TensorInfo) -> np.ndarray:
        """The tensor's bytes as gguf-py shapes them: F32 / F16 / F64 and the integer types as their dtype in
        row-major order, the others (quantized blocks, BF16) as uint8 rows."""
        raw = self.data[t.data_offset:t.data_offset + t.n_bytes]
        dims = [int(d) for d in reversed(t.shape)]
        dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
                  "I16": np.int16, "I32": np.int32, "I64": np.int64}
        dtype = dtypes.get(t.tensor_type.name)
        if dtype is not None:
            return raw.view(dtype).reshape(dims)
        return raw.reshape(-1, t.n_bytes // max(1, int(np.prod(dims[:-1], dtype=np.int64))))


class _Array:
    """A metadata array, decoded when read (`contents`)."""

    def __init__(self, reader: _Reader, item: int, count: int, at: int):
        self.reader, self.item, self.count, self.at = reader, item, count, at

    def contents(self) -> list:
        out, at = [], self.at
        for _ in range(self.count):
            value, at = self.reader._value(self.item, at)
            out.append(value.contents() if isinstance(value, _Array) else value)
        return out


class GGUFFile:
    """The metadata and tensors of one GGUF file (`_Reader`, over a numpy memmap)."""

    def __init__(self, path: Path):
        try:
            self.reader = _Reader(path)
        except Exception as e:  # a foreign, truncated or damaged file
            raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        value = self.reader.fields.get(key, default)
        return value.contents() if isinstance(value, _Array) else value

    def repacked(self, w: torch.Tensor) -> torch.Tensor:
        """repacked(w); the file's pages under a weight so copied leave this process's resident memory at once
        (they stay in the page cache, and map back if read again), so loading peaks near the model's size."""
        if repackable(w):
            self._populate(w)
        packed = repacked(w)
        if packed is not w:
            self._release(w)
        return packed

    def repacked_projection(self, names: list[str]) -> list[torch.Tensor]:
        """The parts of one projection (q, k, v or gate, up) as quant_linear reads them fastest: fused() with each
        part repacked, and neighbouring parts of one repackable type that lie apart in the file (SmolLM2's q, k, v;
        the q, k of its Q4_K_M requantization) repacked into one weight, since they are copied anyway: one linear,
        one quantization of its input, the same outputs."""
        groups: list[list[torch.Tensor]] = []
        for p in self.fused(names):
            last = groups[-1][-1] if groups else None
            if last is not None and repackable(last) and repackable(p) and last.shape[1:] == p.shape[1:]:
                groups[-1].append(p)
            else:
                groups.append([p])
        out = []
        for group in groups:
            if len(group) == 1:
                out.append(self.repacked(group[0]))
            else:
                for p in group:
                    self._populate(p)
                out.append(repacked(torch.cat(group)))
                for p in group:
                    self._release(p)
        return out

    def _pages(self, w: torch.Tensor) -> tuple | None:
        """(the map, first byte, length) of the whole pages under w (a view of the map), None without a map."""
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None:
            return None
        start = w.data_ptr() - self.reader.data.ctypes.data
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(mm), -(-(start + w.numel()) // mmap.PAGESIZE) * mmap.PAGESIZE)
        return mm, first, end - first

    def _populate(self, w: torch.Tensor) -> None:
        """Map the file's pages under w in one call before a copy reads them (MADV_POPULATE_READ, Linux 5.14+):
        the copy's threads would otherwise fault them in one page at a time (the 1B Q4_K_M file's repacking took
        1.2 s at one thread that way). A kernel without it leaves the faults to the copy."""
        pages = self._pages(w)
        if pages is not None and sys.platform.startswith("linux"):
            mm, first, length = pages
            try:
                mm.madvise(getattr(mmap, "MADV_POPULATE_READ", 22), first, length)
            except OSError:
                pass

    def _release(self, w: torch.Tensor) -> None:
        """Drop the file's pages under w (a view of the map) from this process's resident memory."""
        pages = self._pages(w)
        if pages is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm, first, length = pages
            mm.madvise(mmap.MADV_DONTNEED, first, length)

    def unsupported(self) -> list[str]:
        """Why this file cannot run natively (empty when it can)."""
        why = []
        arch = self.get("general.architecture")
        if arch not in ARCHITECTURES:
            why.append(f"architecture {arch!r} (native: {', '.join(ARCHITECTURES)})")
        if "rope_freqs.weight" in self.tensors:
            why.append("a rope_freqs tensor (llama3 RoPE scaling)")
        if self.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
            why.append(f"RoPE scaling {self.get(f'{arch}.rope.scaling.type')!r}")
        return why

    def hf_config(self) -> dict:
        """The config.json fields our llama family reads, from the GGUF metadata (transformers' GGUF mapping)."""
        a = self.get("general.architecture")
        heads = int(self.get(f"{a}.attention.head_count"))
        dim = int(self.get(f"{a}.embedding_length"))
        hf = dict(model_type=a, vocab_size=int(self.tensors["token_embd.weight"].shape[1]), hidden_size=dim,
                  num_hidden_layers=int(self.get(f"{a}.block_count")), num_attention_heads=heads,
                  num_key_value_heads=int(self.get(f"{a}.attention.head_count_kv", heads)),
                  head_dim=int(self.get(f"{a}.attention.key_length", dim // heads)),
                  intermediate_size=int(self.get(f"{a}.feed_forward_length")),
                  rms_norm_eps=float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
                  max_position_embeddings=int(self.get(f"{a}.context_length", 4096)),
                  rope_theta=float(self.get(f"{a}.rope.freq_base", 10000.0)),
                  tie_word_embeddings="output.weight" not in self.tensors,
                  eos_token_id=self.get("tokenizer.ggml.eos_token_id"))
        if self.get(f"{a}.rope.scaling.type") == "linear":
            hf["rope_scaling"] = {"rope_type": "linear", "factor": float(self.get(f"{a}.rope.scaling.factor"))}
        return hf

    def tensor(self, name: str, float_dtype: torch.dtype) -> torch.Tensor:
        """A tensor as the model runs it: a zero-copy uint8 block view [N, nb, bb] for QUANTIZED types, a float
        tensor (float_dtype) for the others."""
        from gguf import quants

        t = self.tensors[name]
        kind = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape))
        if kind in QUANTIZED:
            return self._blocks(int(t.data_offset), int(t.n_bytes), t.tensor_type, shape)
        if kind in FLOATS:
            data = (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if kind == "BF16" else t.data
            return _from_numpy(np.asarray(data)).reshape(shape).to(float_dtype)
        log.info("lookahead: %s is %s, which the quantized ops do not read: dequantized once", name, kind)
        return torch.from_numpy(quants.dequantize(t.data, t.tensor_type)).reshape(shape).to(float_dtype)

    def _blocks(self, offset: int, nbytes: int, qtype, shape: tuple[int, ...]) -> torch.Tensor:
        """uint8 [rows, K / block_elems, block_bytes] over the file's bytes [offset, offset + nbytes)."""
        from gguf.constants import GGML_QUANT_SIZES

        elems, size = GGML_QUANT_SIZES[qtype]
        K = shape[-1]
        return _from_numpy(self.reader.data[offset:offset + nbytes]).view(-1, K // elems, size)

    def fused(self, names: list[str]) -> list[torch.Tensor]:
        """Parts of one projection: one zero-copy view when they are quantized blocks of one type lying back to
        back in the file (then the fused linear runs), else one tensor per part (float32 where not quantized)."""
        ts = [self.tensors[n] for n in names]
        kinds = {t.tensor_type.name for t in ts}
        adjacent = all(int(a.data_offset) + int(a.n_bytes) == int(b.data_offset) for a, b in zip(ts, ts[1:]))
        if len(kinds) == 1 and kinds <= set(QUANTIZED) and adjacent:
            K = int(ts[0].shape[0])
            if all(int(t.shape[0]) == K for t in ts):
                start, end = int(ts[0].data_offset), int(ts[-1].data_offset) + int(ts[-1].n_bytes)
                return [self._blocks(start, end - start, ts[0].tensor_type, (-1, K))]
        return [self.tensor(n, torch.float32) for n in names]


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """torch.from_numpy without a copy; the map is read-only and the ops never write a weight."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def native_gguf(name_or_path, dtype, device, quantization) -> Path | None:
    """The GGUF file to load with its blocks kept, or None for the dequantized path. quantization "auto": a GGUF
    with dtype "auto" where native_supported says yes (else one log line why not); "gguf": always (load_quantized
    raises where it cannot); None: never."""
    if quantization not in QUANTIZATION:
        raise ValueError(f"quantization must be \"auto\", \"gguf\" or None, got {quantization!r}")
    if quantization is None:
        return None
    path = gguf_file(name_or_path)
    if path is None:
        if quantization == "gguf":
            raise ValueError(f"quantization=\"gguf\" needs a .gguf file or an embedded name, got {name_or_path!r}")
        return None
    if quantization == "gguf":
        return path
    if dtype not in (None, "auto"):
        return None  # an explicit dtype asks for the dequantized model
    why = native_supported(path, device)
    if why:
        log.info("lookahead: %s runs dequantized (%s)", path.name, "; ".join(why))
        return None
    return path


def open_gguf(path: Path) -> GGUFFile:
    """The parsed GGUFFile of path, parsed once per process and file version (gguf-py reads the token arrays of the
    metadata item by item: seconds for a 49k vocabulary)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if _opened.get("key") != key:
        _opened.update(key=key, file=GGUFFile(Path(path)))
    return _opened["file"]


_opened: dict = {}  # open_gguf's last file: one at a time (the map stays open while a model uses it anyway)


def native_supported(gguf: Path, device) -> list[str]:
    """Why `quantization="auto"` cannot run this file natively on device (empty: it can)."""
    why = []
    if torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")).type != "cpu":
        why.append("the device is not the CPU")
    elif not cpu_ops.available():
        why.append("the C++ CPU ops could not be built")
    return why + open_gguf(gguf).unsupported()


def activation_dtype() -> torch.dtype:
    """dtype "auto" of a quantized model: bf16 where the CPU multiplies bf16 natively (the rest of the step runs
    the bf16 ops), fp32 elsewhere."""
    return torch.bfloat16 if cpu_ops.native_bf16() else torch.float32


def load_quantized(cls: type[CausalLM], path: Path, dtype) -> CausalLM:
    """cls's model over the GGUF file at path, its weights in their block formats (zero-copy views of the map);
    dtype is the activations' ("auto": activation_dtype())."""
    f = open_gguf(path)
    why = f.unsupported()
    if why:
        raise ValueError(f"{path} cannot run quantized: {'; '.join(why)}. Load it with quantization=None "
                         "(dequantized)")
    if not cpu_ops.available():
        raise ValueError("quantization=\"gguf\" runs the C++ CPU ops, which could not be built here: load with "
                         "quantization=None")
    act = activation_dtype() if dtype in (None, "auto") else dtype
    if act not in (torch.float32, torch.bfloat16):
        raise ValueError(f"a quantized model's activations are torch.float32 or torch.bfloat16, got {dtype!r}")
    cfg = cls.config_from_hf(f.hf_config())
    cfg.rope_interleaved = True  # the GGUF q/k rows are in ggml's adjacent-pair order
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise ValueError(f"{path}: biases are not read from GGUF files yet; load it with quantization=None")
    with torch.device("meta"):
        model = cls(cfg)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t if t.dtype == torch.uint8 else t.to(act), requires_grad=False)

    try:
        table = param(f.tensor("token_embd.weight", act))
        if table.dtype == torch.uint8:
            model.tok_embeddings = QuantEmbedding(table, act)
        else:
            model.tok_embeddings.weight = table
        model.norm.weight = param(f.tensor("output_norm.weight", act))
        head = table if cfg.tie_word_embeddings else param(f.tensor("output.weight", act))
        model.output.weight = param(f.repacked(head.data)) if repackable(head) else head
        for i, layer in enumerate(model.layers):
            p = f"blk.{i}."
            layer.attention_norm.weight = param(f.tensor(p + "attn_norm.weight", act))
            layer.ffn_norm.weight = param(f.tensor(p + "ffn_norm.weight", act))
            layer.attention.wo.weight = param(f.repacked(f.tensor(p + "attn_output.weight", act)))
            layer.feed_forward.w2.weight = param(f.repacked(f.tensor(p + "ffn_down.weight", act)))
            qkv = f.repacked_projection([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"])
            w13 = f.repacked_projection([p + "ffn_gate.weight", p + "ffn_up.weight"])
            _set_projection(layer.attention, "wqkv", qkv, act)
            _set_projection(layer.feed_forward, "w13", w13, act)
    except KeyError as e:
        raise ValueError(f"{path} lacks the tensor {e.args[0]!r}: is it a complete {cfg.model_type} GGUF?") from None
    model.inv_freq = rope_inv_freq(cfg)
    model.name_or_path = str(path)
    model._weights_list = None
    return model.eval()


def repackable(w: torch.Tensor) -> bool:
    """Whether quant_repack takes w: blocks of a REPACKED format whose rows (outputs) come in eights, and for the
    32-element formats whose rows hold an even number of blocks."""
    if w.dtype != torch.uint8 or w.dim() != 3 or w.shape[0] % 8:
        return False
    fmt = next((k for k in REPACKED if BLOCKS[k][1] == w.shape[-1]), None)
    return fmt is not None and (BLOCKS[fmt][0] == 256 or w.shape[1] % 2 == 0)


def repacked(w: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight as quant_linear reads it fastest: its blocks interleaved by 8 outputs (quant_repack:
    a copy, no longer the file's bytes) where repackable, any other weight as it is."""
    return torch.ops.lookahead_cpu.quant_repack(w) if repackable(w) else w


def _set_projection(module: nn.Module, name: str, parts: list[torch.Tensor], act: torch.dtype) -> None:
    parts = [p if p.dtype == torch.uint8 else p.to(act) for p in parts]
    if len(parts) == 1:
        getattr(module, name).weight = nn.Parameter(parts[0], requires_grad=False)
    else:
        setattr(module, name, SplitLinear(parts))


def tokenizer(path: Path):
    """The tokenizer stored in the GGUF's metadata (transformers reads only the metadata for it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def describe(model: CausalLM) -> str:
    """One line: whether the model runs GGUF blocks natively, and which formats."""
    by_bytes = {bb: name for name, (_, bb) in BLOCKS.items()} | {bb: f"{name} x8" for name, bb in REPACKED.items()}
    kinds: dict[str, int] = {}
    for p in model.parameters():
        if p.dtype == torch.uint8:
            fmt = by_bytes[p.shape[-1]]
            kinds[fmt] = kinds.get(fmt, 0) + p.numel()
    if not kinds:
        return f"weights {str(model.dtype).removeprefix('torch.')} (dequantized)"
    mb = sum(kinds.values()) / 2 ** 20
    return (f"GGUF weights run quantized ({', '.join(sorted(kinds))}; {mb:.0f} MiB), activations "
            f"{str(model.dtype).removeprefix('torch.')}")
