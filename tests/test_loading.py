import socket
import time

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vocaseg import Segmenter
from vocaseg.loading import ModelNotFoundError, WeightsUnavailableError, load_clip


@pytest.fixture(scope="module")
def rn50_state():
    torch.manual_seed(0)
    model = open_clip.create_model("RN50", pretrained=None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state, fp16=False):
    sd = model.state_dict()
    if fp16:  # OpenAI's builder stores weights in half precision, as OpenAI ships them
        return all(torch.equal(sd[k].float(), v.half().float()) or torch.equal(sd[k].float(), v.float())
                   for k, v in state.items() if k in sd)
    return all(torch.equal(sd[k].float(), v.float()) for k, v in state.items() if k in sd)


@pytest.mark.parametrize("fmt", ["pt", "bin", "safetensors", "wrapped"])
def test_local_checkpoint_formats(rn50_state, tmp_path, fmt):
    path = tmp_path / f"w.{'pt' if fmt == 'wrapped' else fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in rn50_state.items()}, str(path))
    elif fmt == "wrapped":  # a training checkpoint: {"state_dict": {"module.x": ...}}
        torch.save({"state_dict": {f"module.{k}": v for k, v in rn50_state.items()}}, path)
    else:
        torch.save(rn50_state, path)
    loaded = load_clip("RN50", pretrained=str(path))
    assert _same(loaded.model, rn50_state)


def test_openai_torchscript_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = open_clip.create_model("RN50", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "RN50.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_clip("RN50", pretrained=str(path))
    assert _same(loaded.model, model.state_dict(), fp16=True)


def test_checkpoint_of_other_architecture_is_explained(rn50_state, tmp_path):
    path = tmp_path / "rn50.pt"
    torch.save(rn50_state, path)
    with pytest.raises(ModelNotFoundError, match="does not fit architecture 'ViT-B-32'"):
        load_clip("ViT-B-32", pretrained=str(path))


def test_offline_tag_fails_fast_with_the_fix(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    t0 = time.time()
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert time.time() - t0 < 10
    assert "--pretrained /path/to/" in str(info.value) and "ViT-B-16" in str(info.value)


def test_unknown_names_and_tags():
    with pytest.raises(ModelNotFoundError, match="Did you mean"):
        load_clip("ViT-B-61")
    with pytest.raises(WeightsUnavailableError, match="Tags for ViT-B-32"):
        load_clip("ViT-B-32", pretrained="not-a-tag")
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_clip("ViT-B-32", pretrained="/no/such/file.pt")


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_real_architectures_random_init(arch):
    seg = Segmenter.from_pretrained(arch, pretrained=None, templates="photo", short_side=None)
    res = seg.predict((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8), ["a", "b"])
    assert res.labels.shape == (96, 128)


def test_toy_alias_random_and_missing_file(tmp_path):
    loaded = load_clip("toy", pretrained=None)
    assert loaded.model.visual.image_size == (96, 96) or loaded.model.visual.image_size == 96
    with pytest.raises(WeightsUnavailableError):
        load_clip("toy", pretrained=str(tmp_path / "missing.safetensors"))
