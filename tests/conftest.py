import os
import signal
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_clip(kind: str = "vit", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A small random open_clip CLIP (fast on CPU) with a ViT or a ModifiedResNet image tower."""
    torch.manual_seed(seed)
    if kind == "vit":
        vision = dict(image_size=64, patch_size=16, width=64, layers=layers, head_width=16)
    else:
        vision = dict(image_size=64, layers=(1, 1, 1, 1), width=16, head_width=16)
    text = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()
    # random init leaves some parameters at zero/one; perturb so that every path matters in checks
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return open_clip.get_tokenizer("", context_length=16)


@pytest.fixture(scope="session")
def vit_model():
    return tiny_clip("vit")


@pytest.fixture(scope="session")
def resnet_model():
    return tiny_clip("resnet")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real samples are only in the development checkout)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VOCASEG_CACHE", str(tmp_path / "cache"))


def saved_step(run: Path) -> int:
    """The step of the run's state.pt (0 while none is written)."""
    try:
        return torch.load(run / "state.pt", map_location="cpu", weights_only=False)["step"]
    except Exception:  # not written yet, or being replaced
        return 0


_KILL_AFTER_SAVE = """
import os, signal, sys
import vocaseg.training.loop as loop
from vocaseg.cli import main

save = loop.save_checkpoint
def save_then_die(path, state):
    save(path, state)
    if state["step"] >= {step}:
        os.kill(os.getpid(), signal.SIGKILL)
loop.save_checkpoint = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def sigkill_after_step(argv: list[str], out: Path, step: int = 2, timeout: float = 300) -> int:
    """Run ``vocaseg *argv --out out`` in a subprocess that SIGKILLs itself right after its checkpoint of
    ``step`` is written (deterministic: polling from outside raced a fast run under load and could see it
    finish first); returns the step the checkpoint holds then."""
    done = subprocess.run([sys.executable, "-c", _KILL_AFTER_SAVE.format(step=step), *argv, "--out", str(out)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    assert done.returncode == -signal.SIGKILL, f"expected a SIGKILL at step {step}: {done.stderr[-2000:]}"
    return saved_step(out)


def assert_sigkill_resume_is_exact(argv: list[str], tmp_path: Path) -> None:
    """``vocaseg *argv`` (a ``train METHOD`` command of more than 2 steps that checkpoints every step) run
    straight, and again SIGKILLed mid-run then resumed with ``--resume``: the final weights are identical."""
    from safetensors.torch import load_file

    from vocaseg.cli import main

    assert main(argv + ["--out", str(tmp_path / "straight")]) == 0
    killed = tmp_path / "killed"
    assert sigkill_after_step(argv, killed) == 2 and not (killed / "weights.safetensors").exists()
    assert main(argv[:2] + ["--out", str(killed), "--resume"]) == 0
    a, b = load_file(str(tmp_path / "straight" / "weights.safetensors")), load_file(str(killed / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def torchrun_cli(argv: list[str], out: Path, processes: int = 2, timeout: float = 600) -> None:
    """Run ``vocaseg *argv --out out`` under ``torchrun`` with ``processes`` CPU processes; fails the test
    with the end of their stderr when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "vocaseg.cli", *argv, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
