"""The registries are the one source of the names a config may choose: an entry registered from outside the library
(here, in this test module) is selectable from a config, without editing sdpo/, and takes a real step."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from pathlib import Path
import re

from conftest import TINY_OVERRIDES
import pytest
import torch
from toy_envs import ParityEnv, ParityEnvConfig

from sdpo import SDPOTrainer, load_config
from sdpo.config import ConfigError, DistillConfig, RolloutConfig, TeacherConfig
from sdpo.losses import DISTILL_MODES, DistillMode, sampled_token_distill
from sdpo.registry import Registry
from sdpo.rollout import ENGINES
from sdpo.teacher import TEACHER_KINDS
from sdpo.testing import ScriptedEngine

SRC = Path(__file__).resolve().parents[1] / "sdpo"


@contextlib.contextmanager
def registered(registry: Registry, name: str, entry: object) -> Iterator[None]:
    """`entry` under `name` for the block only, so that other tests see the built-in names."""
    registry.register(name)(entry)
    try:
        yield
    finally:
        registry._entries.pop(name)


def run_step(tmp_path: Path, *overrides: str) -> tuple[SDPOTrainer, dict[str, float]]:
    config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", *overrides])
    trainer = SDPOTrainer(config, env=ParityEnv(ParityEnvConfig()))
    return trainer, trainer.training_step().metrics


# A sampled-token mode at half the weight: the same rollouts give exactly half the built-in mode's loss.
HALF_SAMPLED_TOKEN = DistillMode(
    needs_logits=False, token_loss=lambda s_BR, q_BR, mask_BR, clip: 0.5 * sampled_token_distill(s_BR, q_BR, clip))


def test_a_distillation_mode_registered_outside_the_library_is_selected_by_the_config(tmp_path):
    with pytest.raises(ConfigError, match="algorithm.distill.mode='half_sampled_token' is not valid"):
        DistillConfig(mode="half_sampled_token", alpha=1.0)
    common = ("algorithm.distill.alpha=1.0", "algorithm.teacher.kind=live")
    _, builtin = run_step(tmp_path / "builtin", "algorithm.distill.mode=sampled_token", *common)
    with registered(DISTILL_MODES, "half_sampled_token", HALF_SAMPLED_TOKEN):
        DistillConfig(mode="half_sampled_token", alpha=1.0)
        with pytest.raises(ConfigError, match="supports only the reverse KL"):  # the mode's own declaration
            DistillConfig(mode="half_sampled_token", alpha=0.5)
        _, half = run_step(tmp_path / "half", "algorithm.distill.mode=half_sampled_token", *common)
    assert builtin["distill/loss"] != 0.0
    assert half["distill/loss"] == pytest.approx(0.5 * builtin["distill/loss"], rel=1e-6)
    assert half["distill/student_teacher_kl"] == builtin["distill/student_teacher_kl"]


def test_a_teacher_kind_registered_outside_the_library_is_selected_by_the_config(tmp_path):
    with pytest.raises(ConfigError, match="algorithm.teacher.kind='half_ema'"):
        TeacherConfig(kind="half_ema")
    with registered(TEACHER_KINDS, "half_ema", lambda config: [("ema", 0.5), ("live", 0.5)]):
        trainer, metrics = run_step(tmp_path, "algorithm.teacher.kind=half_ema", "algorithm.teacher.update_rate=0.5")
    teacher = trainer.learner.teacher
    assert teacher.model is not None  # the EMA source holds a copy of its own
    assert [weight for _, weight in teacher.sources] == [0.5, 0.5]
    assert torch.isfinite(torch.tensor(metrics["distill/loss"]))
    ema = list(teacher.model.parameters())
    assert any(not torch.equal(e, p) for e, p in zip(ema, trainer.learner.unwrapped.parameters()))  # moved halfway


class FixedEngine(ScriptedEngine):
    """An engine of one's own, built through the registry's default: (model_path, tokenizer, config, max_model_len)."""

    def __init__(self, model_path, tokenizer, config, max_model_len=None) -> None:
        super().__init__(tokenizer, salt="fixed")
        self.max_model_len = max_model_len


def test_an_engine_registered_outside_the_library_is_selected_by_the_config(tmp_path):
    with pytest.raises(ConfigError, match="rollout.engine='fixed' is not valid"):
        RolloutConfig(engine="fixed")
    with registered(ENGINES, "fixed", FixedEngine):
        with pytest.raises(ConfigError, match="needs rollout=vllm_server"):  # asked of the engine: not out of process
            RolloutConfig(engine="fixed", async_steps=1)
        trainer, metrics = run_step(tmp_path, "rollout.engine=fixed", "algorithm.teacher.kind=live")
    assert isinstance(trainer.engine, FixedEngine) and trainer.engine.calls == 1
    assert trainer.engine.max_model_len >= trainer.config.rollout.max_prompt_len + trainer.config.rollout.max_new_tokens
    assert metrics["response/length_mean"] > 0 and torch.isfinite(torch.tensor(metrics["distill/loss"]))


def test_the_config_holds_no_list_of_registered_names():
    """No `NAMES = [...]` list of choices in sdpo/config, and no engine compared by name outside sdpo/rollout/."""
    for path in (SRC / "config").glob("*.py"):
        lists = re.findall(r"^[A-Z_]+ = \[", path.read_text(), flags=re.MULTILINE)
        assert not lists, f"{path.name} keeps a list of names: {lists}"
    engine_names = re.compile(r"""engine\s*(==|!=|in)\s*[("'\[]""")
    for path in SRC.rglob("*.py"):
        if "rollout" not in path.relative_to(SRC).parts:
            hits = [line for line in path.read_text().splitlines() if engine_names.search(line)]
            assert not hits, f"{path.relative_to(SRC)} compares engine names: {hits}"


def test_a_misspelled_choice_names_the_closest_registered_one():
    with pytest.raises(ConfigError, match=r"allowed values: 'live', 'frozen', 'ema', 'trust_region', 'external'; did you mean 'ema'\?"):
        TeacherConfig(kind="emma")
    with pytest.raises(ConfigError, match=r"did you mean 'topk_logits'\?"):
        DistillConfig(mode="topk_logit")
