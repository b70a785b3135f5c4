"""trainer.keep_best and trainer.collapse_drop (sdpo/guards.py) with the tiny model and a scripted held-out metric:
the best step is kept, rotation never deletes it, a resume keeps the best value, the collapse stop fires at the
right step and not before; bad settings are config errors that say what to set."""

from __future__ import annotations


import pytest
from conftest import TINY_OVERRIDES
from toy_envs import ParityEnv, ParityEnvConfig

from sdpo import SDPOTrainer, load_config
from sdpo import checkpoint as ckpt
from sdpo.config import ConfigError
from sdpo.console import summary
from sdpo.guards import read_record
from sdpo.tracking import read_metrics

RUN = ["trainer.total_steps=6", "eval.every=1", "eval.samples_per_question=2", "eval.at_start=true",
       "trainer.keep_best.metric=eval/avg@2", "trainer.save_every=1", "trainer.keep_last=2",
       "logging.samples_every=0"]


class InlineParityEnv(ParityEnv):
    scoring_mode = "inline"


def run(tmp_path, curve, *overrides):
    """Train with held-out values scripted by step (`curve[step]`); the weights and checkpoints are real."""
    config = load_config([*TINY_OVERRIDES, *RUN, f"trainer.output_dir={tmp_path / 'run'}", *overrides])
    trainer = SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig()))
    key = "eval/avg@2" if "maj" in config.trainer.keep_best.metric else config.trainer.keep_best.metric
    trainer.evaluate = lambda: {key: curve[trainer.step], "eval/pass@1": 0.0}
    try:
        trainer.train()
    finally:
        trainer.engine.close()
    return trainer


@pytest.mark.slow
def test_keep_best_keeps_the_best_step_and_rotation_never_deletes_it(tmp_path):
    curve = [0.2, 0.3, 0.6, 0.5, 0.4, 0.6, 0.1]  # best 0.6 first at step 2; step 5 only ties it
    trainer = run(tmp_path, curve)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-000005", "step-000006"]  # keep_last=2 rotated
    record = read_record(root)
    assert record == {"metric": "eval/avg@2", "value": 0.6, "step": 2, "path": str(root / "best")}
    assert (root / "best" / ckpt.COMPLETE).read_text() == "2"
    assert ckpt.load_trainer_state(root / "best")["step"] == 2
    assert trainer.run.best.best.step == 2
    text = summary(tmp_path / "run")
    assert f"kept best eval/avg@2 0.600 at step 2 ({root / 'best'}); final 0.100 at step 6" in text
    assert "stopped" not in text


@pytest.mark.slow
def test_minimising_keeps_the_lowest_value(tmp_path):
    run(tmp_path, [5.0, 4.0, 6.0, 3.0, 7.0, 8.0, 9.0], "trainer.keep_best.metric=eval/response_length",
        "trainer.keep_best.maximize=false")
    assert read_record(tmp_path / "run" / "checkpoints")["step"] == 3


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_value_and_step(tmp_path):
    curve = [0.1, 0.7, 0.2, 0.3, 0.5, 0.6, 0.65]
    first = run(tmp_path, curve, "trainer.total_steps=3")
    assert first.run.best.best.value == 0.7
    config = load_config([*TINY_OVERRIDES, *RUN, f"trainer.output_dir={tmp_path / 'run'}", "trainer.resume=auto"])
    resumed = SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig()))
    assert resumed.step == 3 and resumed.run.best.best.value == 0.7 and resumed.run.best.best.step == 1
    resumed.evaluate = lambda: {"eval/avg@2": curve[resumed.step]}
    try:
        resumed.train()
    finally:
        resumed.engine.close()
    # 0.5, 0.6, 0.65 after the resume never beat the 0.7 of step 1: the best checkpoint is still step 1's.
    assert read_record(tmp_path / "run" / "checkpoints")["step"] == 1


@pytest.mark.slow
def test_the_best_checkpoint_on_disk_wins_over_an_older_checkpoints_record(tmp_path):
    # Killed after step 4's best was saved but resumed from step 3's checkpoint (whose state knew only step 1).
    curve = [0.1, 0.5, 0.2, 0.3, 0.9, 0.2, 0.2]
    run(tmp_path, curve, "trainer.total_steps=4", "trainer.keep_last=0")
    root = tmp_path / "run" / "checkpoints"
    config = load_config([*TINY_OVERRIDES, *RUN, f"trainer.output_dir={tmp_path / 'run'}",
                          f"trainer.resume={root / 'step-000003'}"])
    resumed = SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig()))
    resumed.engine.close()
    assert resumed.step == 3 and (resumed.run.best.best.value, resumed.run.best.best.step) == (0.9, 4)


def test_the_collapse_stop_fires_at_the_first_drop_of_the_set_amount_and_not_before(tmp_path):
    curve = [0.3, 0.5, 0.45, 0.31, 0.3, 0.1, 0.1]  # best 0.5 at step 1; 0.31 is 0.19 below it, 0.3 is 0.2 below
    run(tmp_path, curve, "trainer.collapse_drop=0.2")
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 4 and rows[-1]["guard/collapse_stop"] == 1.0
    assert not any(r.get("guard/collapse_stop") for r in rows[:-1])
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step-000004"  # the stop still leaves a checkpoint to resume from
    assert read_record(root)["step"] == 1
    assert "stopped at step 4" in summary(tmp_path / "run")


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.keep_best.metric=eval/avg@16", "eval.every=2", "eval.samples_per_question=4"],
     "trainer.keep_best.metric='eval/avg@16' is not valid"),
    (["trainer.keep_best.metric=avg@4", "eval.every=2", "eval.samples_per_question=4"], "'eval/avg@4'"),
    (["trainer.keep_best.metric=eval/avg@16"], "needs held-out evaluations: set eval.every"),
    (["trainer.collapse_drop=0.1"], "set trainer.keep_best.metric"),
    (["trainer.collapse_drop=-0.1", "trainer.keep_best.metric=eval/avg@16", "eval.every=1"], "trainer.collapse_drop"),
])
def test_bad_guard_settings_say_what_to_set(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        load_config(["model=tiny", "eval.every=0", "eval.samples_per_question=16", *overrides])


def test_a_metric_the_environment_does_not_produce_is_named_at_the_first_evaluation(tmp_path):
    # maj@n needs extracted answers, which an environment may not give: the config cannot know, the first evaluation does.
    with pytest.raises(ValueError, match="not among the held-out metrics this run produces"):
        run(tmp_path, [0.1] * 7, "trainer.keep_best.metric=eval/maj@2")
