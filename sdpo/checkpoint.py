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
Under FSDP2 the weights, optimizer state and EMA teacher are gathered into whole tensors before they are written
(every rank takes part), so a checkpoint looks the same whatever wrote it and resumes on any number of processes.
Under DeepSpeed the weights and EMA teacher are gathered the same way (so `scripts/eval.py` and vLLM read the
checkpoint like any other), and DeepSpeed's own checkpoint in `deepspeed/` holds each rank's partition of the fp32
master weights and optimizer state: the run resumes from it on the same number of processes.
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

from sdpo.interrupt import signals_deferred
from sdpo.sharding import is_fsdp2, is_sharded, load_full_state_dict

COMPLETE = "COMPLETE"
PREFIX = "step-"
STATE_FILE = "trainer_state.pt"
# Test seam (tests/test_resume.py): a save of this step stops before its COMPLETE marker, announces itself with a
# PAUSED file in the staging directory and waits (until the test writes CONTINUE there), so that a test can signal
# or kill the process in the middle of a save.
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


def checkpoint_name(step: int, name: str | None = None) -> str:
    """`step-000123`, or a fixed `name` (`best`: sdpo/guards.py) that `keep_last` rotation and resume never touch."""
    return name or f"{PREFIX}{step:06d}"


def staging_dir(root: Path, step: int, name: str | None = None) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place (the same path on every rank)."""
    return root / f".tmp-{checkpoint_name(step, name)}"


def start(root: Path, step: int, name: str | None = None) -> Path:
    """Main process: an empty staging directory (a leftover of a killed save is discarded)."""
    staging = staging_dir(root, step, name)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def write_rank_state(staging: Path, rank: int, state: dict[str, Any]) -> None:
    torch.save(state, staging / f"rank-{rank}.pt")


def read_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
    file = path / f"rank-{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=False) if file.exists() else None


def optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state; under FSDP2 gathered like `full_state_dict` (keyed by parameter names)."""
    if not is_fsdp2(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not is_fsdp2(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


def save_deepspeed_state(engine: Any, staging: Path) -> None:
    """DeepSpeed: every rank writes its partitions of the fp32 master weights and optimizer state (a collective)."""
    engine.save_checkpoint(str(staging / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)


def load_deepspeed_state(engine: Any, path: Path) -> None:
    """DeepSpeed: the policy's weights and optimizer state from `save_deepspeed_state` (a collective)."""
    if not (path / DEEPSPEED_DIR / DEEPSPEED_TAG).is_dir():
        raise RuntimeError(f"checkpoint {path} has no DeepSpeed state ({DEEPSPEED_DIR}/): it was not written under "
                           "DeepSpeed; resume it with the launcher that wrote it")
    loaded, _ = engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DEEPSPEED_DIR}")


def save_model(model: torch.nn.Module, tokenizer: Any, staging: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Full weights, or for a LoRA policy the trained adapter only (the EMA adapter lives in the trainer state).

    `state_dict`: the weights gathered by `full_state_dict` when the model is sharded.
    """
    kwargs: dict[str, Any] = {}
    if hasattr(model, "peft_config"):
        kwargs["selected_adapters"] = [model.active_adapter]
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    model.save_pretrained(staging, **kwargs)
    tokenizer.save_pretrained(staging)


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load what `save_model` wrote into a model of the same architecture (and the same LoRA setup)."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = load_file(path / "adapter_model.safetensors")
        if is_sharded(model):
            # PEFT's loader copies into the parameters directly, which FSDP2 shards refuse: name the tensors the
            # way the model does (the adapter's name inserted) and load them as whole tensors into the shards.
            name = f".{model.active_adapter}."
            renamed = {k: adapter[k.replace(name, ".")] for k in model.state_dict() if name in k and k.replace(name, ".") in adapter}
            if len(renamed) != len(adapter):
                raise RuntimeError(f"checkpoint {path} does not match the adapter: {len(adapter)} tensors saved, "
                                   f"{len(renamed)} found in the model")
            load_full_state_dict(model, renamed, strict=False)
            return
        result = set_peft_model_state_dict(model, adapter, adapter_name=model.active_adapter)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {path} does not match the adapter: unexpected {result.unexpected_keys[:5]}")
        return
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights |= load_file(file)
    if not weights:
        raise RuntimeError(f"checkpoint {path} holds no model weights (*.safetensors); was it written by a LoRA run?")
    missing, unexpected = load_full_state_dict(model, weights, strict=False)
    # Tied output heads are not stored separately.
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def finish(root: Path, staging: Path, step: int, state: dict[str, Any], keep_last: int, name: str | None = None) -> Path:
    """Main process, after every rank wrote its part: trainer state, marker, rename, prune old checkpoints."""
    torch.save(state, staging / STATE_FILE)
    if os.environ.get(PAUSE_ENV) == str(step):
        (staging / "PAUSED").touch()
        deadline = time.monotonic() + 3600
        while not (staging / "CONTINUE").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for seam in ("PAUSED", "CONTINUE"):
            (staging / seam).unlink(missing_ok=True)
    (staging / COMPLETE).write_text(str(step))
    final = root / checkpoint_name(step, name)
    with signals_deferred():  # a first or second Ctrl-C never falls between the two renames
        if final.exists():  # a re-save (a better `best`): the old copy goes once the new one is whole
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old)
        else:
            staging.rename(final)
    if keep_last > 0:
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
