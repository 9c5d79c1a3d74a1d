"""The one trainer every recipe uses: CLIP pretraining, MaskCLIP+, and the methods after it.

A method describes its training as a :class:`Recipe` (what to build, what one step's loss is, how
to export the result); :func:`train` does everything else the same way for all of them:

- AMP (bf16 autocast on CUDA), gradient accumulation, gradient clipping;
- parameter groups with their own lr multiplier and weight decay; SGD or AdamW;
- schedules: ``poly`` (mmseg's, with a floor), ``cosine``, ``constant``, each with linear warm-up;
- atomic checkpoints (``state.pt``) every N steps and on SIGTERM / SIGINT, and ``resume`` that
  continues bit-exactly on CPU: weights, optimizer, schedule, step, RNG states and data position.
  The data position needs no state of its own: step ``s`` always reads items
  ``[s * B, (s + 1) * B)`` of the recipe's dataset, an indexable, deterministic stream whose items
  draw their randomness from their index;
- ``torchrun`` DDP (gloo on CPU, nccl on CUDA): every process takes its slice of each global
  batch, BatchNorm statistics are computed over the global batch (SyncBatchNorm on CUDA,
  :class:`GlobalBatchNorm2d` on CPU, where torch's SyncBatchNorm does not run);
- a progress bar (loss, lr, it/s), ``log.jsonl`` (one JSON object per logged step or evaluation),
  periodic evaluation on a held-out split that is recorded and never used to pick the weights (the
  final weights are the last step's), and ``curves.png`` at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


@dataclass
class TrainerConfig:
    """How to optimise; what to optimise is the recipe's. ``batch_size`` is the global batch of one
    optimizer step (over all processes and accumulation micro-steps)."""

    out: str
    steps: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw
    weight_decay: float = 0.0
    schedule: str = "poly"  # poly | cosine | constant
    poly_power: float = 0.9
    min_lr: float = 0.0  # poly: lr = (lr - min_lr) * (1 - s/N)^p + min_lr (mmseg)
    warmup_steps: int = 0
    accumulate: int = 1
    clip_grad: float | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16; fp64 for numerical checks
    device: str = "cpu"
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 500
    eval_every: int = 0  # 0: evaluate only at the end
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, not {self.optimizer!r}")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise ValueError(f"schedule must be poly, cosine or constant, not {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp64"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp64, not {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1 or self.accumulate < 1:
            raise ValueError("steps, batch size and accumulation must be at least 1")
        self.betas = tuple(self.betas)


@dataclass(kw_only=True)
class RunFields:
    """The fields every method's config shares: held-out evaluation, seeds, device, checkpoints, resume,
    and the preset and command line that started the run (kept on --resume)."""

    eval_split: str = "val"
    eval_images: int = 100  # periodic and final held-out eval (recorded only); 0: none
    eval_every: int = 0
    synth_seed: int = 0  # the synthetic world's seed (train and eval scenes)
    device: str = "cpu"
    precision: str = "auto"
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    preset: str | None = None
    command: str | None = None


class Recipe:
    """A method's training side. Subclasses set ``method`` and implement the methods that raise.

    ``build()`` returns one module holding everything trained (and the buffers that must be
    checkpointed); frozen helpers such as a CLIP teacher live on the recipe, not in that module.
    """

    method: str = ""

    def build(self) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, module: nn.Module) -> list[dict]:
        """Groups of parameters; a group may carry ``lr_mult`` and ``weight_decay``."""
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]

    def dataset(self) -> torch.utils.data.Dataset:
        """An indexable stream: item ``i`` must depend only on ``i`` (and the recipe's seed)."""
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        return torch.utils.data.default_collate(items)

    def training_step(self, module: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch at optimizer step ``step`` (1-based), and numbers to log.

        Call ``module(...)`` itself, not its children: under DDP that forward is what syncs gradients.
        Randomness may come from the global torch RNG (it is checkpointed)."""
        raise NotImplementedError

    def after_step(self, module: nn.Module, step: int) -> None:
        """Called after each optimizer step (e.g. to clamp a temperature)."""

    def evaluate(self, module: nn.Module) -> dict:
        """Held-out numbers for the log (recorded only; never used to choose weights)."""
        return {}

    def export(self, module: nn.Module, out: Path, summary: dict) -> None:
        """Write the run folder's method.json and weights from the final module."""
        raise NotImplementedError


class SegDatasetRecipe(Recipe):
    """A recipe that trains on a segmentation dataset named by its config (``dataset``, ``data_root``,
    ``synth_seed``, ``split_set``, the run fields) and evaluates on its ``eval_split``. Subclasses set
    ``self.clip`` (a Segmenter on the CLIP's text side) and ``self.vocab``, and give
    ``inference_options(data)``; ``eval_model(module)`` is what the Segmenter runs."""

    def _dataset(self, split: str, length: int | None = None):
        from ..data.datasets import build_dataset

        cfg = self.cfg
        options = {"length": length, "seed": cfg.synth_seed} if cfg.dataset == "synth" else {"length": length}
        return build_dataset(cfg.dataset, cfg.data_root, split, **options)

    def _zero_shot_split(self) -> None:
        """``self.split`` (None without ``split_set``) and the (C,) bool ``self.seen`` / ``self.unseen``
        over ``self.vocab`` (without a split every class is seen)."""
        from ..evaluation import get_split

        cfg, n = self.cfg, len(self.vocab)
        self.split = get_split(cfg.split_set, cfg.dataset) if cfg.split_set else None
        if self.split is not None:
            seen, unseen = self.split.masks(self.vocab.names)
            self.seen, self.unseen = torch.tensor(seen), torch.tensor(unseen)
        else:
            self.seen, self.unseen = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)

    def inference_options(self, data=None) -> dict:
        raise NotImplementedError

    def eval_model(self, module: nn.Module) -> nn.Module:
        return unwrap(module)

    def evaluate(self, module: nn.Module) -> dict:
        """mIoU and aAcc (and mIoU(S), mIoU(U), hIoU with a split) on the first ``eval_images`` of the
        eval split; an eval split that is missing is reported and skipped."""
        from ..data.datasets import DatasetError
        from ..evaluation import evaluate

        cfg = self.cfg
        if not cfg.eval_images:
            return {}
        try:
            data = self._dataset(cfg.eval_split, length=cfg.eval_images)
        except DatasetError as err:
            print(f"no held-out evaluation: {err}")
            return {}
        seg = self.clip.with_model(self.eval_model(module), **self.inference_options(data))
        result = evaluate(seg, data, getattr(self, "split", None), workers=0, batch_images=16, progress=False)
        keep = ("mIoU", "aAcc", "mIoU_seen", "mIoU_unseen", "hIoU")
        return {f"{cfg.eval_split}_{k}": round(result[k], 2) for k in keep if k in result} | {
            f"{cfg.eval_split}_images": result["num_images"]}


# ---------------------------------------------------------------------------- schedules
def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Multiplier of the base lr at 0-based optimizer step ``step``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "poly":
        floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        return (1 - floor) * (1 - t) ** cfg.poly_power + floor
    return 1.0


# ---------------------------------------------------------------------------- distributed
def distributed_context() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("VOCASEG_DDP_BACKEND") != "gloo" else "gloo"
            dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch of all processes (CPU DDP).

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces the per-channel sums with autograd
    (``torch.distributed.nn``), so gradients flow through the shared statistics as in SyncBatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        with warnings.catch_warnings():  # its replacement in torch._functional_collectives has no autograd yet
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce

            count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype)
            sums = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
            n = sums[-1]
            mean = sums[:-1] / n
            # two passes (sum of squared deviations), as precise as BatchNorm on one process
            var = all_reduce((x - mean[None, :, None, None]).pow(2).sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d) and type(child) is nn.BatchNorm2d:
                child.__class__ = cls
            else:
                cls.convert(child)
        return module


