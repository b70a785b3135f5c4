"""`model.chat_template_kwargs` reaches every chat the library renders (issue #10, defect 3: thinking stayed on).

The tiny model's tokenizer gets a Qwen3-like template that reads `enable_thinking`: with it false, the assistant
header is followed by an empty think block, as Qwen3's template writes it.
"""

from __future__ import annotations

import random
import shutil

import pytest

from sdpo.config import RepromptConfig
from sdpo.envs.base import Problem
from sdpo.hydra_config import load_config
from sdpo.models import load_tokenizer, render_chat
from sdpo.rollout.base import Completion
from sdpo.teacher import build_reprompts, teacher_prompt_ids

from conftest import TINY_OVERRIDES

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
NO_THINKING = {"enable_thinking": False}
EMPTY_THINK = "<think>\n\n</think>"
CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def thinking_model(tiny_path, tmp_path_factory):
    """A copy of the tiny checkpoint whose chat template reads enable_thinking."""
    path = tmp_path_factory.mktemp("thinking-tiny")
    shutil.copytree(tiny_path, path, dirs_exist_ok=True)
    tokenizer = load_tokenizer(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def test_render_chat_passes_the_template_variables(thinking_model):
    tokenizer = load_tokenizer(thinking_model)
    assert EMPTY_THINK not in tokenizer.decode(render_chat(tokenizer, CHAT))
    assert tokenizer.decode(render_chat(tokenizer, CHAT, NO_THINKING)).endswith(f"assistant\n{EMPTY_THINK}\n\n")


def test_teacher_reprompts_are_rendered_with_them(thinking_model):
    tokenizer = load_tokenizer(thinking_model)
    config = RepromptConfig(max_reprompt_len=64)  # short: the truncating re-renders must keep the flag too
    problems = [Problem(id="q", messages=CHAT, data={})] * 2
    reprompts = build_reprompts(problems, ["wrong " * 50, "5 " * 80], [0.0, 1.0], ["", ""], [0, 0], config,
                                random.Random(0))
    ids = teacher_prompt_ids(reprompts, [[1, 2]] * 2, tokenizer, config, NO_THINKING)
    text = tokenizer.decode(ids[0])
    assert "Correctly solve the original question." in text and text.endswith(f"{EMPTY_THINK}\n\n")
    assert EMPTY_THINK not in tokenizer.decode(teacher_prompt_ids(reprompts, [[1, 2]] * 2, tokenizer, config)[0])


class RecordingEngine:
    """Records the prompts it is asked to complete; answers with an empty response."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def generate(self, prompts, sampling):
        self.prompts += [list(p) for p in prompts]
        return [Completion(i, [], "", False) for i, _ in enumerate(prompts) for _ in range(sampling.n)]

    def sync_weights(self, model, version=None):
        from sdpo.rollout.base import SyncStats

        return SyncStats()

    def close(self) -> None:
        pass


def test_rollout_and_eval_prompts_are_rendered_with_them(thinking_model, tmp_path):
    from sdpo.evaluation import evaluate_checkpoint
    from sdpo.trainer import SDPOTrainer

    overrides = [*TINY_OVERRIDES, f"model.name_or_path={thinking_model}", "+model.chat_template_kwargs.enable_thinking=false",
                 "eval.num_questions=2", "eval.samples_per_question=1", f"trainer.output_dir={tmp_path}"]
    config = load_config(overrides)
    trainer = SDPOTrainer(config, engine=RecordingEngine())
    tokenizer = trainer.tokenizer
    assert trainer.train_problems and all(
        tokenizer.decode(ids).endswith(f"{EMPTY_THINK}\n\n") for ids in map(trainer.collector.prompt_ids, trainer.train_problems))
    engine = RecordingEngine()
    evaluate_checkpoint(load_config(overrides), engine=engine)
    assert len(engine.prompts) == 2 and all(tokenizer.decode(p).endswith(f"{EMPTY_THINK}\n\n") for p in engine.prompts)
