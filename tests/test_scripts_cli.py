"""The scripts other than train.py behave like it (issue #28): an override the script does not read is an error,
reports go to a run directory (runs/<script>-<env>-<time>/ by default), never into the model's directory,
scripts/eval.py evaluates the checkpoint trainer.resume names, and the terminal shows only the header, the progress
bar, the tables and where the report and the log are (library output goes to the log)."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

from sdpo.checkpoint import COMPLETE
from sdpo.cli import EVAL_IGNORES, EVAL_USES, PROBE_USES, TEST_TIME_IGNORES, check_used, override_key
from sdpo.config import ConfigError
from sdpo.hydra_config import load_config

pytestmark = pytest.mark.slow  # end-to-end: deselected by the quick check, pytest -m "not slow"

REPO = Path(__file__).resolve().parents[1]
# Small enough for a test: the tiny model on the transformers engine, 2 questions x 2 samples of 4 tokens.
EVAL_ARGS = ["model=tiny", "rollout=hf", "env=arithmetic", "env.score_workers=1", "model.autocast_dtype=none",
             "eval.samples_per_question=2", "eval.num_questions=2", "rollout.max_new_tokens=4"]


def run_script(script: str, *args: str, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_terminal_shows_only(proc: subprocess.CompletedProcess, stdout_starts: tuple[str, ...],
                               bars: tuple[str, ...]) -> None:
    """Every stdout line is one of the script's own (header, table, report line); stderr holds progress bars only:
    no vLLM / transformers / NUMA lines, no log records."""
    for line in proc.stdout.splitlines():
        assert not line.strip() or line.startswith(stdout_starts), f"unexpected terminal line: {line!r}"
    for segment in proc.stderr.replace("\r", "\n").splitlines():  # tqdm redraws with carriage returns
        assert not segment.strip() or segment.startswith(bars), f"unexpected terminal line: {segment!r}"


# -- overrides a script does not read ------------------------------------------------------------------------


def test_override_keys_and_what_each_script_reads():
    assert override_key("trainer.total_steps=5") == "trainer.total_steps"
    assert override_key("+model.extra=1") == "model.extra" and override_key("~eval.pass_k") == "eval.pass_k"
    assert override_key("model=tiny") is None and override_key("hydra.run.dir=x") is None
    # Used: what the script reads, and a section override that holds some of it; group choices and hydra.* always.
    check_used(["model=tiny", "algorithm=grpo", "model.dtype=float32", "env.feedback=true", "eval.num_questions=2",
                "trainer.resume=x", "trainer.seed=1", "algorithm.reprompt.success_reward_threshold=0.5",
                "hydra.run.dir=x", "logging.verbose=true"], "scripts/eval.py", EVAL_USES, EVAL_IGNORES)
    check_used(["trainer.optim.lr=1e-6", "algorithm.teacher.kind=live", "test_time.budget=8"], "scripts/test_time.py",
               None, TEST_TIME_IGNORES)
    check_used(["trainer.questions_per_step=8", "trainer.mini_batch_questions=8"], "scripts/probe.py", PROBE_USES)
    for script, uses, ignores, key in [
        ("scripts/eval.py", EVAL_USES, EVAL_IGNORES, "trainer.total_steps"),
        ("scripts/eval.py", EVAL_USES, EVAL_IGNORES, "eval.every"),
        ("scripts/eval.py", EVAL_USES, EVAL_IGNORES, "algorithm.teacher.kind"),
        ("scripts/test_time.py", None, TEST_TIME_IGNORES, "eval.num_questions"),
        ("scripts/test_time.py", None, TEST_TIME_IGNORES, "trainer.total_steps"),
        ("scripts/probe.py", PROBE_USES, (), "trainer.optim.lr"),
    ]:
        with pytest.raises(ConfigError, match=f"^{script} does not use {key}: it reads"):
            check_used([f"{key}=1"], script, uses, ignores)


@pytest.mark.parametrize("script, override", [("eval.py", "trainer.total_steps=5"),
                                              ("test_time.py", "eval.every=2"),
                                              ("probe.py", "test_time.budget=4")])
def test_a_script_refuses_an_override_it_does_not_use(tmp_path, script, override):
    proc = run_script(script, "model=tiny", "rollout=hf", override, cwd=tmp_path, timeout=120)
    key = override.split("=")[0]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: scripts/{script} does not use {key}: it reads")
    assert not (tmp_path / "runs").exists()  # refused before Hydra made a run directory


def test_bad_input_prints_what_to_fix_without_a_traceback(tmp_path):
    # A value out of range, and a data file with a broken line: one line each, no traceback.
    proc = run_script("train.py", "model=tiny", "rollout=hf", "algorithm.distill.alpha=2", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: algorithm.distill.alpha=2.0 is out of range; it must lie "
                                                    "in [0.0, 1.0]")
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    proc = run_script("train.py", "model=tiny", "rollout=hf", "env=dataset", f"env.path={data}",
                      "env.rewards=[exact_match]", cwd=tmp_path, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {data}:2: not valid JSON")


def test_cfg_job_still_prints_the_config_with_the_scripts_run_directory(tmp_path):
    proc = run_script("eval.py", "model=tiny", "--cfg", "job", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "output_dir: runs/eval-${env.name}-${now:%Y%m%d-%H%M%S}" in proc.stdout
    assert "name_or_path: tiny" in proc.stdout and not (tmp_path / "runs").exists()


# -- scripts/eval.py: what it evaluates, where the report goes, what the terminal shows --------------------------


def test_evaluated_model_follows_trainer_resume(tmp_path):
    from sdpo.evaluation import evaluated_model

    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / COMPLETE).write_text("")
    (tmp_path / "run" / "checkpoints" / ".tmp-step-000003").mkdir()  # a killed save: never picked
    config = lambda resume: load_config(["model=tiny", f"trainer.resume={resume}"])  # noqa: E731
    assert evaluated_model(config("none")).name_or_path == "tiny"
    assert evaluated_model(config(checkpoint)).name_or_path == str(checkpoint)
    assert evaluated_model(config(tmp_path / "run")).name_or_path == str(checkpoint)  # the run's newest
    assert evaluated_model(config(tmp_path / "run" / "checkpoints")).name_or_path == str(checkpoint)
    with pytest.raises(ValueError, match="trainer.resume=auto continues a training run"):
        evaluated_model(config("auto"))
    with pytest.raises(ValueError, match="is not a checkpoint"):
        evaluated_model(config(tmp_path / "nothing"))


def test_eval_progress_gives_the_same_report_in_chunks(tiny_path):
    from sdpo.envs import build_environment
    from sdpo.evaluation import evaluate_checkpoint
    from sdpo.models import load_tokenizer
    from sdpo.testing import ScriptedEngine

    config = load_config(["model=tiny", "rollout=hf", "env=arithmetic", "env.score_workers=1",
                          "eval.samples_per_question=4", "eval.num_questions=5",
                          "rollout.hf_batch_size=8"])  # 2 questions per chunk
    env = build_environment(config.env)
    tokenizer = load_tokenizer(tiny_path)
    plain = evaluate_checkpoint(config, env, ScriptedEngine(tokenizer))
    calls = []
    chunked = evaluate_checkpoint(config, env, ScriptedEngine(tokenizer), progress=lambda *c: calls.append(c))
    assert chunked["metrics"] == plain["metrics"] and chunked["per_question"] == plain["per_question"]
    assert calls == [("sampling", 0, 5), ("sampling", 2, 5), ("sampling", 4, 5), ("sampling", 5, 5),
                     ("scoring", 0, 5), ("scoring", 2, 5), ("scoring", 4, 5), ("scoring", 5, 5)]


def test_eval_writes_its_report_to_a_run_directory_and_evaluates_trainer_resume(tmp_path, tiny_path):
    # A training run's checkpoint: the tiny model's weights, marked complete.
    checkpoint = tmp_path / "my-run" / "checkpoints" / "step-000001"
    shutil.copytree(tiny_path, checkpoint)
    (checkpoint / COMPLETE).write_text("")
    model_files = sorted(p.name for p in Path(tiny_path).iterdir())
    proc = run_script("eval.py", *EVAL_ARGS, f"trainer.resume={tmp_path / 'my-run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").glob("eval-arithmetic-*"))
    assert len(runs) == 1, runs  # the default: runs/eval-<env>-<time>/ under the working directory
    run_dir = runs[0]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and report["num_questions"] == 2  # trainer.resume's, not tiny
    assert (run_dir / "eval.log").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    assert sorted(p.name for p in Path(tiny_path).iterdir()) == model_files  # nothing written by the model
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted([*model_files, COMPLETE])
    lines = proc.stdout.splitlines()
    assert lines[0] == f"eval: checkpoint {checkpoint} (trainer.resume)"
    assert lines[-1] == f"report {run_dir / 'report.json'} · log {run_dir / 'eval.log'}"
    assert "eval/avg@2" in proc.stdout and "sampling" in proc.stderr and "scoring" in proc.stderr
    assert_terminal_shows_only(proc, ("eval: ", "env ", "report ", str(checkpoint), "eval/"), ("sampling", "scoring"))


def test_eval_report_goes_into_the_named_run_directory(tmp_path, tiny_path):
    run_dir = tmp_path / "evals" / "base"
    proc = run_script("eval.py", *EVAL_ARGS, f"trainer.output_dir={run_dir}", "logging.progress_bar=false",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["checkpoint"] == str(tiny_path)
    assert not list(Path(tiny_path).glob("eval-*.json")) and not (tmp_path / "runs").exists()
    assert proc.stderr == ""  # no bar either
    assert_terminal_shows_only(proc, ("eval: ", "env ", "report ", str(tiny_path), "eval/"), ())


# -- scripts/test_time.py -----------------------------------------------------------------------------------


def test_test_time_is_quiet_and_reports_in_its_run_directory(tmp_path):
    proc = run_script("test_time.py", "model=tiny", "rollout=hf", "env=arithmetic", "env.feedback=true",
                      "env.score_workers=1", "model.autocast_dtype=none", "rollout.num_generations=2",
                      "rollout.max_new_tokens=4", "trainer.questions_per_step=1", "trainer.mini_batch_questions=1",
                      "algorithm.reprompt.max_reprompt_len=256", "test_time.budget=2", "test_time.num_questions=2",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").glob("test_time-arithmetic-*"))
    assert len(runs) == 1, runs
    run_dir = runs[0]
    report = json.loads((run_dir / "test_time.json").read_text())
    assert report["num_questions"] == 2 and set(report["discovery"]) == {"sdpo", "best_of_k"}
    assert (run_dir / "test_time.log").exists()
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("test-time: sdpo, best_of_k on 2 questions of arithmetic/test, budget 2 attempts")
    assert lines[-1] == f"report {run_dir / 'test_time.json'} · log {run_dir / 'test_time.log'}"
    assert "4/4" in proc.stderr  # the bar: 2 questions x 2 methods
    assert "question 1/2" in (run_dir / "test_time.log").read_text()  # per-question results: the log
    assert_terminal_shows_only(proc, ("test-time: ", "model ", "report ", "sdpo: ", "best_of_k: ", "discovery@"),
                               ("test-time",))


def test_test_time_on_vllm_keeps_its_loading_bars_and_numa_warnings_off_the_terminal(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    proc = run_script("test_time.py", "model=tiny", "rollout=vllm", "rollout.vllm.enforce_eager=true",
                      "rollout.vllm.dtype=float32", "rollout.vllm.kv_cache_gb=0.25", "rollout.max_prompt_len=64",
                      "algorithm=sdpo", "env=arithmetic", "env.feedback=true", "env.score_workers=1",
                      "model.autocast_dtype=none", "rollout.num_generations=2", "rollout.max_new_tokens=4",
                      "trainer.questions_per_step=1", "trainer.mini_batch_questions=1",
                      "algorithm.reprompt.max_reprompt_len=256", "test_time.budget=2", "test_time.num_questions=1",
                      f"trainer.output_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_terminal_shows_only(proc, ("test-time: ", "model ", "report ", "sdpo: ", "best_of_k: ", "discovery@"),
                               ("test-time",))
    log = (tmp_path / "run" / "test_time.log").read_text()
    assert "Loading safetensors checkpoint shards" in log  # what vLLM printed is kept, in the log
