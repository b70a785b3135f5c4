"""What training costs elsewhere (issue #30): other environments' held-out questions are evaluated on the run's
schedule (eval.other_envs), next to pass@1 and pass@n of the training environment, and saved with the run."""

from __future__ import annotations

from conftest import TINY_OVERRIDES
import pytest

from sdpo import SDPOTrainer, load_config
from sdpo.config import ConfigError
from sdpo.tracking import read_metrics

pytestmark = pytest.mark.slow  # end-to-end: deselected by the quick check, pytest -m "not slow"


def test_other_environments_are_evaluated_on_the_schedule_and_saved(tmp_path):
    config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", "env=arithmetic",
                          "trainer.total_steps=2", "eval.every=2", "eval.num_questions=3",
                          "eval.samples_per_question=2", "eval.other_envs=[convention]", "algorithm=grpo"])
    trainer = SDPOTrainer(config)
    trainer.train()
    rows = [r for r in read_metrics(trainer.run_dir) if "eval/avg@2" in r]
    assert [r["step"] for r in rows] == [0, 2]  # at the start and every eval.every steps
    for row in rows:
        assert {"eval_convention/avg@2", "eval_convention/pass@1", "eval_convention/pass@2",
                "eval/pass@1", "eval/pass@2"} <= row.keys()
        assert 0.0 <= row["eval_convention/avg@2"] <= 1.0 and row["eval/pass@1"] <= row["eval/pass@2"]
    (_, env, held_out, _), = trainer.collector.other_held_out()
    assert type(env).__name__ == "ConventionEnv" and len(held_out) == 3
    assert all(p.teacher_context is None for p in held_out)  # another env's questions are never reprompted
    assert (trainer.run_dir / "reward_curve.png").stat().st_size > 0


def test_an_unknown_other_environment_lists_the_valid_names(tmp_path):
    config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", "eval.other_envs=[nope]",
                          "eval.every=1"])
    with pytest.raises(KeyError, match="unknown environment 'nope'; valid names: .*arithmetic"):
        SDPOTrainer(config)


def test_an_other_environment_takes_settings_a_label_and_its_own_token_budget(tmp_path):
    config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", "env=arithmetic",
                          "eval.num_questions=2", "eval.samples_per_question=2",
                          "eval.other_envs=[convention,{name:arithmetic,label:addition,ops:[+],max_new_tokens:3}]"])
    trainer = SDPOTrainer(config)
    (_, _, _, plain), (prefix, env, held_out, own) = trainer.collector.other_held_out()
    assert prefix == "eval_addition" and env.config.ops == ["+"] and all("+" in p.question for p in held_out)
    assert own.eval.max_new_tokens == 3 and plain.eval.max_new_tokens == config.eval.max_new_tokens
    metrics = trainer.collector.evaluate([])
    assert metrics["eval_addition/response_length"] <= 3 and "eval_convention/avg@2" in metrics


@pytest.mark.parametrize("entry, message", [
    ("[{name:arithmetic,opz:[+]}]",
     r"eval.other_envs\[arithmetic\]: environment 'arithmetic' has no setting \['opz'\]; its settings: .*'ops'"),
    ("[arithmetic,{name:arithmetic,ops:[+]}]", "names an environment twice .*give each entry a label"),
    ("[{ops:[+]}]", "must be an environment name or a mapping with a 'name'"),
    ("[{name:arithmetic,max_new_tokens:0}]", r"eval.other_envs\[arithmetic\].max_new_tokens=0 is out of range"),
])
def test_a_wrong_other_environment_entry_says_what_to_fix(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        config = load_config([*TINY_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", f"eval.other_envs={entry}"])
        SDPOTrainer(config)
