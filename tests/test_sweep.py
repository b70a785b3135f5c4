"""Sweeps (sdpo/sweep/): the config's checks, the runner's resume / failure / SIGINT behaviour with a fake trainer
(tests/fake_train.py, a second per run), the table's statistics against hand-computed references, and the curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sdpo.sweep import SweepError, load_sweep, run_sweep, summarize, write_table
from sdpo.sweep.stats import estimate, separated, t_quantile
from sdpo.sweep.table import markdown, summary_json

REPO = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).with_name("fake_train.py")
BASE = {"methods": {"grpo": ["algorithm=grpo"], "sdpo": ["algorithm=sdpo"]}, "seeds": [0, 1, 2],
        "metrics": [{"key": "eval/avg@4", "label": "held-out", "reach": 0.5}, "reward/mean"]}


def fake_command(run, run_dir):
    return [sys.executable, str(FAKE), *run.overrides, f"trainer.output_dir={run_dir}"]


def sweep_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({**BASE, **changes}))
    return path


def starts(run_dir: Path) -> int:
    return len((run_dir / "starts").read_text().splitlines()) if (run_dir / "starts").exists() else 0


# --- statistics ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("df,tabulated", [(1, 12.706204736174707), (2, 4.302652729911275), (3, 3.182446305284263),
                                          (4, 2.7764451051977987), (9, 2.2621571627409915), (30, 2.0422724563012373)])
def test_t_quantile_matches_the_tables(df, tabulated):
    assert t_quantile(0.95, df) == pytest.approx(tabulated, rel=1e-9)


def test_interval_against_a_hand_computed_reference():
    # mean 0.7; sample sd sqrt(((-0.2)^2 + 0 + 0.2^2) / 2) = 0.2; half width t(0.975, 2) * 0.2 / sqrt(3)
    e = estimate([0.5, 0.7, 0.9])
    assert e.mean == pytest.approx(0.7, abs=1e-15)
    assert e.half_width == pytest.approx(4.302652729911275 * 0.2 / math.sqrt(3), rel=1e-9)
    assert e.half_width == pytest.approx(0.496827, abs=1e-6)
    one = estimate([0.4])
    assert one.half_width is None and one.text() == "0.400 (one seed)"


def test_separated_means_disjoint_intervals():
    low, high = estimate([0.10, 0.12, 0.11]), estimate([0.50, 0.52, 0.51])
    wide = estimate([0.0, 0.3, 0.6])
    assert separated(low, high) and separated(high, low)
    assert not separated(low, wide) and not separated(high, wide)
    assert not separated(estimate([0.1]), high)  # one seed: no interval, never separated


# --- the config ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    ({"methdos": {}}, "unknown key 'methdos'.*did you mean 'methods'"),
    ({"methods": {"grpo": []}}, "method 'grpo' has no overrides"),
    ({"methods": {"grpo": ["algorithm=grpo", "trainer.seed=3"]}}, "sets trainer.seed, which the sweep sets"),
    ({"methods": {"a": ["algorithm=grpo"], "b": ["algorithm=grpo"]}}, "have the same overrides"),
    ({"methods": {"bad/name": ["algorithm=grpo"]}}, "method name 'bad/name'"),
    ({"seeds": [0, 0]}, "seeds repeat"),
    ({"seeds": []}, "`seeds:` is missing or empty"),
    ({"metrics": [{"key": "eval/avg@4", "paper": {"grpo": 41.2}}]}, "say where they come from in `paper_source:`"),
    ({"metrics": [{"key": "eval/avg@4", "paper": {"ppo": 41.2}}], "paper_source": "paper Table 1"},
     "paper names 'ppo', which is not a method"),
    ({"metrics": [{"key": "eval/avg@4", "goal": "up"}]}, "goal='up'"),
    ({"metrics": [{"key": "eval/avg@4", "reahc": 0.5}]}, "unknown key 'reahc'.*did you mean 'reach'"),
    ({"overrides": ["trainer.output_dir=x"]}, "sets trainer.output_dir"),
])
def test_bad_sweep_configs_say_what_to_fix(tmp_path, changes, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(str(sweep_file(tmp_path, **changes)))


def test_unknown_sweep_name_lists_the_known_ones():
    with pytest.raises(SweepError, match="unknown sweep 'cpu_method'.*did you mean sweep=cpu_methods"):
        load_sweep("cpu_method")


def test_runs_are_seed_major_with_shared_then_method_overrides(tmp_path):
    sweep = load_sweep(str(sweep_file(tmp_path, overrides=["trainer.total_steps=3"])))
    runs = sweep.runs(("rollout=hf",))
    assert [r.name for r in runs] == ["grpo-seed0", "sdpo-seed0", "grpo-seed1", "sdpo-seed1", "grpo-seed2",
                                      "sdpo-seed2"]
    assert runs[1].overrides == ("trainer.total_steps=3", "algorithm=sdpo", "rollout=hf", "trainer.seed=0")


# --- the runner ---------------------------------------------------------------------------------------------------

def test_sweep_runs_records_and_skips_finished_runs(tmp_path):
    sweep = load_sweep(str(sweep_file(tmp_path)))
    out = tmp_path / "runs"
    result = run_sweep(sweep, out, command=fake_command, progress=False)
    assert len(result.done) == 6 and not result.failed and not result.skipped
    marker = json.loads((out / "sdpo-seed1" / "sweep_run.json").read_text())
    assert marker["status"] == "done" and marker["exit_code"] == 0 and marker["wall_s"] > 0
    assert (out / "sdpo-seed1" / "wandb_env").read_text() == "toy sdpo"  # wandb group: the sweep; job type: method
    again = run_sweep(sweep, out, command=fake_command, progress=False)
    assert again.skipped == result.done and not again.done
    assert all(starts(out / name) == 1 for name in result.done)


def test_a_failed_run_is_recorded_with_its_error_line_and_the_sweep_goes_on(tmp_path):
    methods = {**BASE["methods"], "broken": ["algorithm=grpo", "fake.fail=unknown config key 'trainer.lrr'"]}
    sweep = load_sweep(str(sweep_file(tmp_path, methods=methods, seeds=[0, 1])))
    out = tmp_path / "runs"
    result = run_sweep(sweep, out, command=fake_command, progress=False)
    assert result.failed == ["broken-seed0", "broken-seed1"] and len(result.done) == 4
    marker = json.loads((out / "broken-seed0" / "sweep_run.json").read_text())
    assert marker["status"] == "failed" and marker["exit_code"] == 1
    assert marker["error"] == "error: unknown config key 'trainer.lrr'"
    assert run_sweep(sweep, out, command=fake_command, progress=False).failed == []  # finished: not rerun
    retried = run_sweep(sweep, out, command=fake_command, progress=False, retry_failed=True)
    assert retried.failed == ["broken-seed0", "broken-seed1"] and starts(out / "broken-seed0") == 2
    _, text = write_table(out)
    assert "| broken-seed0 | failed |" in text
    assert "- broken-seed0 (exit 1): `error: unknown config key 'trainer.lrr'`" in text


def test_a_stopped_run_restarts_from_scratch_or_resumes_from_its_checkpoint(tmp_path):
    sweep = load_sweep(str(sweep_file(tmp_path, seeds=[0])))
    out = tmp_path / "runs"
    # grpo-seed0 was stopped before its first checkpoint: partial metrics, no marker
    (out / "grpo-seed0").mkdir(parents=True)
    (out / "grpo-seed0" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/avg@4": 99.0}) + "\n")
    # sdpo-seed0 was stopped after its step-2 checkpoint
    ckpt = out / "sdpo-seed0" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("2")
    rows = [{"step": s, "eval/avg@4": 0.30 + 0.05 * s, "reward/mean": 0.3} for s in range(3)]
    (out / "sdpo-seed0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_sweep(sweep, out, command=fake_command, progress=False)
    assert result.done == ["grpo-seed0", "sdpo-seed0"]
    s = summarize(out)
    held_out = s.metrics[0]
    assert held_out.start["grpo"].values == (pytest.approx(0.40),)  # the stale 99.0 is gone
    assert "trainer.resume=auto" not in (out / "grpo-seed0" / "starts").read_text()
    assert "trainer.resume=auto" in (out / "sdpo-seed0" / "starts").read_text()
    assert [r["step"] for r in s.outcomes[1].rows] == [0, 1, 2, 3, 4]
    assert held_out.end["sdpo"].values == (pytest.approx(0.50),)


def test_changed_overrides_are_refused_instead_of_mixing_runs(tmp_path):
    out = tmp_path / "runs"
    run_sweep(load_sweep(str(sweep_file(tmp_path, seeds=[0]))), out, command=fake_command, progress=False)
    changed = load_sweep(str(sweep_file(tmp_path, seeds=[0], overrides=["fake.steps=6"])))
    with pytest.raises(SweepError, match="was run with other overrides"):
        run_sweep(changed, out, command=fake_command, progress=False)


@pytest.mark.slow
def test_sigint_stops_the_sweep_and_the_next_start_continues(tmp_path):
    path = sweep_file(tmp_path, seeds=[0, 1], overrides=["fake.sleep=0.4"])
    out = tmp_path / "runs"
    driver = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(FAKE.parent)!r}]\n"
              "from pathlib import Path\nfrom sdpo.sweep import load_sweep, run_sweep\n"
              "from test_sweep import fake_command\n"
              f"r = run_sweep(load_sweep({str(path)!r}), Path({str(out)!r}), command=fake_command, progress=False)\n"
              "sys.exit(130 if r.stopped else 0)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while not (out / "sdpo-seed0" / "starts").exists() and time.time() < deadline:  # the second run has started
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert json.loads((out / "grpo-seed0" / "sweep_run.json").read_text())["status"] == "done"
    assert not (out / "sdpo-seed0" / "sweep_run.json").exists()  # stopped part-way: unmarked
    assert not (out / "grpo-seed1").exists()  # no run started after the signal
    result = run_sweep(load_sweep(str(path)), out, command=fake_command, progress=False)
    assert result.skipped == ["grpo-seed0"] and result.done == ["sdpo-seed0", "grpo-seed1", "sdpo-seed1"]
    assert starts(out / "grpo-seed0") == 1 and starts(out / "sdpo-seed0") == 2


# --- the table ----------------------------------------------------------------------------------------------------

def test_table_means_intervals_reach_and_separation(tmp_path):
    methods = {**BASE["methods"], "sdpo_grpo": ["algorithm=sdpo_grpo"]}
    metrics = [{"key": "eval/avg@4", "label": "held-out", "reach": 0.465,
                "paper": {"grpo": 41.2, "sdpo": "48.8 (best)"}}, {"key": "reward/mean", "mean": True}]
    sweep = load_sweep(str(sweep_file(tmp_path, methods=methods, metrics=metrics, paper_source="paper Table 9")))
    out = tmp_path / "runs"
    run_sweep(sweep, out, command=fake_command, progress=False)
    s = summarize(out)
    held_out = s.metrics[0]
    # end = base + 0.05 * 4 + 0.01 * seed: seeds 0, 1, 2 -> base + 0.20 + (0, 0.01, 0.02)
    end = held_out.end["grpo"]
    assert end.values == pytest.approx((0.60, 0.61, 0.62))
    assert end.mean == pytest.approx(0.61)
    assert end.half_width == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3), rel=1e-9)
    # first step at or above 0.465: grpo 0.45 / 0.46 / 0.47 at step 1, 0.50+ at 2; sdpo 0.47 for seed 2 at step 3
    assert held_out.reach["grpo"] == [2, 2, 1] and held_out.reach["sdpo"] == [4, 4, 3]
    # reward/mean = base + 0.02 * step over steps 0..4: mean base + 0.04, the same for every seed
    assert s.metrics[1].mean["sdpo"].values == pytest.approx((0.34, 0.34, 0.34))
    text = markdown(s)
    assert "not separated (95% intervals overlap): grpo ~ sdpo_grpo" in text  # 0.61 +- 0.025 vs 0.63 +- 0.025
    assert "separated: grpo > sdpo" in text and "sdpo_grpo > sdpo" in text
    assert "| grpo | 3 | 0.410 -> 0.610 (+0.200) | 0.610 ± 0.025 | 0.600, 0.610, 0.620 |" in text
    assert "| 41.2 | 0.610 ± 0.025 |" in text and "| 48.8 (best) | 0.510 ± 0.025 |" in text
    assert "paper: paper Table 9" in text
    assert "| mean over steps: mean ± 95% CI |" in text and "| 0.340 ± 0.000 |" in text
    write_table(out)
    assert (out / "curves.png").stat().st_size > 0 and json.loads((out / "table.json").read_text()) == summary_json(s)


def test_same_runs_give_the_same_table_numbers(tmp_path):
    path = sweep_file(tmp_path, seeds=[0, 1])
    first, second = tmp_path / "a", tmp_path / "b"
    run_sweep(load_sweep(str(path)), first, command=fake_command, progress=False)
    run_sweep(load_sweep(str(path)), second, command=fake_command, progress=False)
    assert summary_json(summarize(first)) == summary_json(summarize(second))


# --- the curves ---------------------------------------------------------------------------------------------------

def test_curves_one_colour_per_method_on_every_panel_one_legend_integer_steps(tmp_path):
    import matplotlib.colors as mcolors

    from sdpo.tracking import curves_figure

    groups = {}
    for method, base in (("grpo", 0.4), ("sdpo", 0.3)):
        groups[method] = []
        for seed in range(2):
            run = tmp_path / f"{method}-{seed}"
            run.mkdir()
            rows = [{"step": s, "reward/mean": base + 0.1 * s + 0.01 * seed} for s in range(4)]
            # only sdpo logs the KL: its panel must still draw sdpo in sdpo's colour
            rows = [{**r, "distill/kl": 0.1 * r["step"]} if method == "sdpo" else r for r in rows]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            groups[method].append(run)
    fig = curves_figure(groups, ["reward/mean", "distill/kl"])
    colours: dict[str, set] = {}
    for ax in fig.axes:
        assert ax.get_legend() is None  # one figure legend, not a panel's
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(mcolors.to_hex(line.get_color()))
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert set(colours) == {"grpo", "sdpo"} and all(len(c) == 1 for c in colours.values())
    assert colours["grpo"] != colours["sdpo"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["grpo", "sdpo"]
    kl_panel = fig.axes[1]
    assert [line.get_label() for line in kl_panel.get_lines()] == ["sdpo"]
    assert len(kl_panel.collections) == 1  # the band over sdpo's two seeds


# --- Hydra's own multirun -----------------------------------------------------------------------------------------

JOB = """\
import logging, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from sdpo.cli import run

