"""The fast paths give the outputs of the straightforward ones: batched windows against a per-window
loop (odd sizes, images smaller than a window), the int8 image tower against float32."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_clip
from vocaseg import Segmenter
from vocaseg.bench import per_window_logits
from vocaseg.cli import main
from vocaseg.quantize import Int8ReadySelfAttention, int8_engine, quantize_image_tower


def _segmenter(kind, tokenizer, **config):
    return Segmenter(tiny_clip(kind), tokenizer, templates="plain", mean=(0.5,) * 3, std=(0.25,) * 3, **config)


@pytest.mark.parametrize("kind,mode,size", [
    ("vit", "slide", (37, 53)),  # smaller than the window: one padded window
    ("vit", "slide", (70, 131)),  # odd sizes, overlapping windows, last flush with the edge
    ("vit", "whole", (70, 131)),
    ("resnet", "slide", (97, 75)),
    ("resnet", "whole", (45, 61)),
])
def test_batched_windows_equal_a_per_window_loop(kind, mode, size, tokenizer):
    seg = _segmenter(kind, tokenizer, mode=mode, short_side=None, window=64, stride=40, batch_size=3)
    rng = np.random.default_rng(0)
    images = [(rng.random((*size, 3)) * 255).astype(np.uint8), (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)]
    classes = ["cat", "road", "sky, cloud"]
    fast = seg.predict_batch(images, classes)  # both images' windows batched together
    for image, result in zip(images, fast):
        want = per_window_logits(seg, image, classes)
        assert result.logits.shape == want.shape == (3, *image.shape[:2])
        torch.testing.assert_close(result.logits, want, rtol=1e-5, atol=1e-5)


def test_compiled_forward_gives_the_eager_logits(tokenizer):
    from torch._dynamo.utils import counters

    seg = _segmenter("vit", tokenizer, mode="slide", short_side=None, window=64, stride=40, batch_size=4)
    rng = np.random.default_rng(1)
    images = [(rng.random((70, 131, 3)) * 255).astype(np.uint8), (rng.random((37, 53, 3)) * 255).astype(np.uint8)]
    classes = ["cat", "road", "sky, cloud"]
    graphs = counters["stats"]["unique_graphs"]
    compiled = seg.with_options(compile=True).predict_batch(images, classes)
    assert counters["stats"]["unique_graphs"] > graphs  # it went through dynamo, not silently eager
    for image, eager, fast in zip(images, seg.predict_batch(images, classes), compiled):
        torch.testing.assert_close(fast.logits, eager.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.logits, per_window_logits(seg, image, classes), rtol=1e-5, atol=1e-5)


def test_int8_ready_attention_is_the_same_computation():
    torch.manual_seed(0)
    for batch_first in (True, False):
        attn = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
        mine = Int8ReadySelfAttention(attn)
        x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
        want = attn(x, x, x, need_weights=False)[0]
        got, _ = mine(x, x, x, need_weights=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_int8_tower_is_close_and_leaves_the_original_untouched(tokenizer):
    clip = tiny_clip("vit")
    before = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    q = quantize_image_tower(clip.visual)
    assert all(torch.equal(before[k], v) for k, v in clip.visual.state_dict().items())
    dynamic = [m for m in q.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]
    assert not any(type(m) is nn.Linear for m in q.modules())  # every Linear is the int8 one, q/k/v included
    assert len(dynamic) == 2 * 4  # two blocks: q/k/v, out_proj, MLP c_fc, c_proj
    seg = Segmenter(clip, tokenizer, templates="plain")
    x = seg.normalize(torch.rand(2, 3, 64, 64))
    a = seg.model.backbone.dense(x).features
    b = seg.with_options(precision="int8").model.backbone.dense(x).features
    assert torch.nn.functional.cosine_similarity(a, b, dim=1).mean() > 0.98
    with pytest.raises(NotImplementedError, match="fp32"):
        quantize_image_tower(tiny_clip("resnet").visual)


@pytest.fixture(scope="module")
def toy_on_synth():
    """The toy on 60 synth val scenes: (score(precision) -> mIoU, the fp32 mIoU), fp32 evaluated once."""
    from vocaseg.data.datasets import build_dataset
    from vocaseg.evaluation import evaluate

    ds = build_dataset("synth", None, "val", length=60)
    seg = Segmenter.from_pretrained("toy", templates=ds.templates, **ds.protocol)

    def score(precision):
        return evaluate(seg.with_options(precision=precision), ds, None, workers=0, batch_images=32,
                        progress=False)["mIoU"]

    return score, score("fp32")


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_cpu_fast_precisions_keep_toy_quality_within_half_a_point(precision, toy_on_synth):
    score, fp32 = toy_on_synth
    assert abs(score(precision) - fp32) < 0.5 and fp32 > 30


def test_int8_engine_is_onednn_only_with_amx_and_leaves_the_global_engine(monkeypatch):
    monkeypatch.delenv("VOCASEG_INT8_ENGINE", raising=False)
    engines = torch.backends.quantized.supported_engines
    if "onednn" not in engines or "x86" not in engines:
        pytest.skip(f"this torch build's int8 engines: {engines}")
    before = torch.backends.quantized.engine
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_int8": True}, raising=False)
    assert int8_engine() == "onednn"
    quantize_image_tower(tiny_clip("vit").visual)
    assert torch.backends.quantized.engine == before  # set for the packing only
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_int8": False}, raising=False)
    assert int8_engine() == before
    monkeypatch.setenv("VOCASEG_INT8_ENGINE", "fbgemm" if "fbgemm" in engines else "x86")
    assert int8_engine() in ("fbgemm", "x86")
    monkeypatch.setenv("VOCASEG_INT8_ENGINE", "tpu")
    with pytest.raises(ValueError, match="VOCASEG_INT8_ENGINE=tpu"):
        int8_engine()


def test_int8_errors_name_the_fix(tmp_path, capsys):
    seg = Segmenter.from_pretrained("toy-maskclip-plus")
    with pytest.raises(ValueError, match="training-free"):
        seg.with_options(precision="int8").model
    assert main(["segment", str(tmp_path / "none.png"), "--classes", "a, b", "--precision", "int8",
                 "--model", "toy-maskclip-plus", "--out", str(tmp_path / "o")]) == 2


def test_bench_times_precisions_and_the_baseline_in_one_run(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "toy", "--images", "2", "--device", "cpu", "--precision", "fp32", "int8",
                 "--baseline", "--json", str(out), "--text", "--eval-images", "3", "--eval-dir", str(tmp_path / "ds"),
                 "--workers", "0", "--batch-images", "2", "--load-batch", "1", "2"]) == 0
    report = json.loads(out.read_text())
    rows = [r for r in report["rows"] if "precision" in r]
    extra = {r["setting"].split(":")[0]: r for r in report["rows"] if "precision" not in r}
    assert extra["text 171 classes x 85 templates"]["seconds"] > 0 and extra["eval"]["images_per_s"] > 0
    assert len(list((tmp_path / "ds" / "images").glob("*.jpg"))) == 3
    end_to_end = [r for r in report["rows"] if r["setting"].startswith("eval: end to end")]
    assert len(end_to_end) == 2 and end_to_end[0]["mIoU"] == end_to_end[1]["mIoU"]  # the loader batch changes no number
    assert all(r["timings"]["segmenting (host)"] > 0 for r in end_to_end)
    assert {r["precision"] for r in rows} == {"fp32", "int8"} and report["versions"]["torch"] == torch.__version__
    slide = [r for r in rows if r["setting"].startswith("sclip")]
    assert [r["path"] for r in slide][-1].startswith("per-window") and all(r["images_per_s"] > 0 for r in rows)
    assert slide[1]["speedup_vs_first"] == pytest.approx(slide[1]["images_per_s"] / slide[0]["images_per_s"])
    assert slide[0]["windows_per_s"] / slide[0]["images_per_s"] == pytest.approx(6)  # 336x448: 2 x 3 windows


@pytest.mark.slow  # compiles the toy once (tens of seconds)
def test_bench_compile_times_eager_and_compiled_rows_in_one_run(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "toy", "--images", "2", "--device", "cpu", "--precision", "fp32",
                 "--setting", "whole image 336", "--compile", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["compiled"] for r in rows] == [False, True] and all(r["images_per_s"] > 0 for r in rows)
    assert rows[1]["warmup_s"] > rows[0]["warmup_s"]  # the compiling happens in the untimed warm-up call


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("bf16", 3e-2)])
@pytest.mark.parametrize("mode,size", [("slide", (37, 53)), ("slide", (70, 131)), ("whole", (70, 131))])
def test_gpu_batched_windows_equal_a_per_window_loop(mode, size, precision, tolerance, tokenizer):
    seg = Segmenter(tiny_clip("vit"), tokenizer, templates="plain", mean=(0.5,) * 3, std=(0.25,) * 3, device="cuda",
                    mode=mode, short_side=None, window=64, stride=40, batch_size=3, precision=precision)
    rng = np.random.default_rng(0)
    images = [(rng.random((*size, 3)) * 255).astype(np.uint8), (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)]
    classes = ["cat", "road", "sky, cloud"]
    for image, result in zip(images, seg.predict_batch(images, classes)):
        torch.testing.assert_close(result.logits, per_window_logits(seg, image, classes), rtol=0, atol=tolerance)


@CUDA
def test_gpu_confusion_matrix_equals_the_cpu_one():
    from vocaseg.evaluation import ConfusionMatrix

    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.integers(-1, 23, (300, 400)))
    target = torch.from_numpy(np.where(rng.random((300, 400)) < 0.1, 255, rng.integers(0, 21, (300, 400))))
    cpu, gpu = ConfusionMatrix(21), ConfusionMatrix(21, device="cuda")
    cpu.update(pred, target)
    gpu.update(pred.cuda(), target.cuda())
    assert torch.equal(cpu.matrix, gpu.matrix.cpu()) and cpu.matrix.sum() == (target != 255).sum()


def test_spliced_prompt_tokens_equal_the_tokenizer():
    import open_clip

    from vocaseg.vocabulary import DEFAULT_TEMPLATES, tokenize_prompts

    tok = open_clip.get_tokenizer("ViT-B-16")
    names = ["cat", "tv monitor", "t-shirt", "potted plant", "café", "rock'n'roll", "AT&amp;T", "a.b.", "x2", "9",
             "Traffic Light", "x" * 300]  # the last one is cut at the context length
    templates = list(DEFAULT_TEMPLATES) + ["{}s", "{}'s photo", "({})", "{}-like", "1{}2", "{}"]
    want = tok([t.format(n) for n in names for t in templates])
    assert torch.equal(tokenize_prompts(tok, templates, names), want)


def test_text_tower_run_to_the_longest_prompt_equals_encode_text(vit_model, tokenizer):
    from vocaseg.backbone import CLIPBackbone

    tokens = tokenizer(["a cat", "a photo of a very large striped cat."])
    got = CLIPBackbone(vit_model).encode_text(tokens)
    with torch.no_grad():
        want = torch.nn.functional.normalize(vit_model.encode_text(tokens).float(), dim=-1)
    assert tokens.argmax(-1).max() + 1 < tokens.shape[1]  # the short path was taken
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sdpa_block_equals_open_clips_block():
    import open_clip

    from vocaseg.backbone import _plain_block, run_block

    torch.manual_seed(0)
    for batch_first in (True, False):
        block = open_clip.transformer.ResidualAttentionBlock(64, 4, batch_first=batch_first).eval()
        assert _plain_block(block)
        x = torch.randn(3, 50, 64)
        with torch.no_grad():
            want = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            torch.testing.assert_close(run_block(block, x, batch_first), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", [None, 0.4])
def test_labels_of_a_batch_equal_one_by_one(threshold):
    from vocaseg.inference import label_batch, upsample_and_label

    logits = torch.randn(3, 5, 9, 13) * 0.05
    got = label_batch(logits, (31, 40), 40.0, threshold, 0)
    for one, labels in zip(logits, got):
        want, _ = upsample_and_label(one, (31, 40), 40.0, threshold, 0)
        assert (labels == want).float().mean() > 0.999  # interpolate vs grid_sample: ties may round apart
    assert label_batch(logits, (31, 40), 40.0, threshold, 0, max_elements=100) is None  # huge: the lazy path