def _sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return GlobalBatchNorm2d.convert(module)


# ---------------------------------------------------------------------------- data
def item_seed(*keys: int | str) -> int:
    """A 63-bit seed from ints and strings, the same in every process and on every machine
    (Python's ``hash`` of a string is salted per process, so it cannot serve)."""
    words = [k if isinstance(k, int) else int.from_bytes(k.encode()[:8].ljust(8, b"\0"), "little") for k in keys]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _StepSampler(torch.utils.data.Sampler):
    """Indices of this process's share of every micro-batch from step ``start`` to ``steps``."""

    def __init__(self, start: int, steps: int, batch: int, accumulate: int, rank: int, world: int):
        self.start, self.steps, self.batch, self.accumulate = start, steps, batch, accumulate
        self.rank, self.world = rank, world
        self.micro = batch // (accumulate * world)

    def __iter__(self) -> Iterator[int]:
        for s in range(self.start, self.steps):
            for a in range(self.accumulate):
                first = s * self.batch + (a * self.world + self.rank) * self.micro
                yield from range(first, first + self.micro)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accumulate * self.micro


# ---------------------------------------------------------------------------- run folder guards
def prepare_out_dir(out: Path, method: str, resume: bool, overwrite: bool) -> None:
    """Never lose a user's run: refuse to start over an existing run unless told, refuse to resume
    a run of another method."""
    state, info = out / STATE_FILE, out / "method.json"
    if resume:
        if not state.is_file():
            raise FileNotFoundError(f"nothing to resume in {out}: no {STATE_FILE} (start without --resume)")
        saved = torch.load(state, map_location="cpu", weights_only=False).get("method")
        if saved != method:
            raise ValueError(f"{out} holds a {saved!r} run; it cannot be resumed as {method!r}")
        return
    if out.exists() and any(out.iterdir()) and (state.is_file() or info.is_file()):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, --overwrite to "
                                  "replace it, or choose another --out")
        for name in (STATE_FILE, LOG_FILE, "method.json", "weights.safetensors", "curves.png", "eval.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------- the loop
@dataclass
class _Stop:
    signal: int | None = None
    handlers: dict = field(default_factory=dict)

    def install(self):
        def handler(signum, frame):
            self.signal = signum
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def restore(self):
        for sig, old in self.handlers.items():
            signal.signal(sig, old)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def poly_config(cfg, optimizer: str = "sgd") -> TrainerConfig:
    """The trainer settings of a method config with the usual fields (out, steps, lr, weight_decay,
    poly_power, min_lr, the run fields; ``momentum`` for SGD, ``warmup`` steps if it has them):
    mmseg's poly schedule under SGD with momentum (the DeepLab recipes) or AdamW (the transformer ones)."""
    return TrainerConfig(
        out=cfg.out, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=optimizer,
        momentum=getattr(cfg, "momentum", 0.9), weight_decay=cfg.weight_decay, schedule="poly",
        poly_power=cfg.poly_power, min_lr=cfg.min_lr, warmup_steps=getattr(cfg, "warmup", 0),
        precision=cfg.precision, device=cfg.device, seed=cfg.seed, workers=cfg.workers,
        checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every, log_every=cfg.log_every,
        resume=cfg.resume, overwrite=cfg.overwrite, progress=cfg.progress)


def sgd_poly_config(cfg) -> TrainerConfig:
    return poly_config(cfg, "sgd")


def train(recipe: Recipe, cfg: TrainerConfig, config_record: dict | None = None) -> dict:
    """Run ``recipe`` under ``cfg``; returns a summary (also written into the run folder by the recipe)."""
    rank, world = distributed_context()
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.batch_size % (cfg.accumulate * world):
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by accumulation {cfg.accumulate} x "
                         f"{world} processes")
    out = Path(cfg.out)
    if rank == 0:
        prepare_out_dir(out, recipe.method, cfg.resume, cfg.overwrite)
    if world > 1:
        dist.barrier()

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    module = recipe.build().to(device)
    dtype = torch.float64 if cfg.precision == "fp64" else None
    if dtype is not None:  # slow; for checks that float32 rounding would blur (tests/test_training_reliability.py)
        module = module.to(dtype)
    if world > 1:
        module = _sync_batchnorm(module, device)
    groups = recipe.param_groups(module)
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_mult", 1.0)
        g.setdefault("weight_decay", cfg.weight_decay)
        g["initial_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    start = 0
    state_path = out / STATE_FILE
    if cfg.resume:
        state = load_checkpoint(state_path, "cpu")
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed {recipe.method} from {state_path} at step {start}")
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    use_amp = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    sampler = _StepSampler(start, cfg.steps, cfg.batch_size, cfg.accumulate, rank, world)
    # the loader's own generator: creating its iterator must not draw from the global RNG, which a
    # resumed run restores exactly as the uninterrupted run had it
    loader = torch.utils.data.DataLoader(
        recipe.dataset(), batch_size=sampler.micro, sampler=sampler, num_workers=cfg.workers,
        collate_fn=recipe.collate, persistent_workers=False, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed))

    def save(step: int) -> None:
        if rank == 0:
            save_checkpoint(state_path, {
                "method": recipe.method, "step": step, "model": unwrap(module).state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "trainer": asdict(cfg), "config": config_record or {}})

    log = open(out / LOG_FILE, "a") if rank == 0 else None

    def write_log(record: dict) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    stop = _Stop()
    stop.install()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {recipe.method}", unit="step", dynamic_ncols=True,
               disable=not cfg.progress or rank != 0)
    step, t_start, t_last, last_logs = start, time.time(), time.time(), {}
    batches = iter(loader)
    module.train()
    try:
        while step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            total, logs = 0.0, {}
            for a in range(cfg.accumulate):
                batch = next(batches)
                sync = a == cfg.accumulate - 1 or world == 1
                ctx = module.no_sync() if not sync else _null()
                with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, parts = recipe.training_step(module, _to(batch, device, dtype), step + 1)
                (loss / cfg.accumulate).backward()
                total += loss.item() / cfg.accumulate
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / cfg.accumulate
            if cfg.clip_grad:
                logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad))
            optimizer.step()
            scheduler.step()
            step += 1
            recipe.after_step(unwrap(module), step)
            last_logs = {"loss": total, **logs}
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.time()
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                write_log({"step": step, "lr": scheduler.get_last_lr()[0], **last_logs,
                           "steps_per_s": n / max(now - t_last, 1e-9)})
                t_last = now
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.signal is not None:
                save(step)
            if stop.signal is not None:
                raise KeyboardInterrupt
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and rank == 0:
                _evaluate(recipe, module, step, write_log)
    except KeyboardInterrupt:
        bar.close()
        if rank == 0:
            print(f"stopped at step {step}; the checkpoint {state_path} holds it: continue with --resume",
                  file=sys.stderr)
        raise
    finally:
        stop.restore()
    bar.close()
    train_seconds = time.time() - t_start
    summary = {"method": recipe.method, "steps": step, "resumed_from": start or None,
               "train_seconds_this_run": round(train_seconds, 1),
               "steps_per_s_this_run": round((step - start) / max(train_seconds, 1e-9), 3),
               "final": last_logs, "processes": world, "device": str(device), "trainer": asdict(cfg)}
    if rank == 0:
        summary["eval"] = _evaluate(recipe, module, step, write_log)
        log.close()
        recipe.export(unwrap(module), out, summary)
        if summary["eval"]:
            (out / "eval.json").write_text(json.dumps(summary["eval"], indent=2))
        plot_curves(out / LOG_FILE, out / "curves.png")
    if world > 1:
        dist.barrier()
    return summary


