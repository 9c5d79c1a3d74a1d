import math
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from vocaseg import students as st
from vocaseg.loading import WeightsUnavailableError
from vocaseg.students import (STUDENTS, ASPPV2Head, Student, build_student, list_students, register_student,
                              student_param_groups)

NAMES = ["deeplabv2-r101", "deeplabv2-r50", "deeplabv3plus-r101", "deeplabv3plus-r50",
         "deeplabv2-toy", "deeplabv2-toy-os4", "deeplabv3plus-toy", "fpn-toy"]
STRIDES = {"deeplabv2-r101": 8, "deeplabv2-r50": 8, "deeplabv3plus-r101": 4, "deeplabv3plus-r50": 4,
           "deeplabv2-toy": 8, "deeplabv2-toy-os4": 4, "deeplabv3plus-toy": 2, "fpn-toy": 4}
D = 12


class _Built(dict):
    """Randomly initialised students, each built on first use and then shared (an R101 takes ~1 s)."""

    def __missing__(self, name: str) -> Student:
        torch.manual_seed(0)
        self[name] = build_student(name, D, weights=None)
        return self[name]


@pytest.fixture(scope="module")
def built():
    return _Built()


@pytest.fixture(scope="module")
def r50_state():
    torch.manual_seed(1)
    net = torchvision.models.resnet50(weights=None)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_registry_names():
    from vocaseg.students import TIMM_STUDENTS

    assert sorted(NAMES) + sorted(TIMM_STUDENTS) == list_students()  # the timm ones: tests/test_clipteacher.py
    assert set(STUDENTS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_stride(built, name):
    student = built[name].eval()
    assert isinstance(student, Student)
    assert student.stride == STRIDES[name] and student.out_channels == D
    with torch.no_grad():
        for h, w in [(97, 75), (64, 48)]:
            out = student(torch.rand(1, 3, h, w))
            assert out.shape == (1, D, math.ceil(h / student.stride), math.ceil(w / student.stride))
            assert torch.isfinite(out).all()


# the R101s differ from the R50s only in layer3's depth; their backward passes are slow on 2 cores
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "r101" in n else n for n in NAMES])
def test_gradients_reach_every_parameter(built, name):
    student = built[name].train()
    student.zero_grad()
    size = 48 if "toy" in name else 40
    student(torch.rand(2, 3, size, size)).mean().backward()  # batch 2: BatchNorm on the 1x1 pooled map
    params = dict(student.named_parameters())
    assert all(p.requires_grad for p in params.values())
    no_grad = [k for k, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not no_grad, no_grad
    student.zero_grad(set_to_none=True)
    student.eval()


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_partition(built, name):
    student = built[name]
    groups = student_param_groups(student)
    assert set(groups) == {"backbone", "head"} and groups["backbone"] and groups["head"]
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in student.parameters()}


def test_dilated_backbone_layout(built):
    backbone = built["deeplabv2-r50"].backbone
    assert backbone.layer3[1].conv2.dilation == (2, 2) and backbone.layer4[1].conv2.dilation == (4, 4)
    assert backbone.layer3[0].conv2.stride == (1, 1) and backbone.layer4[0].conv2.stride == (1, 1)
    assert not hasattr(backbone, "fc")
    toy = built["deeplabv2-toy"].backbone
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in toy.modules())
    assert [toy.stem[i][0].out_channels for i in range(3)] == [16, 16, 16]
    assert [layer[0].conv2.out_channels for layer in (toy.layer1, toy.layer2, toy.layer3, toy.layer4)] == \
        [16, 32, 64, 128]
    assert toy.layer3[0].conv1.dilation == (1, 1) and toy.layer4[1].conv2.dilation == (2, 2)
    os4 = built["deeplabv2-toy-os4"].backbone
    assert os4.layer3[0].conv1.dilation == (2, 2) and os4.layer4[1].conv2.dilation == (4, 4)


@pytest.mark.parametrize("name,dilations,in_ch", [("deeplabv2-r50", (6, 12, 18, 24), 2048),
                                                   ("deeplabv2-toy", (1, 2, 3, 4), 128),
                                                   ("deeplabv2-toy-os4", (2, 4, 6, 8), 128)])