def main(config):
    logging.getLogger("job").info("job with seed %d", config.trainer.seed)
    Path(config.trainer.output_dir, "written.txt").write_text(config.trainer.output_dir)

if __name__ == "__main__":
    run(main)
"""


@pytest.mark.slow  # Hydra multirun processes
@pytest.mark.parametrize("sweep_dir", [None, "out"])
def test_multirun_keeps_each_jobs_log_config_and_outputs_in_one_directory(tmp_path, sweep_dir):
    """`-m`: each job's log, .hydra/ and what it writes to trainer.output_dir share one directory (sdpo/cli.py)."""
    (tmp_path / "job.py").write_text(JOB.format(repo=str(REPO)))
    argv = [sys.executable, "job.py", "-m", "trainer.seed=0,1", "algorithm=grpo"]
    argv += [f"trainer.output_dir={sweep_dir}"] if sweep_dir else []
    subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    root = tmp_path / sweep_dir if sweep_dir else next((tmp_path / "runs").glob("multirun-*"))
    for seed in (0, 1):
        job = root / f"algorithm=grpo,trainer.seed={seed}"
        assert f"job with seed {seed}" in (job / "job.log").read_text()
        assert (job / ".hydra" / "config.yaml").exists()
        assert Path((job / "written.txt").read_text()) == job.resolve()
    assert not (tmp_path / "multirun").exists()


