"""The config schema: one source of defaults, clear errors for bad keys and values, every preset composes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from sdpo.config import (
    AlgorithmConfig, ConfigError, DistillConfig, EvalConfig, RolloutConfig, SDPOConfig, TeacherConfig, TrainerConfig,
)
from sdpo.hydra_config import CONFIG_DIR, check_overrides, load_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def error_text(exc: BaseException) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_default_config_is_the_cpu_sdpo_run():
    config = load_config()
    assert isinstance(config, SDPOConfig)
    assert config.model.name_or_path == "smollm2-135m-instruct"
    assert config.env.name == "arithmetic"
    assert config.algorithm.uses_teacher
    assert config.rollout.engine == "vllm"  # the faster engine on this CPU (benchmarks/results/rollout_throughput.md)


def test_misspelled_key_names_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(["trainer.optim.lrr=1e-5"])
    assert "'trainer.optim.lrr'" in error_text(info.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        load_config(["trainer.total_steps=many"])
    assert "total_steps" in error_text(info.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algorithm.teacher.kind=copy", "algorithm.teacher.kind='copy' is not valid; allowed values: 'live', 'frozen', 'ema', 'trust_region'"),
        ("algorithm.distill.mode=logits", "allowed values: 'sampled_token', 'full_logits', 'topk_logits'"),
        ("algorithm.loss_agg_mode=mean", "algorithm.loss_agg_mode='mean'"),
        ("algorithm.grpo_weight=1.5", "algorithm.grpo_weight=1.5 is out of range"),
        ("rollout.engine=sglang", "allowed values: 'hf', 'vllm'"),
        ("logging.wandb=maybe", "logging.wandb"),
        ("trainer.mini_batch_questions=3", "must be a multiple of trainer.mini_batch_questions=3"),
        ("algorithm.mix=advantage", "set algorithm.distill.mode=sampled_token"),
        ("algorithm.distill.mode=sampled_token", "set algorithm.distill.alpha=1.0"),
        ("algorithm.distill.mode=sequence", "algorithm.distill.mode=sequence supports only the reverse KL"),
    ],
)
def test_invalid_values_say_what_to_fix(override, expected):
    with pytest.raises((ConfigError, ConfigCompositionException)) as info:
        load_config(["algorithm=sdpo", override])  # from pure SDPO (the CPU default is the hybrid)
    assert expected in error_text(info.value)


def test_dataclass_defaults_match_the_paper():
    # The paper's scalar-environment setting (docs/algorithm.md §7): the schema's defaults, with no preset to undo.
    distill, teacher, algo = DistillConfig(), TeacherConfig(), AlgorithmConfig()
    assert (distill.mode, distill.topk, distill.alpha, distill.is_clip, distill.tail) == ("topk_logits", 100, 0.5, 2.0, True)
    assert (teacher.kind, teacher.update_rate) == ("ema", 0.05)
    assert (algo.policy.clip_eps_low, algo.policy.clip_eps_high, algo.policy.kl_coef) == (0.2, 0.28, 0.0)
    assert algo.reprompt.max_reprompt_len == 10240 and algo.reprompt.dont_reprompt_on_self_success
    assert (algo.grpo_weight, algo.norm_adv_by_std, algo.loss_agg_mode, algo.tis_threshold) == (0.0, False, "token-mean", 2.0)
    rollout, trainer, evaluation = RolloutConfig(), TrainerConfig(), EvalConfig()
    assert (rollout.num_generations, rollout.max_prompt_len, rollout.max_new_tokens, rollout.temperature) == (8, 2048, 8192, 1.0)
    assert (trainer.questions_per_step, trainer.mini_batch_questions) == (32, 32)
    optim = trainer.optim
    assert (optim.lr, optim.warmup_steps, optim.weight_decay, optim.grad_clip, optim.schedule) == (1e-5, 10, 0.01, 1.0, "constant")
    assert (evaluation.samples_per_question, evaluation.temperature, evaluation.top_p) == (16, 0.6, 0.95)


def yaml_leaves(node, prefix=""):
    """{dotted key: value} of a YAML body; lists are leaves."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out |= yaml_leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: node}


# configs/accelerate/ holds Accelerate's files and configs/sweep/ scripts/sweep.py's (tests/test_sweep.py): no Hydra.
PRESET_FILES = sorted(p.relative_to(CONFIG_DIR) for p in CONFIG_DIR.rglob("*.yaml")
                      if p.parts[-2] not in ("accelerate", "sweep"))


