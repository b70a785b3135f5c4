"""Checkpoints that survive a kill: written into a staging directory, then renamed into place.

A checkpoint directory `step-000123/` holds
- the policy: `save_pretrained` weights, or only the trained LoRA adapter (`adapter_model.safetensors`);
- the tokenizer;
- `trainer_state.pt`: optimizer, scheduler, EMA teacher, data position, step, world size;
- `rank-<r>.pt`: each process's RNG states (python, numpy, torch, CUDA), written by that process;
- `COMPLETE`, written last.
Resume picks the newest directory with the marker. A save killed at any point leaves only a `.tmp-step-*` staging
directory behind, which resume ignores and the next save of that step replaces; the previous checkpoint stays usable.
Multi-node runs need `trainer.output_dir` on a filesystem every node sees (each rank writes its own RNG file).
"""

from __future__ import annotations

import os
from pathlib import Path
import random
import shutil
import time
from typing import Any

import numpy as np
import torch

COMPLETE = "COMPLETE"
PREFIX = "step-"
STATE_FILE = "trainer_state.pt"
# Test seam (tests/test_resume.py): a save of this step stops before its COMPLETE marker, announces itself with a
# PAUSED file in the staging directory and sleeps, so that a test can kill the process in the middle of a save.
PAUSE_ENV = "SDPO_TEST_PAUSE_SAVE_AT_STEP"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def staging_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place (the same path on every rank)."""
    return root / f".tmp-{PREFIX}{step:06d}"


def start(root: Path, step: int) -> Path:
    """Main process: an empty staging directory (a leftover of a killed save is discarded)."""
    staging = staging_dir(root, step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def write_rank_state(staging: Path, rank: int, state: dict[str, Any]) -> None:
    torch.save(state, staging / f"rank-{rank}.pt")


def read_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
    file = path / f"rank-{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=False) if file.exists() else None


def save_model(model: torch.nn.Module, tokenizer: Any, staging: Path) -> None:
    """Full weights, or for a LoRA policy the trained adapter only (the EMA adapter lives in the trainer state)."""
    kwargs: dict[str, Any] = {}
    if hasattr(model, "peft_config"):
        kwargs["selected_adapters"] = [model.active_adapter]
    model.save_pretrained(staging, **kwargs)
    tokenizer.save_pretrained(staging)


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load what `save_model` wrote into a model of the same architecture (and the same LoRA setup)."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = load_file(path / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, adapter, adapter_name=model.active_adapter)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {path} does not match the adapter: unexpected {result.unexpected_keys[:5]}")
        return
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights |= load_file(file)
    if not weights:
        raise RuntimeError(f"checkpoint {path} holds no model weights (*.safetensors); was it written by a LoRA run?")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied output heads are not stored separately.
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def finish(root: Path, staging: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Main process, after every rank wrote its part: trainer state, marker, rename, prune old checkpoints."""
    torch.save(state, staging / STATE_FILE)
    if os.environ.get(PAUSE_ENV) == str(step):
        (staging / "PAUSED").touch()
        time.sleep(3600)
    (staging / COMPLETE).write_text(str(step))
    final = root / f"{PREFIX}{step:06d}"
    if final.exists():  # a re-save of the same step (a resumed run): the old copy goes only once the new one is whole
        shutil.rmtree(final)
    staging.rename(final)
    if keep_last > 0:
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
