"""Contrastive image-text pretraining of an open_clip model on the synthetic world.

This is how the shipped toy CLIP is made (see README, "The toy CLIP"): the model is any open_clip
architecture built from its config, the loss is open_clip's ``ClipLoss``, the data is an endless,
deterministic stream of synthetic scenes and captions. Batch ``s`` always holds train scenes
``[s*B, (s+1)*B)``, so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from tqdm import tqdm

from ..backbone import input_size
from ..data.synth import SynthScenes, make_scene
from ..loading import _local_dir, load_clip
from .checkpoint import load_checkpoint, restore_training_state, save_checkpoint, training_state


@dataclass
class ClipPretrainConfig:
    out: str
    model: str = "toy"
    steps: int = 2400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    image_size: int | None = None  # scene size; None: the model's input size
    seed: int = 0
    workers: int = 1
    checkpoint_every: int = 100
    device: str = "cpu"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    resume: bool = False
    eval_scenes: int = 500  # synth val scenes for the final retrieval accuracy
    twins: bool = True  # batches of scene pairs that differ only in their shapes (see README)


class _PairDataset(torch.utils.data.Dataset):
    """(pixels, tokens) pairs. With ``twins``, item 2k+1 is scene k with other shapes (a hard negative)."""

    def __init__(self, scenes: SynthScenes, tokenizer, mean, std, twins: bool = False):
        self.scenes, self.tokenizer, self.twins = scenes, tokenizer, twins
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        if self.twins:
            s = self.scenes
            scene = make_scene(i // 2, s.split, s.seed, s.size, twin=i % 2)
        else:
            scene = self.scenes[i]
        pixels = torch.from_numpy(scene.image).permute(2, 0, 1).float().div_(255)
        return (pixels - self.mean) / self.std, self.tokenizer([scene.caption])[0]


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # no decay on gains, biases, embeddings and the temperature (as open_clip's trainer does)
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, mean, std, split: str = "val", n: int = 500,
                       image_size: int = 128, device: str = "cpu", batch_size: int = 100) -> dict[str, float]:
    """Top-1 image->text and text->image retrieval among ``n`` synth scenes of ``split`` (percent)."""
    data = _PairDataset(SynthScenes(split, size=image_size, length=n), tokenizer, mean, std)
    img_feats, txt_feats = [], []
    model.eval()
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([x[0] for x in items]).to(device)
        tokens = torch.stack([x[1] for x in items]).to(device)
        img_feats.append(torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1))
        txt_feats.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    sim = torch.cat(img_feats) @ torch.cat(txt_feats).T
    target = torch.arange(n, device=sim.device)
    return {
        "image_to_text_top1": 100.0 * (sim.argmax(1) == target).float().mean().item(),
        "text_to_image_top1": 100.0 * (sim.argmax(0) == target).float().mean().item(),
    }


def export_weights(model: torch.nn.Module, model_name: str, mean, std, out_dir: Path) -> Path:
    """Write ``open_clip_model.safetensors`` (fp16) + ``open_clip_config.json``.

    The folder is then a model of its own: ``--model DIR`` here, ``local-dir:DIR`` in open_clip.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    path = out_dir / "open_clip_model.safetensors"
    save_file(state, str(path))
    local = _local_dir(model_name)
    if local is not None:
        if local.resolve() != out_dir.resolve():
            shutil.copy(local / "open_clip_config.json", out_dir / "open_clip_config.json")
    else:
        config = {"model_cfg": open_clip.get_model_config(model_name),
                  "preprocess_cfg": {"mean": list(mean), "std": list(std)}}
        (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return path


def train_clip(cfg: ClipPretrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not cfg.resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    loaded = load_clip(cfg.model, pretrained=None, device=cfg.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.image_size is None:
        cfg.image_size = input_size(model.visual)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(cfg.warmup_steps, cfg.steps))
    start = 0
    if cfg.resume and ckpt_path.exists():
        start = restore_training_state(load_checkpoint(ckpt_path, cfg.device), model, optimizer, scheduler)
        print(f"resumed from {ckpt_path} at step {start}")

    use_cuda = str(cfg.device).startswith("cuda")
    amp = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
    data = _PairDataset(SynthScenes("train", seed=cfg.seed, size=cfg.image_size), tokenizer, loaded.mean, loaded.std,
                        twins=cfg.twins)
    order = range(start * cfg.batch_size, cfg.steps * cfg.batch_size)
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0, pin_memory=use_cuda)
    loss_fn = ClipLoss()

    model.train()
    t0 = time.time()
    bar = tqdm(loader, total=cfg.steps, initial=start, desc="train clip", unit="step", dynamic_ncols=True)
    step = start
    for images, tokens in bar:
        images, tokens = images.to(cfg.device, non_blocking=True), tokens.to(cfg.device, non_blocking=True)
        with torch.autocast(device_type="cuda" if use_cuda else "cpu", dtype=torch.bfloat16, enabled=amp):
            image_features, text_features, logit_scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # as in CLIP: the temperature may not exceed 100
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt_path, training_state(model, optimizer, scheduler, step, config=asdict(cfg)))
    bar.close()

    metrics = retrieval_accuracy(model, tokenizer, loaded.mean, loaded.std, n=cfg.eval_scenes,
                                 image_size=cfg.image_size, device=cfg.device)
    weights = export_weights(model, cfg.model, loaded.mean, loaded.std, out)
    info = {"config": asdict(cfg), "steps_done": step, "train_seconds_this_run": round(time.time() - t0, 1),
            "final_loss": float(loss.item()) if step > start else None, "val_retrieval": metrics,
            "weights": str(weights)}
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    print(f"val retrieval ({cfg.eval_scenes} scenes): image->text top-1 {metrics['image_to_text_top1']:.1f}%, "
          f"text->image top-1 {metrics['text_to_image_top1']:.1f}%")
    print(f"weights: {weights}")
    return info
