"""Precision chosen from the machine (sdpo/precision.py): bf16 only where it runs natively, explicit values win."""

from __future__ import annotations

import logging
import math
import sys

from omegaconf import OmegaConf
import pytest
import torch

from sdpo.config import SDPOConfig
from sdpo.hydra_config import load_config
from sdpo.precision import Capabilities, allowed_cores, probe, resolve_precision, use_all_cores

from conftest import TINY_OVERRIDES

AVX2 = Capabilities("cpu", bf16=False, isa="AVX2")
AMX = Capabilities("cpu", bf16=True, isa="AVX512")
OLD_GPU = Capabilities("cuda", bf16=False, isa="Tesla V100")
NEW_GPU = Capabilities("cuda", bf16=True, isa="NVIDIA H100")


def vllm_config(**model) -> SDPOConfig:
    config = SDPOConfig()
    config.rollout.engine = "vllm"
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def test_auto_is_the_default_and_resolves_to_float32_without_native_bf16():
    assert SDPOConfig().model.autocast_dtype == "auto" and SDPOConfig().rollout.vllm.dtype == "auto"
    for caps in (AVX2, OLD_GPU):
        config = vllm_config()
        assert resolve_precision(config, caps) == []
        assert config.model.autocast_dtype == "none"  # float32 master weights, no autocast
        assert config.rollout.vllm.dtype == "float32"  # the engine runs what the trainer runs


def test_auto_resolves_to_bf16_where_it_is_native():
    for caps in (AMX, NEW_GPU):
        config = vllm_config()
        assert resolve_precision(config, caps) == []
        assert config.model.autocast_dtype == "bfloat16" and config.rollout.vllm.dtype == "bfloat16"


def test_explicit_values_win_and_emulated_bf16_warns_how_much_slower(caplog):
    config = vllm_config(autocast_dtype="bfloat16")
    config.rollout.vllm.dtype = "bfloat16"
    with caplog.at_level(logging.WARNING, logger="sdpo.precision"):
        warnings = resolve_precision(config, AVX2)
    assert config.model.autocast_dtype == "bfloat16" and config.rollout.vllm.dtype == "bfloat16"
    assert len(warnings) == 2 and all("~50x slower than float32 on AVX2-only CPUs" in w for w in warnings)
    assert "model.autocast_dtype=bfloat16" in warnings[0] and "rollout.vllm.dtype=bfloat16" in warnings[1]
    assert caplog.records and "50x slower" in caplog.records[0].getMessage()
    # Native bf16, or float32 forced on any machine: no warning.
    assert resolve_precision(vllm_config(autocast_dtype="bfloat16"), AMX) == []
    forced = vllm_config(autocast_dtype="none")
    assert resolve_precision(forced, AMX) == [] and forced.rollout.vllm.dtype == "float32"


def test_an_engine_dtype_auto_follows_an_explicit_trainer_dtype():
    config = vllm_config(autocast_dtype="float16")
    resolve_precision(config, NEW_GPU)
    assert config.rollout.vllm.dtype == "float16"


def test_a_wrong_dtype_names_the_allowed_ones():
    with pytest.raises(Exception, match="auto"):
        load_config(["rollout.vllm.dtype=bf16"])


def test_the_probe_reports_this_machine():
    caps = probe()
    assert caps.device in ("cpu", "cuda") and isinstance(caps.bf16, bool) and caps.isa
    if caps.device == "cpu":
        assert caps.bf16 == (torch.ops.mkldnn._is_mkldnn_bf16_supported() or torch.cpu._is_avx512_bf16_supported()
                             or torch.cpu._is_amx_tile_supported())


def test_use_all_cores_bypasses_a_disabled_set_num_threads(monkeypatch):
    # What vLLM's CPU worker does to the process: torch.set_num_threads becomes a no-op.
    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    try:
        torch._C.set_num_threads(1)
        assert use_all_cores() == allowed_cores() == torch.get_num_threads()
    finally:
        torch._C.set_num_threads(before)