def _evaluate(recipe: Recipe, module: nn.Module, step: int, write_log) -> dict:
    inner = unwrap(module)
    was_training = inner.training
    inner.eval()
    with torch.no_grad():
        result = recipe.evaluate(inner)
    inner.train(was_training)
    if result:
        write_log({"step": step, "eval": result})
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _to(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device, dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device, dtype) for k, v in batch.items()}
    return batch


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(log_path: Path, out: Path) -> Path | None:
    """Loss (and every other logged number) against step, and eval numbers when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path) if Path(log_path).is_file() else []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    if not train:
        return None
    keys = [k for k in train[-1] if k not in ("step", "lr", "steps_per_s") and isinstance(train[-1][k], (int, float))]
    eval_keys = sorted({k for r in evals for k, v in r["eval"].items() if isinstance(v, (int, float))})
    panels = keys + (["eval"] if eval_keys else []) + ["lr"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3), squeeze=False)
    steps = [r["step"] for r in train]
    for ax, key in zip(axes[0], panels):
        if key == "eval":
            for k in eval_keys:
                ax.plot([r["step"] for r in evals if k in r["eval"]], [r["eval"][k] for r in evals if k in r["eval"]],
                        marker="o", label=k)
            ax.legend(fontsize=7)
            ax.set_title("held-out eval (recorded only)", fontsize=9)
        else:
            ax.plot(steps, [r.get(key, float("nan")) for r in train])
            ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
