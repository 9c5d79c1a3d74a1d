"""Contrastive image-text pretraining of an open_clip model on the synthetic world.

This is how the shipped toy CLIP is made (see README, "The toy CLIP"): the model is any open_clip
architecture built from its config, the loss is open_clip's ``ClipLoss``, the data is an endless,
deterministic stream of synthetic scenes and captions, the loop the shared trainer's
(``training/loop.py``): batch ``s`` always holds train scenes ``[s*B, (s+1)*B)``, so a resumed run
sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from ..backbone import input_size
from ..data.pairs import SynthCaptions
from ..data.synth import SynthScenes
from ..loading import _local_dir, load_clip
from .loop import Recipe, TrainerConfig, distributed_context, train


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
    overwrite: bool = False
    progress: bool = True
    eval_scenes: int = 500  # synth val scenes for the final retrieval accuracy
    twins: bool = True  # batches of scene pairs that differ only in their shapes (see README)


class _PairDataset(torch.utils.data.Dataset):
    """(pixels, tokens) pairs. With ``twins``, item 2k+1 is scene k with other shapes (a hard negative)."""

    def __init__(self, scenes: SynthScenes, tokenizer, mean, std, twins: bool = False):
        self.scenes, self.tokenizer = scenes, tokenizer
        self.pairs = SynthCaptions(scenes.split, scenes.seed, scenes.size, len(scenes), twins=twins)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        image, caption = self.pairs.pair(i)
        pixels = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
        return (pixels - self.mean) / self.std, self.tokenizer([caption])[0]


def clip_param_groups(model: torch.nn.Module) -> list[dict]:
    """No weight decay on gains, biases, embeddings and the temperature (as open_clip's trainer does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


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


class ClipPretrainRecipe(Recipe):
    """Contrastive image-text training of an open_clip model from scratch on synth train scenes."""

    method = "clip"

    def __init__(self, cfg: ClipPretrainConfig):
        self.cfg = cfg

    def build(self) -> torch.nn.Module:
        self.loaded = load_clip(self.cfg.model, pretrained=None, device="cpu")
        if self.cfg.image_size is None:
            self.cfg.image_size = input_size(self.loaded.model.visual)
        rank, world = distributed_context()
        # under torchrun every process scores its images against the texts of the whole global batch
        self.loss_fn = ClipLoss(gather_with_grad=world > 1, rank=rank, world_size=world)
        return self.loaded.model

    def param_groups(self, module):
        return clip_param_groups(module)

    def dataset(self):
        return _PairDataset(SynthScenes("train", seed=self.cfg.seed, size=self.cfg.image_size), self.loaded.tokenizer,
                            self.loaded.mean, self.loaded.std, twins=self.cfg.twins)

    def training_step(self, module, batch, step):
        images, tokens = batch
        image_features, text_features, logit_scale = module(images, tokens)
        return self.loss_fn(image_features, text_features, logit_scale), {}

    def after_step(self, module, step):
        with torch.no_grad():  # as in CLIP: the temperature may not exceed 100
            module.logit_scale.clamp_(0, math.log(100))

    def evaluate(self, module):
        if not self.cfg.eval_scenes:
            return {}
        return retrieval_accuracy(module, self.loaded.tokenizer, self.loaded.mean, self.loaded.std,
                                  n=self.cfg.eval_scenes, image_size=self.cfg.image_size,
                                  device=str(next(module.parameters()).device))

    def export(self, module, out, summary):
        weights = export_weights(module, self.cfg.model, self.loaded.mean, self.loaded.std, out)
        info = {"config": asdict(self.cfg), "steps_done": summary["steps"],
                "train_seconds_this_run": summary["train_seconds_this_run"],
                "final_loss": summary["final"].get("loss"), "val_retrieval": summary["eval"], "weights": str(weights)}
        (out / "train_info.json").write_text(json.dumps(info, indent=2))
        metrics = summary["eval"]
        if metrics:
            print(f"val retrieval ({self.cfg.eval_scenes} scenes): image->text top-1 "
                  f"{metrics['image_to_text_top1']:.1f}%, text->image top-1 {metrics['text_to_image_top1']:.1f}%")
        print(f"weights: {weights}")


def train_clip(cfg: ClipPretrainConfig) -> dict:
    """Train (or resume) a CLIP on the synthetic world with the shared trainer; returns its summary."""
    trainer = TrainerConfig(
        out=cfg.out, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adamw", betas=(0.9, 0.98),
        eps=1e-6, weight_decay=cfg.weight_decay, schedule="cosine", warmup_steps=cfg.warmup_steps, clip_grad=1.0,
        precision=cfg.precision, device=cfg.device, seed=cfg.seed, workers=cfg.workers,
        checkpoint_every=cfg.checkpoint_every, resume=cfg.resume, overwrite=cfg.overwrite, progress=cfg.progress)
    return train(ClipPretrainRecipe(cfg), trainer, config_record=asdict(cfg))
