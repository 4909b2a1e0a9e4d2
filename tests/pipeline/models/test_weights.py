"""Loading the DiT from the released layout: strict key coverage, dtypes, fp8 files, the tiny writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import WAN_DIR, load_model_config
from pipeline.quant import Fp8Linear
from pipeline.tiny import write_tiny_weights
from pipeline.weights import LORA_FILE, WeightsError, load_dit, quant_files, wan_shard_files
from pipeline.weights_check import dit_files_digest
from tests.helpers.dit import make_inputs
from tests.pipeline.models.test_dit import rel

#: official-layout fp8 file (e4m3 weights, bf16 scale) against the float32 model, relative L2
#: error of the velocity. Measured 0.05 on the tiny model (e4m3 keeps 3 mantissa bits).
FP8_BOUND = 0.15


@pytest.fixture(scope="module")
def cfg(tiny_weights_dir: Path):
    return load_model_config(tiny_weights_dir).dit


def edit_safetensors(path: Path, fn) -> None:
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


def test_loads_every_tensor_in_the_requested_dtype(tiny_weights_dir: Path, cfg) -> None:
    model = load_dit(tiny_weights_dir, cfg, dtype=torch.bfloat16)
    tensors = list(model.state_dict().values())
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
    shard = load_file(str(wan_shard_files(tiny_weights_dir)[0]))
    key = next(iter(shard))
    assert torch.equal(model.state_dict()[key], shard[key].to(torch.bfloat16))


def test_missing_key_is_named(weights_copy: Path, cfg) -> None:
    shard = wan_shard_files(weights_copy)[2]
    removed = []
    edit_safetensors(shard, lambda s: removed.append(next(iter(s))) or s.pop(removed[0]))
    with pytest.raises(WeightsError, match="missing keys: " + removed[0].replace(".", r"\.")) as info:
        load_dit(weights_copy, cfg, dtype=torch.float32)
    assert info.value.missing == removed


def test_unexpected_and_misshaped_keys_are_named(weights_copy: Path, cfg) -> None:
    audio = weights_copy / "InfiniteTalk" / "single" / "infinitetalk.safetensors"

    def damage(state: dict) -> None:
        state["blocks.0.audio_cross_attn.extra.weight"] = torch.zeros(2)
        state["audio_proj.proj2.weight"] = torch.zeros(3, 3)

    edit_safetensors(audio, damage)
    with pytest.raises(WeightsError) as info:
        load_dit(weights_copy, cfg, dtype=torch.float32)
    message = str(info.value)
    assert "unexpected keys: blocks.0.audio_cross_attn.extra.weight" in message
    assert "audio_proj.proj2.weight [3, 3] != [8, 8]" in message


def test_absent_shard_named_by_the_index(weights_copy: Path, cfg) -> None:
    shard = wan_shard_files(weights_copy)[4]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name):
        load_dit(weights_copy, cfg, dtype=torch.float32)


def test_official_fp8_file_loads_close_to_float32(tiny_weights_dir: Path, cfg) -> None:
    full = load_dit(tiny_weights_dir, cfg, dtype=torch.float32, attention_backend="sdpa")
    fp8 = load_dit(tiny_weights_dir, cfg, dtype=torch.float32, quant="fp8", attention_backend="sdpa")
    qmap = json.loads(quant_files(tiny_weights_dir, "single")[1].read_text())
    layers = {n for n, m in fp8.named_modules() if isinstance(m, Fp8Linear)}
    assert layers == set(qmap) and "blocks.1.ffn.2" in layers
    inputs = make_inputs(cfg)
    with torch.no_grad():
        err = rel(fp8(**inputs), full(**inputs))
    assert 0 < err < FP8_BOUND


def test_fp8_file_coverage_is_checked(weights_copy: Path, cfg) -> None:
    q_file, _ = quant_files(weights_copy, "single")
    edit_safetensors(
        q_file, lambda s: (s.pop("blocks.0.self_attn.o.weight._scale"), s.pop("head.modulation"))
    )
    with pytest.raises(WeightsError) as info:
        load_dit(weights_copy, cfg, dtype=torch.float32, quant="fp8")
    assert set(info.value.missing) == {"blocks.0.self_attn.o.weight._scale", "head.modulation"}


def test_fp8_with_lora_quantizes_after_merging(tiny_weights_dir: Path, cfg) -> None:
    merged = load_dit(tiny_weights_dir, cfg, dtype=torch.float32, lora=tiny_weights_dir / LORA_FILE)
    fp8 = load_dit(tiny_weights_dir, cfg, dtype=torch.float32, quant="fp8", lora=tiny_weights_dir / LORA_FILE)
    layer = fp8.blocks[0].self_attn.q
    assert isinstance(layer, Fp8Linear)
    assert rel(layer.dequantize(torch.float32), merged.blocks[0].self_attn.q.weight) < 0.05
    assert not isinstance(fp8.head.head, Fp8Linear)  # the head stays in the compute dtype


def test_tiny_writer_is_deterministic(tiny_weights_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_weights(tmp_path / "again", seed=0)
    assert dit_files_digest(again) == dit_files_digest(tiny_weights_dir)
    assert (again / "tiny.json").read_text() == (tiny_weights_dir / "tiny.json").read_text()
    other = write_tiny_weights(tmp_path / "other", seed=1)
    assert dit_files_digest(other) != dit_files_digest(tiny_weights_dir)


def test_tiny_folder_layout(tiny_weights_dir: Path) -> None:
    wan = tiny_weights_dir / WAN_DIR
    assert sorted(p.name for p in wan.glob("diffusion_pytorch_model-*")) == [
        f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8)
    ]
    assert json.loads((wan / "config.json").read_text())["model_type"] == "i2v"
    cfg = load_model_config(tiny_weights_dir)
    assert cfg.is_tiny and cfg.buckets["infinitetalk-480"] and cfg.generation.frame_num == 33
    size = sum(p.stat().st_size for p in tiny_weights_dir.rglob("*") if p.is_file())
    assert size < 10e6


def test_swap_audio_weights_equals_loading_the_variant(tiny_weights_dir: Path, cfg) -> None:
    from pipeline.weights import swap_audio_weights

    swapped = load_dit(tiny_weights_dir, cfg, variant="single", dtype=torch.float32)
    swap_audio_weights(swapped, tiny_weights_dir, "multi")
    multi = load_dit(tiny_weights_dir, cfg, variant="multi", dtype=torch.float32)
    for (k, a), (_, b) in zip(swapped.state_dict().items(), multi.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_swap_audio_weights_is_strict(weights_copy: Path, cfg) -> None:
    from pipeline.weights import swap_audio_weights

    model = load_dit(weights_copy, cfg, dtype=torch.float32)
    edit_safetensors(
        weights_copy / "InfiniteTalk" / "multi" / "infinitetalk.safetensors",
        lambda s: s.pop("blocks.1.norm_x.bias"),
    )
    with pytest.raises(WeightsError, match="missing keys: blocks.1.norm_x.bias"):
        swap_audio_weights(model, weights_copy, "multi")