def test_aspp_v2_sums_four_dilated_branches(built, name, dilations, in_ch):
    head = built[name].head
    assert isinstance(head, ASPPV2Head) and len(head.branches) == 4
    for branch, d in zip(head.branches, dilations):
        conv, bn, relu = branch
        assert conv.kernel_size == (3, 3) and conv.dilation == (d, d) and conv.padding == (d, d)
        assert conv.bias is None and conv.in_channels == in_ch and conv.out_channels == D
        assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    head.eval()
    x = torch.randn(2, in_ch, 7, 9)
    with torch.no_grad():
        expected = sum(torch.relu(b[1](torch.nn.functional.conv2d(x, b[0].weight, padding=d, dilation=d)))
                       for b, d in zip(head.branches, dilations))
        out = head(None, x)
    assert out.shape == (2, D, 7, 9)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out >= 0).all()


def test_v3plus_head_ends_in_plain_conv(built):
    student = built["deeplabv3plus-toy"].eval()
    assert isinstance(student.head.proj, torch.nn.Conv2d) and student.head.proj.kernel_size == (1, 1)
    with torch.no_grad():
        assert (student(torch.rand(2, 3, 32, 32)) < 0).any()


def test_registry_duplicate_and_unknown():
    with pytest.raises(ValueError, match="already registered"):
        register_student("deeplabv2-toy")(lambda d: None)
    with pytest.raises(ValueError, match="deeplabv2-r101.*deeplabv3plus-toy"):
        build_student("deeplabv9-r7", 8)


def test_normalisation_buffers(built):
    student = built["deeplabv2-toy"]
    torch.testing.assert_close(student.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(student.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert student.mean.shape == student.std.shape == (1, 3, 1, 1)
    assert not any(k in ("mean", "std") or k.endswith((".mean", ".std")) for k in student.state_dict())
    # forward really normalises: the backbone sees (pixels - mean) / std
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        low, high = student.forward_features(x)
        torch.testing.assert_close(high, student.backbone((x - student.mean) / student.std)[1])


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_read_state_dict_formats(r50_state, tmp_path, fmt):
    path = tmp_path / f"r50.{'pt' if fmt == 'wrapped' else fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in r50_state.items()}, str(path))
    elif fmt == "wrapped":  # a training checkpoint: {"state_dict": {"module.x": ...}}
        torch.save({"state_dict": {f"module.{k}": v for k, v in r50_state.items()}}, path)
    else:
        torch.save(r50_state, path)
    state = st._read_state_dict(str(path))
    assert set(state) == set(r50_state) and all(torch.equal(state[k], v) for k, v in r50_state.items())


def test_local_backbone_weights_load(r50_state, tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(r50_state, path)
    student = build_student("deeplabv2-r50", D, str(path))
    loaded = student.backbone.state_dict()
    assert set(loaded) == {k for k in r50_state if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], v) for k, v in r50_state.items() if not k.startswith("fc."))


def test_bad_weights_files(built, r50_state, tmp_path):
    bad = {f"encoder.{k}": v for k, v in r50_state.items()}
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as info:
        build_student("deeplabv2-r50", D, str(path))
    message = str(info.value)
    assert "missing keys: bn1.bias" in message and "unexpected keys: encoder.bn1.bias" in message
    assert "prefix 'encoder.'" in message
    backbone = built["deeplabv2-r50"].backbone  # a failed load leaves it untouched
    with pytest.raises(ValueError, match=r"missing keys: layer4\."):
        st.load_backbone_weights(backbone, {k: v for k, v in r50_state.items() if not k.startswith("layer4.")}, "x")
    wrong = dict(r50_state, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"shape mismatch: conv1\.weight"):
        st.load_backbone_weights(backbone, wrong, "x")
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_student("deeplabv2-r50", D, str(tmp_path / "absent.pth"))


def test_default_weights_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(st, "_host_reachable", lambda url, timeout=3.0: False)

    def no_download(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        build_student("deeplabv2-r50", 16, "default")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and "--student-weights" in message and "none" in message
    assert torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url in message


def test_default_weights_from_hub_cache(r50_state, tmp_path, monkeypatch):
    """A copy already in torch hub's cache loads without any network check."""
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(r50_state, tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(st, "_host_reachable", lambda *a, **k: pytest.fail("network checked despite the cache"))
    student = build_student("deeplabv2-r50", D, "default")
    assert torch.equal(student.backbone.layer4[2].conv3.weight, r50_state["layer4.2.conv3.weight"])


def test_toy_default_and_none_are_random(monkeypatch):
    monkeypatch.setattr(st, "_host_reachable", lambda *a, **k: pytest.fail("toy students need no network"))
    for weights in ("default", None, "none", "None"):
        student = build_student("deeplabv2-toy", D, weights)
        assert student.out_channels == D
