"""The pre-flight probe (sdpo/probe.py) on a scripted case: known rollouts on the convention task, the tiny model's
log-probs checked against a float64 brute-force forward, and the echo check."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdpo.config import RepromptConfig
from sdpo.envs.convention import ConventionEnv, ConventionEnvConfig
from sdpo.models import load_tokenizer, render_chat
from sdpo.probe import ProbeResult, echoes, format_verdict, probe, response_logprobs, verdict
from sdpo.rollout import SamplingSettings
from sdpo.teacher import Reprompt, group_reprompts, teacher_prompt_ids
from sdpo.testing import ScriptedEngine


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32), load_tokenizer(tiny_path)


def brute_force_logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) from one unpadded float64 forward."""
    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logits = model64(torch.tensor([prompt + response])).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_response_logprobs_match_a_float64_forward(tiny):
    model, tokenizer = tiny
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    responses = [[20, 21, 22], [30, 31, 32, 33, 34]]
    got = response_logprobs(model, prompts, responses, tokenizer.pad_token_id, temperature=1.0)
    for g, p, r in zip(got, prompts, responses):
        assert g.shape == (len(r),)
        torch.testing.assert_close(g.double(), brute_force_logp(model, p, r), atol=1e-4, rtol=1e-4)


def test_probe_on_scripted_rollouts(tiny):
    model, tokenizer = tiny
    env = ConventionEnv(ConventionEnvConfig(convention="answer_prefix"))
    problems = env.load("train")[:2]
    answer_of = {p.question: p.data["answer"] for p in problems}
    prompts = {p.question: render_chat(tokenizer, p.messages) for p in problems}

    def respond(prompt, index):
        text = tokenizer.decode(list(prompt))
        question = re.search(r"What is \d \* \d\?", text).group(0)
        n = answer_of[question]
        if "feedback from your" in text:  # the teacher's context: it follows the convention the feedback states
            reply = f"Answer: {n}"
        elif question == problems[0].question and index == 0:
            reply = f"Answer: {n}"  # the one student success
        else:
            reply = f"{n + index}"  # the right number (sample 0) or not, never in the convention
        return tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id]

    engine = ScriptedEngine(tokenizer, respond)
    config = RepromptConfig()
    sampling = SamplingSettings(n=4, temperature=1.0, max_new_tokens=16)
    result = probe(env, problems, lambda p: prompts[p.question], engine, model, tokenizer, sampling, config,
                   seed_key="k")

    assert result.questions == 2 and result.rollouts == 8
    assert result.student_success_sampled == pytest.approx(1 / 8)
    assert result.student_success_greedy == pytest.approx(1 / 2)  # greedy = sample 0: question 0 right, 1 not
    assert result.success_group_fraction == pytest.approx(1 / 2)
    # Every failure has the format feedback; the lone success has neither a sibling success nor feedback.
    assert result.signal_fraction == pytest.approx(7 / 8)
    assert result.feedback_fraction == pytest.approx(7 / 8)
    assert result.teacher_success_sampled == 1.0 and result.teacher_success_greedy == 1.0
    assert result.echo_fraction == 0.0

    # The log-prob measures, recomputed by brute force on the same teacher context.
    rows = [(q, i) for q, p in enumerate(problems) for i in range(4)]
    texts = [tokenizer.decode(respond(prompts[problems[q].question], i), skip_special_tokens=True) for q, i in rows]
    responses = [respond(prompts[problems[q].question], i) for q, i in rows]
    scores = [env.score(problems[q], t) for (q, _), t in zip(rows, texts)]
    reprompts = group_reprompts("k", config, [problems[q] for q, _ in rows], texts, [s.reward for s in scores],
                                [s.feedback for s in scores], [q for q, _ in rows])
    teacher_prompts = teacher_prompt_ids(reprompts, [prompts[problems[q].question] for q, _ in rows], tokenizer, config)
    failed = [k for k, s in enumerate(scores) if s.reward < 1.0]
    assert len(failed) == 7
    diffs = torch.cat([brute_force_logp(model, teacher_prompts[k], responses[k])
                       - brute_force_logp(model, prompts[problems[rows[k][0]].question], responses[k]) for k in failed])
    assert result.gap_per_token == pytest.approx(float(diffs.mean()), abs=1e-4)
    assert result.gap_abs_per_token == pytest.approx(float(diffs.abs().mean()), abs=1e-4)
    reference = lambda k: tokenizer.encode(env.reference_response(problems[rows[k][0]]), add_special_tokens=False) + [tokenizer.eos_token_id]  # noqa: E731
    teacher = [float(brute_force_logp(model, teacher_prompts[k], reference(k)).sum()) for k in failed]
    student = [float(brute_force_logp(model, prompts[problems[rows[k][0]].question], reference(k)).sum()) for k in failed]
    assert result.logp_correct_teacher == pytest.approx(sum(teacher) / 7, abs=1e-3)
    assert result.logp_correct_student == pytest.approx(sum(student) / 7, abs=1e-3)
    assert result.logp_uplift == pytest.approx(result.logp_correct_teacher - result.logp_correct_student)

    # The examples are the first failed rollouts as text, with what the teacher wrote from their reprompts.
    assert len(result.examples) == 4
    for example, k in zip(result.examples, failed):
        assert example["response"] == texts[k] and example["reward"] == 0.0
        assert example["reprompt"] == tokenizer.decode(teacher_prompts[k]) and "feedback from your" in example["reprompt"]
        n = answer_of[problems[rows[k][0]].question]
        assert example["teacher"] == f"Answer: {n}" and example["teacher_reward"] == 1.0
    assert result.as_dict()["examples"] == result.examples

    table = format_verdict(result)
    assert "groups with a success" in table and "verdict" in table
    # The scripted teacher succeeds and one group in two has a success: neither reading of little GRPO signal.
    assert "compare SDPO with GRPO" in table if result.logp_uplift >= 1.0 else "does not make correct answers" in table