@pytest.mark.parametrize("relative", PRESET_FILES, ids=str)
def test_no_yaml_leaf_restates_the_value_it_overrides(relative, tmp_path):
    """Compose with the file's body removed (its defaults list kept): every leaf of the body must change something."""
    import shutil

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sdpo.hydra_config import register_configs

    body = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / relative), resolve=False) or {}
    defaults = body.pop("defaults", None)
    body.pop("hydra", None)
    if not body:
        return  # nothing set here (a group option that only names the schema default, or a defaults list)
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    text = (CONFIG_DIR / relative).read_text()
    header = "# @package _global_\n" if text.startswith("# @package _global_") else ""
    stripped = OmegaConf.create({"defaults": defaults} if defaults is not None else {})
    (configs / relative).write_text(header + OmegaConf.to_yaml(stripped))
    group, option = (relative.parent.name, relative.stem) if relative.parent.name else (None, None)
    register_configs()
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        parent = compose(config_name="config", overrides=[f"{group}={option}"] if group else [])
    scope = "" if group is None or header else group  # a global-package file (experiment, ablation) sets full keys
    restated = [key for key, value in yaml_leaves(body, scope).items()
                if OmegaConf.select(parent, key, throw_on_missing=False) == value]
    assert not restated, f"configs/{relative} restates what it overrides: {restated}"


def test_an_advantage_clip_that_cannot_act_is_rejected():
    # Issue #10, defect 2: the test-time preset once set a clip that top-k distillation never reads.
    with pytest.raises(ConfigError, match="advantage_clip=5.0 clips the sampled-token SDPO advantage"):
        load_config(["experiment=test_time", "algorithm.distill.advantage_clip=5.0"])
    with pytest.raises(ConfigError, match="GRPO"):
        load_config(["algorithm=grpo", "algorithm.distill.mode=sampled_token", "algorithm.distill.alpha=1.0",
                     "algorithm.distill.advantage_clip=5.0"])
    config = load_config(["algorithm=sdpo_grpo", "algorithm.distill.advantage_clip=5.0"])  # where it acts: accepted
    assert config.algorithm.distill.advantage_clip == 5.0
    assert load_config(["experiment=test_time"]).algorithm.distill.advantage_clip is None


def test_yaml_files_only_override_schema_keys():
    # Every key a YAML file sets must exist in the schema: each option of each group composes, and every leaf it
    # sets is the composed config's value at that key (a key outside the schema would fail or be absent). Without
    # the CPU preset (~experiment), which would override some of them.
    from omegaconf import OmegaConf

    absent = object()
    checked = 0
    for group in ("algorithm", "model", "rollout", "trainer"):
        for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
            composed = OmegaConf.structured(load_config([f"{group}={option}", "~experiment"]))
            body = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")) or {}
            body.pop("defaults", None)
            for key, value in yaml_leaves(body, group).items():
                assert OmegaConf.select(composed, key, default=absent) == value, f"configs/{group}/{option}.yaml: {key}"
                checked += 1
    assert checked >= 10  # grpo, sdpo_grpo, tiny, vllm and paper set keys


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes(experiment):
    config = load_config([f"experiment={experiment}"])
    assert config.trainer.total_steps >= 1


def test_a_researchers_own_environment_by_target():
    config = load_config(["model=tiny", "env=arithmetic"])
    from sdpo.envs import build_environment

    env = build_environment({"_target_": "toy_envs.ParityEnv", "name": "parity", "num_questions": 3})
    assert len(env.load("train")) == 3
    with pytest.raises(ValueError, match="num_question"):
        build_environment({"_target_": "toy_envs.ParityEnv", "name": "parity", "num_question": 3})
    assert config.env.name == "arithmetic"


def test_resolved_config_is_saved_in_the_run_directory(tmp_path):
    from omegaconf import OmegaConf

    config = load_config(["algorithm=grpo"])
    OmegaConf.save(OmegaConf.structured(config), tmp_path / "config.yaml")
    assert OmegaConf.load(tmp_path / "config.yaml").algorithm.grpo_weight == 1.0
    assert Path(CONFIG_DIR / "config.yaml").exists()


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(["algorithm.teacher.kindd=ema"])
    message = str(info.value)
    assert "valid keys under algorithm.teacher: kind, update_rate, trust_region_mix" in message
    assert "did you mean algorithm.teacher.kind?" in message
    # Environment fields are checked against the chosen environment's own schema.
    with pytest.raises(ConfigError, match="env.max_operand"):
        load_config(["env.max_operandd=3"])


