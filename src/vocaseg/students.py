"""Segmentation networks ("students") that the trained methods (MaskCLIP+, ReCLIP, CLIPTeacher) train.

A student maps RGB pixels in [0, 1] to dense D-dimensional features; the method scores them against
frozen CLIP text embeddings, so the classifier is not part of the student and D (``out_channels``)
is usually CLIP's embedding width.

Students are a backbone (which returns a low-level and a high-level feature map) plus a head:

- ``deeplabv2-r101``/``-r50`` (stride 8): torchvision ResNet with layer3/layer4 dilated 2 and 4 instead
  of strided, ImageNet weights by default; ASPP-v2 head (3x3 conv-BN-ReLU at dilations 6, 12, 18, 24,
  summed).
- ``deeplabv3plus-r101``/``-r50`` (stride 4): same backbone; DeepLabV3+ head (ASPP with 1x1, 3x3 at
  12, 24, 36 and image pooling, then a decoder on layer1's stride-4 features).
- ``deeplabv2-toy`` (stride 8): ResNet-18 layout at a quarter of its widths (16/32/64/128), deep stem
  without max-pool, layer4 dilated 2, random init; ASPP-v2 at 1, 2, 3, 4. ``deeplabv2-toy-os4``
  (stride 4): layer3/layer4 dilated 2 and 4 instead, ASPP-v2 at 2, 4, 6, 8.
- ``deeplabv3plus-toy`` (stride 2): the stride-8 toy backbone; a V3+ head at 64 channels (ASPP rates
  1, 2, 3) with its decoder on layer1's stride-2 features.
- ``fpn-toy`` (stride 4): a plain (undilated) 4-stage toy ResNet, one block a stage, widths 32/64/128/192
  at strides 2-16, with an FPN-lite head (lateral 1x1 convs, top-down sum, one 3x3 conv) at 1/4
  resolution; the student of the CLIPTeacher spec's toy prototype (shared/specs/clipteacher.md, Sec. 7).
- ``mlp-convnext-tiny`` / ``mlp-swin-tiny`` / ``mlp-swin-base`` (stride 4): a timm ``features_only``
  backbone (ImageNet weights from timm by default) with SegFormer's all-MLP head, as CLIPTeacher's
  SegFormer / Swin students; ``timm:NAME`` builds the same from any timm model with ``features_only``.
  ``mlp-convnext-atto-toy``: convnext_atto from random weights with a 64-wide head, for the toy world.

Every stride-2 step pads "same" (3x3 convs and max-pool with padding 1, the 7x7 stem conv with
padding 3, 1x1 shortcuts),
so an H x W input gives exactly ``ceil(H / stride) x ceil(W / stride)`` features, odd sizes included.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, ResNet101_Weights, resnet50, resnet101
from torchvision.models import WeightsEnum
from torchvision.models.resnet import BasicBlock
from torchvision.models.segmentation.deeplabv3 import ASPP

from .loading import ModelNotFoundError, WeightsUnavailableError, _host_reachable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["Student", "STUDENTS", "register_student", "build_student", "list_students",
           "student_param_groups", "DilatedResNet", "ToyResNet", "ASPPV2Head", "DeepLabV3PlusHead", "AllMLPHead",
           "TimmStudent"]


# --------------------------------------------------------------------------------------------- student
class Student(nn.Module):
    """pixels (B,3,H,W) RGB in [0,1] -> features (B, out_channels, ceil(H/stride), ceil(W/stride)).

    The output size is exactly ``ceil(H / stride)`` for every registered student (see the module
    docstring). The student normalises its own input with ImageNet mean/std (the statistics its
    backbone weights were trained with), kept as non-persistent buffers so that checkpoints hold
    weights only. Training the pooling branch of a V3+ head needs batches of 2 or more (BatchNorm on
    a 1x1 map).
    """

    stride: int
    out_channels: int

    def __init__(self, backbone: nn.Module, head: nn.Module, stride: int, out_channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.stride = stride
        self.out_channels = out_channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, pixels: Tensor) -> tuple[Tensor, ...]:
        """Backbone features: ``(low, high)``, layer1's output and layer4's, or every stage's (a pyramid)."""
        return self.backbone((pixels - self.mean) / self.std)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(*self.forward_features(pixels))


def student_param_groups(student: Student) -> dict[str, list[nn.Parameter]]:
    """``{"backbone": [...], "head": [...]}`` so that recipes can give the (new) head a larger lr."""
    return {"backbone": list(student.backbone.parameters()), "head": list(student.head.parameters())}