def test_probe_without_any_signal_says_sdpo_is_inactive(tiny):
    model, tokenizer = tiny
    env = ConventionEnv(ConventionEnvConfig(feedback=False))  # a scalar-only grader
    problems = env.load("train")[:2]
    engine = ScriptedEngine(tokenizer, lambda prompt, i: tokenizer.encode("no idea", add_special_tokens=False) + [tokenizer.eos_token_id])
    result = probe(env, problems, lambda p: render_chat(tokenizer, p.messages), engine, model, tokenizer,
                   SamplingSettings(n=2, max_new_tokens=8), RepromptConfig())
    assert result.student_success_sampled == 0.0 and result.signal_fraction == 0.0 and result.feedback_fraction == 0.0
    assert math.isnan(result.teacher_success_sampled) and math.isnan(result.gap_per_token)
    assert "SDPO has nothing to learn from" in format_verdict(result)


def test_echo_detection():
    config = RepromptConfig()
    env = ConventionEnv(ConventionEnvConfig(convention="answer_prefix"))
    problem = env.load("train")[0]
    feedback = env.score(problem, "12").feedback
    reprompt = Reprompt(problem, None, feedback)
    assert echoes("Correctly solve the original question. Answer: 3", reprompt, config)  # a template phrase
    assert echoes("the grader reads only a response that is nice", reprompt, config)  # 6+ words of the feedback
    assert not echoes(f"Answer: {problem.data['answer']}", reprompt, config)
    # Words the question itself contains are no echo, even when the demonstration repeats them.
    demo = Reprompt(problem, f"{problem.question} It is what it is, truly.", None)
    assert not echoes(f"{problem.question} Fine.", demo, config)
    assert echoes("It is what it is, truly.", demo, config)


def _result(**fields) -> ProbeResult:
    base = dict(questions=8, rollouts=32, student_success_sampled=0.0, student_success_greedy=0.0,
                success_group_fraction=0.0, signal_fraction=1.0, feedback_fraction=1.0, teacher_success_sampled=0.0,
                teacher_success_greedy=0.0, logp_correct_student=-14.0, logp_correct_teacher=-9.0, gap_per_token=-0.4,
                gap_abs_per_token=0.6, echo_fraction=0.0)
    return ProbeResult(**(base | fields))


@pytest.mark.parametrize("fields, reading", [
    ({"signal_fraction": 0.0}, "nothing to learn from"),
    ({"logp_correct_teacher": -13.5}, "does not make correct answers much likelier"),
    ({}, "the reprompted teacher rarely succeeds where the student fails"),
    # A teacher that succeeds now and then, barely more than the student (the CPU negatives): still "rarely".
    ({"teacher_success_sampled": 0.06, "student_success_sampled": 0.03, "teacher_success_greedy": 0.12,
      "student_success_greedy": 0.25}, "the reprompted teacher rarely succeeds where the student fails"),
    ({"teacher_success_sampled": 0.3}, "the feedback case SDPO is for"),
    ({"teacher_success_greedy": 0.5, "student_success_greedy": 0.25}, "the feedback case SDPO is for"),
    ({"success_group_fraction": 0.8, "teacher_success_sampled": 0.5}, "both have signal"),
])
def test_verdict_readings(fields, reading):
    rows = verdict(_result(**fields))
    assert rows[-1][0] == "verdict" and reading in rows[-1][2]


def test_echo_risk_is_flagged():
    rows = dict((name, reading) for name, _, reading in verdict(_result(echo_fraction=0.5)))
    assert rows["echo rate of reprompted generations"] == "echo risk"