@pytest.mark.parametrize("autocast, expected", [("bfloat16", torch.bfloat16), ("none", None)])
def test_one_real_training_step_in_each_precision(tmp_path, autocast, expected):
    from sdpo.trainer import SDPOTrainer

    config = load_config([*TINY_OVERRIDES, f"model.autocast_dtype={autocast}", f"trainer.output_dir={tmp_path}"])
    trainer = SDPOTrainer(config)
    assert trainer.learner.autocast_dtype == expected
    assert trainer.threads == allowed_cores() == torch.get_num_threads()
    metrics = trainer.train()
    assert math.isfinite(metrics["policy/entropy"]) and math.isfinite(metrics["optim/grad_norm"])
    assert metrics["optim/skipped_steps"] == 0.0
    assert OmegaConf.load(tmp_path / "config.yaml").model.autocast_dtype == autocast


def test_auto_is_saved_resolved_in_the_run_config(tmp_path):
    from sdpo.trainer import SDPOTrainer

    config = load_config([*TINY_OVERRIDES, "model.autocast_dtype=auto", f"trainer.output_dir={tmp_path}"])
    SDPOTrainer(config)
    saved = OmegaConf.load(tmp_path / "config.yaml").model.autocast_dtype
    assert saved == ("bfloat16" if probe().bf16 else "none")


def run_python(code: str, env: dict[str, str]) -> str:
    """stdout of `python -c code` in a fresh process whose THP_MEM_ALLOC_ENABLE is only what `env` says."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, check=True).stdout


@pytest.mark.parametrize("code, env, expected", [
    ("import sdpo, torch", {}, "1"),  # sdpo first: torch's allocator backs large tensors with huge pages
    ("import torch, sdpo", {}, "None"),  # torch first: it has read the variable already, so sdpo leaves it alone
    ("import sdpo, torch", {"THP_MEM_ALLOC_ENABLE": "0"}, "0"),  # the user's choice wins
])
def test_huge_pages_for_large_cpu_tensors_only_before_torch(code, env, expected):
    out = run_python(f"{code}; import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))", env)
    assert out.strip() == expected


@pytest.mark.slow
def test_huge_pages_cut_the_page_faults_of_large_tensors():
    """torch honours the variable: 20 fresh 64 MB tensors fault in 2 MB pages instead of 4 KB ones."""
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[madvise]" not in thp.read_text():  # never: none; always: huge pages either way
        pytest.skip("the kernel gives transparent huge pages on request only in madvise mode")
    code = ("import sdpo, resource, torch\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20):\n"
            "    torch.ones(16 * 2**20)\n"  # 64 MB, freed at once: a fresh mapping each time
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    faults = {value: int(run_python(code, {"THP_MEM_ALLOC_ENABLE": value})) for value in ("0", "1")}
    assert faults["0"] > 20 * 16_000  # 16384 pages of 4 KB per tensor
    assert faults["1"] < faults["0"] / 4, faults


FAULTS_OF_REPEATED_STEPS = """
import resource, torch
from sdpo.precision import keep_freed_memory
keep_freed_memory()  # the trainer's call; SDPO_KEEP_FREED_MEMORY=0 opts out

def step():  # large tensors of a few sizes, freed at the step's end, as a training step's are
    tensors = [torch.ones(n) for n in (16 * 2**20, 4 * 2**20, 8 * 2**20)]
    return sum(float(t[0]) for t in tensors)

faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[5:]))  # a step's page faults once the heap has grown to a step's size
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.slow
def test_freed_memory_is_kept_for_the_next_step():
    # The trainer calls keep_freed_memory: once the heap has grown to a step's size, a step's large tensors reuse
    # the memory the previous step freed instead of faulting in fresh pages (measured: 0 faults per step against
    # 24578 of 4 KB pages with glibc's defaults, huge pages off so that the count is per 4 KB page).
    def faults(keep: str) -> int:
        return int(run_python(FAULTS_OF_REPEATED_STEPS, {"THP_MEM_ALLOC_ENABLE": "0", "SDPO_KEEP_FREED_MEMORY": keep}))

    default = faults("0")
    assert default > 10_000
    assert faults("1") < default / 20
