"""Test setup: offline, no wandb, in-process vLLM; shared tiny-model fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# A run that fits a test: 2 questions x 4 rollouts, 8 new tokens, tiny model, fp32.
TINY_OVERRIDES = [
    "model=tiny",
    "algorithm=sdpo",  # pure SDPO unless a test says otherwise (the CPU default run is the hybrid); later wins
    "rollout=hf",  # the transformers engine unless a test says otherwise (the default run uses vLLM)
    "rollout.vllm.enforce_eager=true",  # no compile start-up where a test does take vLLM
    "rollout.num_generations=4",
    "rollout.max_new_tokens=8",
    "trainer.total_steps=1",
    "trainer.questions_per_step=2",
    "trainer.mini_batch_questions=2",
    "trainer.micro_batch_size=8",
    "trainer.optim.warmup_steps=0",
    "trainer.optim.lr=1e-3",
    "eval.every=0",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="session")
def tiny_path():
    from sdpo.config import ModelConfig
    from sdpo.models import resolve_checkpoint

    return resolve_checkpoint(ModelConfig(name_or_path="tiny"))


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from sdpo.models import load_tokenizer

    return load_tokenizer(tiny_path)
