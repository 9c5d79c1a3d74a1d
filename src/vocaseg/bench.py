"""``vocaseg bench``: steady-state inference speed and peak memory, with random weights (no download).

Two settings: the SCLIP protocol (short side 336, 224 windows every 112 px, 21 classes) and whole-
image inference at the same size. Images are random 500x375 arrays (the size of a VOC photo). Text
embeddings are computed before timing (as in any real evaluation) and one warm-up image runs
first, so the numbers are the steady state. Every requested precision is timed in the same run, so
their ratios are free of machine-to-machine noise. ``baseline`` also times the way the official
SCLIP / MaskCLIP code runs: one window at a time through a Python loop (fp16 on a GPU, fp32 on the
CPU), with the same model, images and protocol (:func:`per_window_logits`).
"""

from __future__ import annotations

import json
import platform
import resource
import time

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
    cfg, model = seg.config, seg.model
    vocab = seg.vocabulary(classes)
    classifier = seg.classifier(vocab)
    base_short = int(round(1.5 * model.image_size)) if cfg.short_side == 0 else cfg.short_side
    image = seg._prepare(array, base_short)
    h, w = image.shape[-2:]
    if cfg.mode == "whole":
        step = model.stride
        windows, size = [(0, 0)], (-(-h // step) * step, -(-w // step) * step)
    else:
        from .inference import window_starts

        win = cfg.window or model.image_size
        stride = cfg.stride or max(1, win // 2)
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


def _windows_per_image(seg, size=(375, 500)) -> int:
    from .inference import resize_short_side, window_starts

    cfg, model = seg.config, seg.model
    if cfg.mode == "whole":
        return 1
    h, w = resize_short_side(*size, cfg.short_side, cfg.max_long_side)
    win = cfg.window or model.image_size
    stride = cfg.stride or win // 2
    return len(window_starts(h, win, stride)) * len(window_starts(w, win, stride))


def _versions() -> dict:
    import open_clip

    from . import __version__

    return {"vocaseg": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def run_bench(model: str = "ViT-B-16", device: str = "cpu", images: int | None = None, batch_size: int = 16,
              precisions: tuple[str, ...] = ("auto",), threads: int | None = None, baseline: bool = False,
              json_path: str | None = None, settings: tuple[str, ...] | None = None) -> dict:
    from . import Segmenter

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    images = images or (512 if dev.type == "cuda" else 8)
    seg = Segmenter.from_pretrained(model, pretrained=None, device=device, templates="photo", batch_size=batch_size)
    classes = [f"class {i}" for i in range(21)]
    rng = np.random.default_rng(0)
    batch = [(rng.random((375, 500, 3)) * 255).astype(np.uint8) for _ in range(images)]
    hardware = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    report = {"model": f"{model} (random weights)", "device": str(dev), "hardware": hardware,
              "threads": torch.get_num_threads(), "images": images, "image_size": [375, 500], "classes": 21,
              "window_batch": batch_size, "versions": _versions(), "rows": []}
    print(f"model {model} (random weights), device {dev} ({hardware}), threads {torch.get_num_threads()}, "
          f"{images} images of 500x375, 21 classes, window batch {batch_size}; steady state after 1 warm-up image")
    for name, opts in SETTINGS.items():
        if settings and name not in settings:
            continue
        first = None
        for precision in precisions:
            s = seg.with_options(precision=precision, **opts)
            s.predict_batch(batch[:1], classes)[0].labels  # warm-up; fills the text cache, builds int8 copies
            _sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            for r in s.predict_batch(batch, classes):
                r.labels_tensor()
            _sync(dev)
            dt = time.perf_counter() - t0
            windows = _windows_per_image(s) * images
            row = {"setting": name, "precision": precision, "path": "batched", "images_per_s": images / dt,
                   "windows_per_s": windows / dt, "peak_memory_mb": _peak_memory_mb(dev)}
            first = first or row
            row["speedup_vs_" + first["precision"]] = row["images_per_s"] / first["images_per_s"]
            report["rows"].append(row)
            print(f"  {name:<26} {precision:<5} {row['images_per_s']:8.2f} images/s {row['windows_per_s']:9.1f} "
                  f"windows/s   peak memory {row['peak_memory_mb']:8.0f} MB"
                  + (f"   x{row['speedup_vs_' + first['precision']]:.2f} vs {first['precision']}"
                     if row is not first else ""))
        if baseline:
            precision = "fp16" if dev.type == "cuda" else "fp32"
            s = seg.with_options(precision=precision, **opts)
            per_window_logits(s, batch[0], classes)  # warm-up
            n = min(images, 64)
            _sync(dev)
            t0 = time.perf_counter()
            for array in batch[:n]:
                per_window_logits(s, array, classes).argmax(0)
            _sync(dev)
            dt = time.perf_counter() - t0
            row = {"setting": name, "precision": precision, "path": "per-window loop (official code's way)",
                   "images_per_s": n / dt, "windows_per_s": _windows_per_image(s) * n / dt, "images": n}
            report["rows"].append(row)
            print(f"  {name:<26} {precision:<5} {row['images_per_s']:8.2f} images/s {row['windows_per_s']:9.1f} "
                  f"windows/s   per-window loop (baseline, {n} images); batched path x"
                  f"{first['images_per_s'] / row['images_per_s']:.2f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {json_path}")
    return report