@pytest.mark.slow
def test_train_script_rejects_a_misspelled_key_before_starting():
    import subprocess
    import sys

    script = CONFIG_DIR.parent / "scripts" / "train.py"
    result = subprocess.run([sys.executable, str(script), "trainer.optim.lrr=1e-5"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "did you mean trainer.optim.lr?" in result.stderr


@pytest.mark.slow
def test_train_script_runs_with_the_default_run_directory(tmp_path):
    # No trainer.output_dir: Hydra's timestamped runs/<algorithm>-<env>-<time> directory is used (regression test:
    # an explicit null output_dir once broke the run-directory interpolation).
    import subprocess
    import sys

    script = CONFIG_DIR.parent / "scripts" / "train.py"
    overrides = ["model=tiny", "rollout=hf", "trainer.total_steps=1", "eval.every=0", "rollout.max_new_tokens=4",
                 "logging.wandb=disabled"]
    result = subprocess.run([sys.executable, str(script), *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dirs = list((tmp_path / "runs").glob("sdpo_grpo-arithmetic-*"))
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "metrics.jsonl").exists() and (run_dirs[0] / "config.yaml").exists()
    # The quiet terminal: a header of at most 5 lines, then (no progress bar here) the summary; no library chatter.
    shown = result.stdout.splitlines()
    assert shown[0].startswith("sdpo_grpo: SDPO") and "rollouts hf" in result.stdout
    assert any(line.startswith("done: 1 step;") for line in shown[:6])
    assert "INFO" not in result.stderr and "WARNING" not in result.stderr and "Loading weights" not in result.stderr
    assert f"log: {(run_dirs[0] / 'train.log').resolve()}" in result.stdout and (run_dirs[0] / "train.log").exists()


def test_engine_teacher_scoring_states_what_it_needs():
    with pytest.raises(ConfigError) as info:
        load_config(["algorithm=sdpo", "rollout=hf", "algorithm.teacher.scorer=engine"])
    text = error_text(info.value)
    assert "rollout=vllm" in text and "algorithm.teacher.kind=live" in text and "sampled_token" in text
    config = load_config(["algorithm=sdpo", "rollout=vllm", "algorithm.teacher.scorer=engine",
                          "algorithm.teacher.kind=live", "algorithm.distill.mode=sampled_token", "algorithm.distill.alpha=1.0"])
    assert config.algorithm.teacher.scorer == "engine"


@pytest.mark.parametrize("override, expected", [
    ("algorithm=sdpoo", "unknown algorithm option 'sdpoo': available algorithm options: grpo, opd, sdpo, sdpo_grpo, srpo; "
                        "did you mean algorithm=sdpo?"),
    ("env=nope", "unknown env option 'nope': available env options: arithmetic, "),
    ("env=arithmetc", "did you mean env=arithmetic?"),
    ("experiment=livecodebenc", "did you mean experiment=livecodebench?"),  # an optional group: Hydra ignores it
    ("algorithm=grpo,sdpoo", "unknown algorithm option 'sdpoo'"),  # a multirun sweep
])
def test_a_wrong_group_option_names_the_options_and_the_closest(override, expected):
    with pytest.raises(ConfigError) as info:
        check_overrides([override])
    assert expected in str(info.value)
    assert "_schema" not in str(info.value)  # the schema nodes in the ConfigStore are not options
    with pytest.raises(ConfigError, match="available"):
        load_config([override])


@pytest.mark.parametrize("preset", ["livecodebench", "test_time"])
def test_env_keys_are_checked_against_the_env_a_preset_selects(preset):
    # Regression (issue #10, defect 1): the preset's own documented usage failed with "unknown config key 'env.path'".
    check_overrides([f"experiment={preset}", "env.path=/x.jsonl"])
    config = load_config([f"experiment={preset}", "env.path=/x.jsonl"])
    assert config.env.name == "livecodebench" and config.env.path == "/x.jsonl"
    with pytest.raises(ConfigError, match="did you mean env.path"):
        check_overrides([f"experiment={preset}", "env.pathh=/x.jsonl"])
    # An explicit env= after the preset wins, as in Hydra.
    with pytest.raises(ConfigError, match="env.path"):
        check_overrides([f"experiment={preset}", "env=arithmetic", "env.path=/x.jsonl"])


@pytest.mark.slow
def test_scripts_check_the_command_line_like_hydra_parses_it():
    # Hydra's flags (--cfg job) are not overrides; the preset's env is found in eval.py and test_time.py too.
    import subprocess
    import sys

    for script in ("eval.py", "test_time.py"):
        path = CONFIG_DIR.parent / "scripts" / script
        result = subprocess.run([sys.executable, str(path), "experiment=test_time", "env.path=/x.jsonl", "--cfg", "job"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "path: /x.jsonl" in result.stdout and "enable_thinking: false" in result.stdout


QWEN3_PRESETS = ["grpo_sciknoweval", "livecodebench", "sciknoweval", "test_time", "tooluse"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_qwen3_presets_switch_thinking_off(experiment):
    # Issue #10, defect 3: Qwen3's chat template thinks unless told otherwise; the paper trains with thinking off.
    config = load_config([f"experiment={experiment}"])
    expected = {"enable_thinking": False} if experiment in QWEN3_PRESETS else {}
    assert config.model.chat_template_kwargs == expected


def test_a_valid_multirun_sweep_passes_the_check():
    sweep = ["algorithm=grpo,sdpo", "trainer.optim.lr=1e-5,3e-5", "env=glob(math*)"]
    assert check_overrides(sweep) is None
    # It passes because every item is valid, not because a sweep goes unread: one bad item in it fails.
    with pytest.raises(ConfigError, match="unknown algorithm option 'sdpoo'"):
        check_overrides(["algorithm=grpo,sdpo,sdpoo", *sweep[1:]])
    with pytest.raises(ConfigError, match="did you mean trainer.optim.lr"):
        check_overrides([sweep[0], "trainer.optim.lrr=1e-5,3e-5", sweep[2]])
    # Each run of the sweep composes to the values it names.
    for algorithm in ("grpo", "sdpo"):
        for lr in (1e-5, 3e-5):
            config = load_config([f"algorithm={algorithm}", f"trainer.optim.lr={lr}"])
            assert (config.algorithm.name, config.trainer.optim.lr) == (algorithm, lr)
