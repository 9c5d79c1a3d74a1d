"""``vocaseg bench``: inference speed and peak memory, with random weights (no download needed).

Two settings: the SCLIP protocol (short side 336, 224 windows every 112 px, 21 classes) and whole-
image inference at the same size. Images are random 500x375 arrays (the size of a VOC photo). Text
embeddings are computed once before timing, as in any real evaluation.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def run_bench(model: str = "ViT-B-16", device: str = "cpu", images: int = 8, batch_size: int = 16,
              precision: str = "auto", threads: int | None = None) -> list[dict]:
    from . import Segmenter

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    seg = Segmenter.from_pretrained(model, pretrained=None, device=device, templates="photo",
                                    batch_size=batch_size, precision=precision)
    classes = [f"class {i}" for i in range(21)]
    rng = np.random.default_rng(0)
    batch = [(rng.random((375, 500, 3)) * 255).astype(np.uint8) for _ in range(images)]
    settings = {
        "sclip slide 336/224/112": dict(mode="slide", short_side=336, window=224, stride=112),
        "whole image 336": dict(mode="whole", short_side=336),
    }
    rows = []
    print(f"model {model} (random weights), device {dev}, precision {precision}, threads {torch.get_num_threads()}, "
          f"{images} images of 500x375, 21 classes, window batch {batch_size}")
    for name, opts in settings.items():
        s = seg.with_options(**opts)
        s.predict_batch(batch[:1], classes)[0].labels  # warm-up; fills the text cache
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        results = s.predict_batch(batch, classes)
        for r in results:
            r.labels_tensor()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        row = {"setting": name, "images_per_s": images / dt, "peak_memory_mb": _peak_memory_mb(dev)}
        rows.append(row)
        print(f"  {name:<26} {row['images_per_s']:8.2f} images/s   peak memory {row['peak_memory_mb']:8.0f} MB")
    return rows
