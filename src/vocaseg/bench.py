"""``vocaseg bench``: steady-state inference speed and peak memory, with random weights (no download).

Two settings: the SCLIP protocol (short side 336, 224 windows every 112 px, 21 classes) and whole-
image inference at the same size. Images are random 500x375 arrays (the size of a VOC photo), handed
to the segmenter ``images_per_call`` at a time. Text embeddings are computed before timing (as in
any real evaluation) and a warm-up call runs first, so the numbers are the steady state. Every
requested precision and batch size is timed in the same run, so their ratios are free of
machine-to-machine noise. ``baseline`` also times the way the official
SCLIP / MaskCLIP code runs: one window at a time through a Python loop (fp16 on a GPU, fp32 on the
CPU), with the same model, images and protocol (:func:`per_window_logits`).
"""

from __future__ import annotations

import itertools
import json
import platform
import resource
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SETTINGS = {
    "sclip slide 336/224/112": dict(mode="slide", short_side=336, window=224, stride=112),
    "whole image 336": dict(mode="whole", short_side=336),
}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def per_window_logits(seg, array: np.ndarray, classes) -> torch.Tensor:
    """The straightforward computation the fast path must equal: resize, then every window on its own
    (padded to the window with the model's pad colour), its scores upsampled and summed into a canvas,
    divided by the per-pixel window count. Returns (C, h, w) at the resized size. Whole mode: one
    window, the image padded to the model's stride."""
    from .inference import window_starts

    cfg, model = seg.config, seg.model
    vocab = seg.vocabulary(classes)
    classifier = seg.classifier(vocab)
    base_short, win, stride = seg._geometry()
    image = seg._prepare(array, base_short)
    h, w = image.shape[-2:]
    if cfg.mode == "whole":
        step = model.stride
        windows, size = [(0, 0)], (-(-h // step) * step, -(-w // step) * step)
    else:
        windows = [(y, x) for y in window_starts(h, win, stride) for x in window_starts(w, win, stride)]
        size = (win, win)
    canvas = torch.zeros(len(vocab), h, w, device=seg.device)
    count = torch.zeros(1, h, w, device=seg.device)
    pad = torch.tensor(model.pad_value, device=seg.device).view(3, 1, 1)
    for y, x in windows:
        crop = image[:, y:y + size[0], x:x + size[1]]
        ch, cw = crop.shape[-2:]
        window = pad.expand(3, *size).clone()
        window[:, :ch, :cw] = crop
        with seg._autocast():
            scores = model.logits(window[None], classifier)
        scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)[0]
        canvas[:, y:y + ch, x:x + cw] += scores[:, :ch, :cw]
        count[:, y:y + ch, x:x + cw] += 1
    return canvas / count


def _versions() -> dict:
    import open_clip

    from . import __version__

    return {"vocaseg": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def _cpu_name() -> str:
    """The CPU's model and the vector instructions torch uses on it: int8 and fp32 speeds depend on both
    (the same 2-core machine type has been an AVX2 host, an AVX-512 host and an AMX host on different days)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    # the matrix instructions that decide int8 and bf16 speed (AMX tiles, VNNI dot products, bf16 FMAs)
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    extra = [label for key, label in (("amx_int8", "AMX-INT8"), ("amx_bf16", "AMX-BF16"), ("avx512_vnni", "AVX512-VNNI"),
                                      ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX512-BF16")) if caps.get(key)]
    return ", ".join([name, torch.backends.cpu.get_cpu_capability(), *extra])


def _row_text(row: dict) -> str:
    return (f"  {row['setting']:<26} {row['precision']:<5} {row.get('window_batch', ''):>5} {row['images_per_s']:9.2f} "
            f"images/s {row['windows_per_s']:10.1f} windows/s   peak memory {row.get('peak_memory_mb', 0):8.0f} MB"
            + ("   compiled" if row.get("compiled") else ""))


def time_text(seg, classes: int = 171, templates: str = "maskclip85") -> dict:
    """Cold text embeddings for ``classes`` new names x the template set: tokenising, the text tower,
    template averaging (as a new vocabulary costs at evaluation start)."""
    from .vocabulary import resolve_templates

    other = seg.with_options()
    other.templates = resolve_templates(templates)
    other.encode_text([f"warm-up {i}" for i in range(8)])  # kernels, allocator
    names = [f"class number {i}" for i in range(classes)]
    _sync(seg.device)
    t0 = time.perf_counter()
    other.encode_text(names)
    _sync(seg.device)
    dt = time.perf_counter() - t0
    return {"setting": f"text {classes} classes x {len(other.templates)} templates", "seconds": dt,
            "prompts_per_s": classes * len(other.templates) / dt}


def write_folder_dataset(root, count: int, size=(375, 500), classes: int = 21, seed: int = 0) -> None:
    """``count`` JPEG photos (smooth colour fields plus grain, so they compress like photos, not
    noise) with label PNGs and a class file: the layout ``vocaseg eval --dataset folder`` reads."""
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(classes)))
    todo = [i for i in range(count) if not (root / "labels" / f"{i:05d}.png").is_file()]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_one, [(root, i, size, classes, seed) for i in todo], chunksize=32))


def _write_one(job) -> None:
    from PIL import Image

    root, i, (h, w), classes, seed = job
    rng = np.random.default_rng((seed, i))
    coarse = rng.random((6, 8, 3)) * 255
    image = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    label = rng.integers(0, classes, (6, 8)).astype(np.uint8)
    label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    label = np.where(rng.random((h, w)) < 0.02, 255, label).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"{i:05d}.jpg", quality=90)
    Image.fromarray(label).save(root / "labels" / f"{i:05d}.png")


def time_eval(seg, root, workers: int, batch_images: int, load_batches: Sequence[int] = (8,)) -> list[dict]:
    """``vocaseg eval`` over a folder dataset, and reading the data alone (the loader's workers
    decoding JPEGs and PNGs, nothing else), once per loader batch size; each end-to-end row carries
    the main process's seconds per stage (``timings``), which say where the time goes."""
    from .data.datasets import build_dataset
    from .evaluation import _collate, _Shard, evaluate

    dataset = build_dataset("folder", root)
    n = len(dataset)
    rows = []
    evaluate(seg, _Subset(dataset, batch_images), workers=0, batch_images=batch_images, progress=False)  # warm-up
    for load_batch in load_batches:
        loader = torch.utils.data.DataLoader(_Shard(dataset, list(range(n))), batch_size=load_batch,
                                             num_workers=workers, collate_fn=_collate)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        dt = time.perf_counter() - t0
        rows.append({"setting": f"eval: data only ({workers} workers, {load_batch} images a loader batch)",
                     "images_per_s": n / dt, "seconds": dt})
        timings: dict = {}
        _sync(seg.device)
        t0 = time.perf_counter()
        result = evaluate(seg, dataset, workers=workers, batch_images=batch_images, progress=False,
                          load_batch=load_batch, timings=timings)
        _sync(seg.device)
        dt = time.perf_counter() - t0
        rows.append({"setting": f"eval: end to end ({workers} workers, {load_batch} images a loader batch, "
                                f"{batch_images} a model call)",
                     "images_per_s": n / dt, "seconds": dt, "mIoU": result["mIoU"],
                     "timings": {k: round(v, 4) for k, v in timings.items()}})
    return rows


class _Subset:
    def __init__(self, dataset, count):
        self.dataset, self.count = dataset, count
        self.vocabulary, self.classes, self.name = dataset.vocabulary, dataset.classes, dataset.name

    def __len__(self):
        return min(self.count, len(self.dataset))

    def __getitem__(self, i):
        return self.dataset[i]


def run_bench(model: str = "ViT-B-16", device: str = "cpu", images: int | None = None,
              batch_sizes: tuple[int | None, ...] = (None,), precisions: tuple[str, ...] = ("auto",),
              threads: int | None = None, baseline: bool = False, json_path: str | None = None,
              settings: tuple[str, ...] | None = None, images_per_call: int = 64, text: bool = False,
              eval_images: int = 0, eval_dir: str | None = None, workers: int = 8, batch_images: int = 64,
              load_batches: Sequence[int] = (8,), compile_modes: Sequence[bool] = (False,)) -> dict:
    from . import Segmenter

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    images = images or (512 if dev.type == "cuda" else 8)
    seg = Segmenter.from_pretrained(model, pretrained=None, device=device, templates="photo")
    classes = [f"class {i}" for i in range(21)]
    vocab = seg.vocabulary(classes)
    rng = np.random.default_rng(0)
    batch = [(rng.random((375, 500, 3)) * 255).astype(np.uint8) for _ in range(images)]
    hardware = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    report = {"model": f"{model} (random weights)", "device": str(dev), "hardware": hardware,
              "threads": torch.get_num_threads(), "images": images, "image_size": [375, 500], "classes": 21,
              "images_per_call": images_per_call, "versions": _versions(), "rows": []}
    print(f"model {model} (random weights), device {dev} ({hardware}), threads {torch.get_num_threads()}, "
          f"{images} images of 500x375, 21 classes, {images_per_call} images a call; steady state after a warm-up call")
    print(f"  {'setting':<26} {'prec':<5} {'batch':>5}")
    for name, opts in SETTINGS.items():
        if settings and name not in settings:
            continue
        first = None
        for batch_size, precision, compiled in itertools.product(batch_sizes, precisions, compile_modes):
            s = seg.with_options(precision=precision, batch_size=batch_size, compile=compiled, **opts)
            t0 = time.perf_counter()
            for r in s.segment_arrays(batch[:images_per_call], vocab):  # warm-up: kernels, text, int8, compiling
                r.labels_tensor()
            warmup = time.perf_counter() - t0
            _sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            for start in range(0, images, images_per_call):
                for r in s.segment_arrays(batch[start:start + images_per_call], vocab):
                    r.labels_tensor()
            _sync(dev)
            dt = time.perf_counter() - t0
            windows = s._windows_per_image((375, 500)) * images
            row = {"setting": name, "precision": precision, "window_batch": s._batch_size(),
                   "path": "batched", "compiled": compiled,
                   "images_per_s": images / dt, "windows_per_s": windows / dt,
                   "peak_memory_mb": _peak_memory_mb(dev), "warmup_s": warmup}
            if precision == "int8":
                from .quantize import int8_engine

                row["int8_engine"] = int8_engine()
            first = first or row
            row["speedup_vs_first"] = row["images_per_s"] / first["images_per_s"]
            report["rows"].append(row)
            print(_row_text(row) + (f"   x{row['speedup_vs_first']:.2f} vs the first row" if row is not first else ""))
        if baseline:
            precision = "fp16" if dev.type == "cuda" else "fp32"
            s = seg.with_options(precision=precision, **opts)
            per_window_logits(s, batch[0], classes)  # warm-up
            n = min(images, 64)
            _sync(dev)
            t0 = time.perf_counter()
            for array in batch[:n]:  # then, as mmseg: scores resized to the image, argmax
                logits = per_window_logits(s, array, classes)[None]
                F.interpolate(logits, size=array.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0)
            _sync(dev)
            dt = time.perf_counter() - t0
            row = {"setting": name, "precision": precision, "window_batch": 1,
                   "path": "per-window loop (official code's way)", "images_per_s": n / dt,
                   "windows_per_s": s._windows_per_image((375, 500)) * n / dt, "images": n}
            best = max(r["images_per_s"] for r in report["rows"] if r["setting"] == name and r["path"] == "batched")
            row["batched_speedup"] = best / row["images_per_s"]
            report["rows"].append(row)
            print(_row_text(row) + f"   per-window loop (baseline, {n} images); best batched row x{row['batched_speedup']:.2f}")
    if text:
        row = time_text(seg)
        report["rows"].append(row)
        print(f"  {row['setting']}: {row['seconds']:.3f} s ({row['prompts_per_s']:.0f} prompts/s)")
    if eval_images:
        import shutil
        import tempfile

        root = eval_dir or tempfile.mkdtemp(prefix="vocaseg-bench-")  # a temporary one is removed afterwards
        try:
            t0 = time.perf_counter()
            write_folder_dataset(root, eval_images)
            print(f"  folder dataset of {eval_images} JPEGs in {root} ({time.perf_counter() - t0:.1f} s to write)")
            s = seg.with_options(precision=precisions[0], batch_size=batch_sizes[0],
                                 **SETTINGS["sclip slide 336/224/112"])
            for row in time_eval(s, root, workers, batch_images, load_batches):
                report["rows"].append(row)
                print(f"  {row['setting']:<60} {row['images_per_s']:9.2f} images/s ({row['seconds']:.1f} s)")
                if "timings" in row:
                    print("      main process: " + ", ".join(f"{k} {v:.2f} s" for k, v in row["timings"].items()))
        finally:
            if eval_dir is None:
                shutil.rmtree(root, ignore_errors=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {json_path}")
    return report