# --- the shipped sweeps -------------------------------------------------------------------------------------------

SWEEPS = sorted(p.stem for p in (REPO / "configs" / "sweep").glob("*.yaml"))


def test_every_paper_sweep_has_a_cpu_twin():
    papers = [name for name in SWEEPS if name.startswith("paper_")]
    assert papers and all(f"cpu_{name.removeprefix('paper_')}" in SWEEPS for name in papers)


@pytest.mark.slow  # about 2 s per sweep: every run composed as scripts/train.py would
@pytest.mark.parametrize("name", SWEEPS)
def test_every_run_of_every_shipped_sweep_composes(name, tmp_path):
    """scripts/sweep.py --dry-run: each run's config composes as scripts/train.py would and logs the metrics."""
    from sdpo.sweep import dry_run

    results = dry_run(load_sweep(name), tmp_path)
    assert results and [(run.name, problem) for run, problem in results if problem] == []


def test_dry_run_names_what_would_fail(tmp_path):
    from sdpo.sweep import dry_run

    methods = {"grpo": ["algorithm=grpo"], "typo": ["algorithm=sdpo", "trainer.optim.lrr=1e-5"]}
    metrics = ["eval/avg@8"]
    sweep = load_sweep(str(sweep_file(tmp_path, methods=methods, seeds=[0], metrics=metrics,
                                      overrides=["eval.every=2", "eval.samples_per_question=4"])))
    (grpo, grpo_problem), (typo, typo_problem) = dry_run(sweep, tmp_path / "runs")
    assert grpo_problem == "metric eval/avg@8 is not logged: eval.samples_per_question=4 logs eval/avg@4"
    assert "unknown config key 'trainer.optim.lrr'" in typo_problem and "did you mean trainer.optim.lr" in typo_problem


def test_train_refuses_a_sweep_with_the_command_that_runs_it():
    from sdpo.config import ConfigError
    from sdpo.hydra_config import check_overrides

    with pytest.raises(ConfigError, match=r"run it with `python scripts/sweep.py sweep=cpu_methods`"):
        check_overrides(["sweep=cpu_methods"])
