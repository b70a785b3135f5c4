"""Logging (metrics.jsonl always; wandb online / offline / disabled, never a crash for a missing key; tensorboard;
the sample-completions table), learning-curve plots, and scripts/eval.py on a checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest
from conftest import TINY_OVERRIDES
from toy_envs import ParityEnv, ParityEnvConfig

from sdpo import SDPOTrainer, load_config
from sdpo.config import LoggingConfig
from sdpo.tracking import Tracker, read_metrics, wandb_mode

REPO = Path(__file__).resolve().parents[1]
SAMPLE = {"problem": "p0", "response": "42 | 7\nmore", "reward": 1.0, "feedback": ""}


class InlineParityEnv(ParityEnv):
    scoring_mode = "inline"


@pytest.fixture()
def no_wandb_credentials(tmp_path, monkeypatch):
    """No WANDB_MODE, no API key, a home without a netrc."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "home").mkdir()


def test_wandb_mode_rules(no_wandb_credentials, monkeypatch, tmp_path):
    assert wandb_mode("auto") == "offline"  # no key: offline, not a login prompt
    assert wandb_mode("online") == "offline"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online" and wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment's "disabled" always wins
    assert wandb_mode("online") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"


def test_wandb_without_a_key_logs_offline_and_never_crashes(no_wandb_credentials, tmp_path):
    run = tmp_path / "run"
    tracker = Tracker(LoggingConfig(wandb="auto"), run, {"trainer": {"seed": 0}})
    assert tracker.wandb_mode == "offline"
    tracker.log({"reward/mean": 0.5, "bad": float("nan")}, 1)
    tracker.log_samples([SAMPLE], 1)
    tracker.close()
    assert list((run / "wandb").glob("offline-run-*")), "an offline wandb run to `wandb sync` later"
    assert read_metrics(run) == [{"step": 1, "reward/mean": 0.5, "bad": None}]


def test_disabled_wandb_and_tensorboard(tmp_path):
    run = tmp_path / "run"
    tracker = Tracker(LoggingConfig(wandb="disabled", tensorboard=True), run, {})
    tracker.log({"reward/mean": 0.25}, 3)
    tracker.log_samples([SAMPLE], 3)
    tracker.close()
    assert not (run / "wandb").exists() and read_metrics(run)[0]["reward/mean"] == 0.25
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("reward/mean")] == [0.25]
    assert any("samples" in tag for tag in events.Tags()["tensors"])


def test_trainer_logs_a_sample_table_every_n_steps_and_tensorboard(tmp_path):
    config = load_config([*TINY_OVERRIDES, "trainer.total_steps=2", "logging.samples_every=2", "logging.num_samples=3",
                          "logging.tensorboard=true", f"trainer.output_dir={tmp_path / 'run'}"])
    SDPOTrainer(config, env=InlineParityEnv(ParityEnvConfig())).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2]
    assert {"problem", "response", "reward", "feedback"} <= set(rows[0])
    assert any(r["feedback"] for r in rows) or all(r["reward"] == 1.0 for r in rows)
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def write_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_metrics_keeps_the_last_row_of_a_re_logged_step(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}, {"step": 2, "a": 3.0},
                                       {"step": 3, "a": 4.0}])
    assert [(r["step"], r["a"]) for r in read_metrics(run)] == [(1, 1.0), (2, 3.0), (3, 4.0)]


def test_plot_script_overlays_runs(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot

    def fake(kind: str, slope: float) -> list[dict]:
        rows = []
        for step in range(1, 21):
            row = {"step": step, "reward/mean": slope * step / 20, "response/length_mean": 40 - slope * step}
            if kind == "sdpo":
                row["distill/student_teacher_kl"] = 0.5 / step
            if step % 5 == 0:
                row["eval/avg@4"] = slope * step / 25
            rows.append(row)
        return rows

    runs = [write_run(tmp_path / "sdpo", fake("sdpo", 0.9)), write_run(tmp_path / "grpo", fake("grpo", 0.5))]
    out = plot.main([*map(str, runs), "--labels", "SDPO", "GRPO", "--smooth", "3", "--out", str(tmp_path / "c.png")])
    assert out.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "missing")])


@pytest.mark.slow
def test_eval_script_reports_avg_and_pass_at_k_for_a_checkpoint(tmp_path, tiny_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "scripts" / "eval.py"), "env=arithmetic", f"model.name_or_path={tiny_path}",
           "model.autocast_dtype=none", "eval.samples_per_question=4", "eval.num_questions=3",
           "rollout.max_new_tokens=6", "env.score_workers=1", f"eval.output_file={out}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["metrics"]) >= {"eval/avg@4", "eval/pass@1", "eval/pass@2", "eval/pass@4"}
    assert report["sampling"]["temperature"] == 0.6 and report["sampling"]["top_p"] == 0.95  # the paper's
    assert report["num_questions"] == 3 and all(len(q["rewards"]) == 4 for q in report["per_question"])
    assert "eval/pass@4" in proc.stdout and str(out) in proc.stdout