# ------------------------------------------------------------------------------------------ backbones
class DilatedResNet(nn.Module):
    """torchvision ResNet-50/101 at output stride 8 (layer3/layer4 dilated 2 and 4 instead of strided).

    Submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``; ``fc`` and the
    final pooling are dropped), so a torchvision state dict minus ``fc.*`` loads as it is.
    """

    def __init__(self, depth: int = 101) -> None:
        super().__init__()
        builders = {50: resnet50, 101: resnet101}
        if depth not in builders:
            raise ValueError(f"depth must be one of {sorted(builders)}, got {depth}")
        net = builders[depth](weights=None, replace_stride_with_dilation=[False, True, True])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_channels, self.out_channels = 256, 2048  # layer1 (stride 4), layer4 (stride 8)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ToyResNet(nn.Module):
    """A small ResNet-18 layout for the 96-px synthetic world (widths, strides and dilations as given).

    Deep "V1c" stem (three 3x3 conv-BN-ReLU, the first with stride 2) and no max-pool, so small images
    keep their detail. Stages of two torchvision ``BasicBlock``s; a stage with dilation > 1 dilates
    both 3x3 convs of every block (torchvision's BasicBlock refuses a dilation argument, so it is set
    on the built convs). ``stride`` = 2 x the product of the stage strides. The registered toy
    students pass their own widths, strides and dilations (see the registry below).
    """

    def __init__(self, stem_widths: Sequence[int] = (16, 16, 32), widths: Sequence[int] = (32, 64, 128, 256),
                 blocks: int = 2, strides: Sequence[int] = (1, 2, 1, 1), dilations: Sequence[int] = (1, 1, 2, 4)
                 ) -> None:
        super().__init__()
        w0, w1, w2 = stem_widths
        self.stem = nn.Sequential(_conv_bn_relu(3, w0, stride=2), _conv_bn_relu(w0, w1), _conv_bn_relu(w1, w2))
        self.stride = 2 * math.prod(strides)
        cin, stages = w2, []
        for width, stride, dilation in zip(widths, strides, dilations):
            stages.append(self._stage(cin, width, blocks, stride, dilation))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.low_channels, self.out_channels = widths[0], widths[-1]
        for m in self.modules():  # torchvision's ResNet init, since there are no pretrained weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, width: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            down = None
            if i == 0 and (stride != 1 or cin != width):
                down = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            block = BasicBlock(cin if i == 0 else width, width, stride if i == 0 else 1, down)
            for conv in (block.conv1, block.conv2):
                conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
            layers.append(block)
        return nn.Sequential(*layers)

    def stages(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every stage's output, finest first."""
        levels = [self.stem(x)]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            levels.append(stage(levels[-1]))
        return tuple(levels[1:])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        levels = self.stages(x)
        return levels[0], levels[-1]


class ToyPyramid(ToyResNet):
    """:class:`ToyResNet` returning every stage's output (finest first), for heads that fuse all levels."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.stages(x)


# ---------------------------------------------------------------------------------------------- heads
class ASPPV2Head(nn.Module):
    """DeepLabV2's ASPP: parallel 3x3 conv-BN-ReLU branches at several dilations, outputs summed.

    Unlike the original DeepLabV2 (which sums per-branch class logits) each branch outputs D feature
    channels and ends in ReLU, as in the official MaskCLIP+ code, so features are >= 0. No image
    pooling, no dropout. Uses only the high-level features.
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.dilations = tuple(dilations)
        self.branches = nn.ModuleList(_conv_bn_relu(in_channels, out_channels, 3, dilation=d) for d in dilations)

    def forward(self, low: Tensor | None, high: Tensor) -> Tensor:
        out = self.branches[0](high)
        for branch in self.branches[1:]:
            out = out + branch(high)
        return out


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+: ASPP (1x1, three dilated 3x3, image pooling; torchvision's, with its dropout 0.5)
    on the high-level features, upsampled to the low-level features' resolution, concatenated with
    them (projected by 1x1 conv-BN-ReLU), two 3x3 conv-BN-ReLU, and a plain 1x1 conv to D (no bias,
    no activation: features can take any sign). Output stride = the low-level features' stride.
    """

    def __init__(self, in_channels: int, low_channels: int, out_channels: int, rates: Sequence[int] = (12, 24, 36),
                 aspp_channels: int = 256, low_proj: int = 48, decoder_channels: int = 256) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, list(rates), aspp_channels)
        self.low_proj = _conv_bn_relu(low_channels, low_proj, 1)
        self.decoder = nn.Sequential(_conv_bn_relu(aspp_channels + low_proj, decoder_channels),
                                     _conv_bn_relu(decoder_channels, decoder_channels))
        self.proj = nn.Conv2d(decoder_channels, out_channels, 1, bias=False)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        x = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.proj(self.decoder(torch.cat([x, self.low_proj(low)], dim=1)))


class FPNLiteHead(nn.Module):
    """A light FPN over the last ``len(in_channels)`` levels it is given (finer ones are skipped): each is
    projected to ``width`` by a 1x1 conv, summed top-down (the coarser map upsampled bilinearly onto the
    finer one), then one 3x3 conv-BN-ReLU and a plain 1x1 conv to D at the finest used level's resolution."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, width: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = _conv_bn_relu(width, width)
        self.proj = nn.Conv2d(width, out_channels, 1)

    def forward(self, *levels: Tensor) -> Tensor:
        levels = levels[-len(self.lateral):]
        x = self.lateral[-1](levels[-1])
        for lateral, level in zip(self.lateral[-2::-1], levels[-2::-1]):
            x = lateral(level) + F.interpolate(x, size=level.shape[-2:], mode="bilinear", align_corners=False)
        return self.proj(self.smooth(x))


class AllMLPHead(nn.Module):
    """SegFormer's all-MLP decoder: each level linearly projected to ``width`` channels (a 1x1 conv),
    upsampled to the finest level, concatenated, fused by 1x1 conv-BN-ReLU, dropout 0.1, then a plain
    1x1 conv to D (features of any sign)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, width: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.levels = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = _conv_bn_relu(width * len(in_channels), width, 1)
        self.drop = nn.Dropout2d(dropout)
        self.proj = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        x = [F.interpolate(lin(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size
             else lin(f) for lin, f in zip(self.levels, features)]
        return self.proj(self.drop(self.fuse(torch.cat(x, dim=1))))


class TimmStudent(nn.Module):
    """Any timm model with ``features_only`` as a student: all its feature levels into :class:`AllMLPHead`.

    Same contract as :class:`Student` (``stride``, ``out_channels``, ``backbone``/``head``, pixels in
    [0, 1] normalised inside with the backbone's own statistics); the output stride is the finest
    level's (4 for ConvNeXt and Swin), and sizes that are not multiples of the coarsest stride are
    padded on the right and bottom, then cropped, so any input size works.
    """

    def __init__(self, backbone: nn.Module, out_channels: int, width: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        info = backbone.feature_info
        self.head = AllMLPHead(info.channels(), out_channels, width)
        self.stride, self.coarsest = info.reduction()[0], info.reduction()[-1]
        self.out_channels = out_channels
        self.channels_last = getattr(backbone, "output_fmt", "NCHW") == "NHWC"  # timm's Swin
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: Tensor) -> Tensor:
        h, w = pixels.shape[-2:]
        x = (pixels - self.mean) / self.std
        pad_h, pad_w = (-h) % self.coarsest, (-w) % self.coarsest
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros = the mean colour after normalisation
        feats = self.backbone(x)
        if self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        out = self.head(feats)
        return out[..., :math.ceil(h / self.stride), :math.ceil(w / self.stride)]


# ------------------------------------------------------------------------------------------- registry
class StudentEntry(NamedTuple):
    factory: Callable[[int], Student]  # out_channels -> randomly initialised student
    default_weights: WeightsEnum | None  # backbone weights for weights="default"


STUDENTS: dict[str, StudentEntry] = {}


def register_student(name: str, default_weights: WeightsEnum | None = None
                     ) -> Callable[[Callable[[int], Student]], Callable[[int], Student]]:
    """Decorator: register ``factory(out_channels) -> Student`` under ``name`` (duplicates raise)."""
    def decorate(factory: Callable[[int], Student]) -> Callable[[int], Student]:
        if name in STUDENTS:
            raise ValueError(f"student {name!r} is already registered")
        STUDENTS[name] = StudentEntry(factory, default_weights)
        return factory
    return decorate


def list_students() -> list[str]:
    return sorted(STUDENTS) + sorted(TIMM_STUDENTS)


@register_student("deeplabv2-r101", ResNet101_Weights.IMAGENET1K_V2)
def _deeplabv2_r101(out_channels: int) -> Student:
    return Student(DilatedResNet(101), ASPPV2Head(2048, out_channels), stride=8, out_channels=out_channels)


@register_student("deeplabv2-r50", ResNet50_Weights.IMAGENET1K_V2)
def _deeplabv2_r50(out_channels: int) -> Student:
    return Student(DilatedResNet(50), ASPPV2Head(2048, out_channels), stride=8, out_channels=out_channels)


@register_student("deeplabv3plus-r101", ResNet101_Weights.IMAGENET1K_V2)
def _deeplabv3plus_r101(out_channels: int) -> Student:
    return Student(DilatedResNet(101), DeepLabV3PlusHead(2048, 256, out_channels), stride=4,
                   out_channels=out_channels)


@register_student("deeplabv3plus-r50", ResNet50_Weights.IMAGENET1K_V2)
def _deeplabv3plus_r50(out_channels: int) -> Student:
    return Student(DilatedResNet(50), DeepLabV3PlusHead(2048, 256, out_channels), stride=4,
                   out_channels=out_channels)


# The toy students for the 96-px synthetic world, sized for a 2-core CPU (README, "MaskCLIP+"): ResNet-18's
# layout at a quarter of its widths (16/32/64/128). Output stride 8 (12 x 12 features at 96 px, the toy
# CLIP's own grid) with ASPP dilations 1-4, the paper's 6-24 scaled to that grid; the os4 variant keeps
# stride 4 (layer3/layer4 dilated 2 and 4), which learned a little faster per step but costs 2.2x.
TOY_WIDTHS = dict(stem_widths=(16, 16, 16), widths=(16, 32, 64, 128))


@register_student("deeplabv2-toy")
def _deeplabv2_toy(out_channels: int) -> Student:
    backbone = ToyResNet(**TOY_WIDTHS, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    return Student(backbone, ASPPV2Head(backbone.out_channels, out_channels, (1, 2, 3, 4)), stride=8,
                   out_channels=out_channels)


@register_student("deeplabv2-toy-os4")
def _deeplabv2_toy_os4(out_channels: int) -> Student:
    backbone = ToyResNet(**TOY_WIDTHS, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    return Student(backbone, ASPPV2Head(backbone.out_channels, out_channels, (2, 4, 6, 8)), stride=4,
                   out_channels=out_channels)


@register_student("fpn-toy")
def _fpn_toy(out_channels: int) -> Student:
    # the spec's toy prototype (about 1 M parameters): one block a stage at 1/2, 1/4, 1/8, 1/16; the head reads
    # 1/4 to 1/16 and emits at 1/4
    backbone = ToyPyramid(stem_widths=(16, 16, 32), widths=(32, 64, 128, 192), blocks=1, strides=(1, 2, 2, 2),
                          dilations=(1, 1, 1, 1))
    return Student(backbone, FPNLiteHead((64, 128, 192), out_channels, width=64), stride=4,
                   out_channels=out_channels)


TIMM_STUDENTS = {  # name -> (timm model, head width, extra timm kwargs)
    "mlp-convnext-tiny": ("convnext_tiny", 256, {}),
    "mlp-swin-tiny": ("swin_tiny_patch4_window7_224", 256, {"strict_img_size": False}),
    "mlp-swin-base": ("swin_base_patch4_window12_384", 512, {"strict_img_size": False}),
    "mlp-convnext-atto-toy": ("convnext_atto", 64, {}),  # random init by default (the toy world)
}


@register_student("deeplabv3plus-toy")
def _deeplabv3plus_toy(out_channels: int) -> Student:
    backbone = ToyResNet(**TOY_WIDTHS, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    # low-level = layer1 (16 ch, stride 2) -> output stride 2
    head = DeepLabV3PlusHead(backbone.out_channels, backbone.low_channels, out_channels, rates=(1, 2, 3),
                             aspp_channels=64, low_proj=24, decoder_channels=64)
    return Student(backbone, head, stride=2, out_channels=out_channels)


# -------------------------------------------------------------------------------------------- weights
def _torchvision_state_dict(weights: WeightsEnum) -> dict[str, Tensor]:
    """torchvision's weights from torch hub's cache, or downloaded; fails in seconds when offline."""
    url = weights.url
    filename = os.path.basename(urlparse(url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file() and not _host_reachable(url):
        raise WeightsUnavailableError(
            f"cannot download the student's ImageNet backbone weights: no network connection to "
            f"{urlparse(url).hostname} and no cached copy at {cached}. Download {url} on a machine with internet "
            f"and pass --student-weights /path/to/{filename}, or --student-weights none to train from scratch")
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True)


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelNotFoundError(f"{path} does not hold a state dict (found {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_backbone_weights(backbone: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a torchvision-named backbone state dict: ``fc.*`` ignored, strict otherwise."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent from some exports
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    if missing or unexpected or wrong:
        problems = [f"missing keys: {few(missing)}" if missing else "",
                    f"unexpected keys: {few(unexpected)}" if unexpected else "",
                    f"shape mismatch: {few(wrong)}" if wrong else ""]
        prefixes = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
        if len(prefixes) == 1 and missing:  # e.g. a whole segmentation model's "backbone." weights
            prefix = prefixes.pop()
            if {k[len(prefix):] for k in unexpected} >= set(missing):
                problems.append(f"the file's keys carry the prefix {prefix!r}; save them without it")
        raise ModelNotFoundError(
            f"student backbone weights {source} do not fit the backbone ({type(backbone).__name__}; torchvision "
            f"naming expected, e.g. layer1.0.conv1.weight): " + "; ".join(p for p in problems if p))
    backbone.load_state_dict(state, strict=False)


def build_student(name: str, out_channels: int, weights: str | os.PathLike | None = "default") -> Student:
    """Build a registered student.

    weights: ``"default"`` (ImageNet backbone weights for the R50/R101 students, random init for the
    toy ones), ``None``/``"none"`` (random init), or a local ``.pth``/``.pt``/``.safetensors`` file
    holding a backbone state dict in torchvision naming. The head is always randomly initialised.
    """
    if name in TIMM_STUDENTS or name.startswith("timm:"):
        return build_timm_student(name, out_channels, weights)
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; known students: {', '.join(list_students())}, "
                         "or timm:NAME for any timm model with features_only")
    entry = STUDENTS[name]
    weights = os.fspath(weights) if weights is not None else None
    state, source = None, None  # fetched before building, so that a missing file fails at once
    if weights is None or weights.lower() == "none":
        pass
    elif weights == "default":
        if entry.default_weights is not None:
            state, source = _torchvision_state_dict(entry.default_weights), entry.default_weights.url
    elif os.path.isfile(weights):
        state, source = _read_state_dict(weights), weights
    else:
        raise WeightsUnavailableError(
            f"student weights file not found: {weights} (pass a .pth/.pt/.safetensors backbone state dict, "
            "'default' or 'none')")
    student = entry.factory(out_channels)
    if state is not None:
        load_backbone_weights(student.backbone, state, source)
    return student


def build_timm_student(name: str, out_channels: int, weights: str | os.PathLike | None = "default") -> TimmStudent:
    """A :class:`TimmStudent`: ``weights`` ``"default"`` = timm's pretrained weights (ImageNet; from the
    Hugging Face hub, fails fast offline), ``None``/``"none"`` = random, or a local checkpoint file
    of the timm model (its classifier is dropped)."""
    import timm

    if name.startswith("timm:"):
        model_name, width, extra = name[len("timm:"):], 256, {}
    else:
        model_name, width, extra = TIMM_STUDENTS[name]
    if model_name not in timm.list_models():
        raise ValueError(f"timm has no model {model_name!r} (see timm.list_models())")
    weights = os.fspath(weights) if weights is not None else None
    if name == "mlp-convnext-atto-toy" and weights == "default":
        weights = None
    kwargs = dict(features_only=True, **extra)
    if weights is None or weights.lower() == "none":
        kwargs["pretrained"] = False
    elif weights == "default":
        if not _timm_weights_cached(model_name) and not _host_reachable("https://huggingface.co"):
            raise WeightsUnavailableError(
                f"cannot download the ImageNet weights of timm's {model_name}: no network connection to "
                "huggingface.co and no cached copy. Download them on a machine with internet and pass "
                "--student-weights /path/to/model.safetensors, or --student-weights none to train from scratch")
        kwargs["pretrained"] = True
    elif os.path.isfile(weights):
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": weights})
    else:
        raise WeightsUnavailableError(f"student weights file not found: {weights} (pass a timm checkpoint file, "
                                      "'default' or 'none')")
    try:
        backbone = timm.create_model(model_name, **kwargs)
    except RuntimeError as err:  # a file of another model
        raise ModelNotFoundError(f"student weights {weights} do not fit timm's {model_name}: {err}") from None
    return TimmStudent(backbone, out_channels, width)


def _timm_weights_cached(model_name: str) -> bool:
    """Whether timm's default weights for ``model_name`` are already in the Hugging Face cache."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(model_name).hf_hub_id
        if not hub_id:
            return False
        repo, _, revision = hub_id.partition("@")
        return any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
                   for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:  # noqa: BLE001 - an unknown cache layout means "not cached"
        return False
