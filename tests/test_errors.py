"""Every error a user can cause or meet ends a script with one `error: ...` line that says what to fix or how to go
on (sdpo/errors.py), a non-zero exit code and no traceback on the terminal (it is in the run's log file, and on the
terminal with logging.verbose=true). Most of these fail before any model loads."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
import re
import signal
import subprocess
import sys

import pytest

from sdpo import checkpoint as ckpt
from sdpo.envs.base import DataError
from sdpo.errors import describe
from sdpo.hydra_config import load_config
from sdpo.resume import continue_command
from sdpo.rollout.server import ServerClient, ServerError, ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")
TINY = ["model=tiny", "rollout=hf", "model.autocast_dtype=none", "rollout.num_generations=2",
        "rollout.max_new_tokens=4", "trainer.questions_per_step=2", "trainer.mini_batch_questions=2",
        "trainer.total_steps=2", "logging.progress_bar=false", "env.score_workers=1"]


def train(tmp_path: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """scripts/train.py with the tiny model in tmp_path/run (or `code`, a Python prelude that patches, then it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    argv = [*TINY, f"trainer.output_dir={tmp_path / 'run'}", *args]
    if code is None:
        command = [sys.executable, TRAIN, *argv]
    else:
        run = (f"import runpy, sys; sys.argv = {[TRAIN, *argv]!r}; sys.path.insert(0, {str(REPO / 'scripts')!r})\n"
               f"{code}\nrunpy.run_path({TRAIN!r}, run_name='__main__')")
        command = [sys.executable, "-c", run]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, expected: str, exact: bool = True) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # nothing else on the terminal contradicts or repeats it
    assert lines[0] == expected if exact else lines[0].startswith(expected), lines[0]


def write_rows(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(row + "\n" for row in rows))
    return path


# -- input: config, data, model, tokenizer, environment ---------------------------------------------------------


def test_config_error(tmp_path):
    proc = train(tmp_path, "algorithm.distill.alpha=2")
    assert_one_line(proc, "error: algorithm.distill.alpha=2.0 is out of range; it must lie in [0.0, 1.0]")


def test_data_file_missing(tmp_path):
    proc = train(tmp_path, "env=dataset", f"env.path={tmp_path / 'nope.jsonl'}", "env.rewards=[exact_match]")
    assert_one_line(proc, f"error: env.path: {tmp_path / 'nope.jsonl'} does not exist (a .jsonl/.json/.parquet/.csv "
                          "file, a folder of them, or a folder written by save_to_disk)")


def test_broken_row_is_named_once_by_its_line(tmp_path):
    # No `datasets` ERROR line counting rows its own way beside ours.
    data = write_rows(tmp_path / "rows.jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '])
    proc = train(tmp_path, "env=dataset", f"env.path={data}", "env.rewards=[exact_match]")
    assert_one_line(proc, f"error: {data}:2: not valid JSON (Expecting value, column 27): fix or remove the line")


def test_null_answer_is_refused_naming_file_line_field(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", ['{"prompt": "1+1", "answer": "2"}', '{"prompt": "2+2", "answer": null}'])
    proc = train(tmp_path, "env=dataset", f"env.path={data}", "env.rewards=[exact_match]")
    assert_one_line(proc, f"error: {data}:2: field 'answer': missing (null), and reward function exact_match needs "
                          "it (fix the row, or set env.skip_bad_rows=true to leave such rows out)")


def test_model_path_missing(tmp_path):
    proc = train(tmp_path, f"model.name_or_path={tmp_path / 'nope'}")
    assert_one_line(proc, f"error: model.name_or_path='{tmp_path / 'nope'}' is not a local HF checkpoint (no "
                          "config.json) nor a LoRA adapter (no adapter_config.json); use 'smollm2-135m-instruct', "
                          "'tiny' or a directory saved with save_pretrained")


def test_tokenizer_missing(tmp_path, tiny_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((Path(tiny_path) / "config.json").read_text())
    proc = train(tmp_path, f"model.name_or_path={model}")
    assert_one_line(proc, f"error: model.name_or_path={model}: its tokenizer cannot be loaded (", exact=False)
    assert proc.stderr.strip().endswith(f"save one there with tokenizer.save_pretrained('{model}'), or point "
                                        "model.name_or_path at a directory that holds both")


def test_environment_data_missing(tmp_path):
    proc = train(tmp_path, "env=science", f"env.data_dir={tmp_path / 'nodata'}")
    path = tmp_path / "nodata" / "sciknoweval_sdpo" / "biology" / "train.jsonl"
    assert_one_line(proc, f"error: SciKnowEval biology: {path} does not exist; set env.data_dir (now "
                          f"{tmp_path / 'nodata'}) to a folder that holds sciknoweval_sdpo/biology/train.jsonl "
                          "(docs/environments.md says where each data set comes from)")


def test_sandbox_unavailable(tmp_path):
    proc = train(tmp_path, "env=mbpp", "env.sandbox=bwrap", f"env.sandbox_python={tmp_path / 'no-python'}")
    assert_one_line(proc, "error: env.sandbox=bwrap cannot run here (", exact=False)
    assert proc.stderr.strip().endswith("fix bubblewrap or env.sandbox_python, or set env.sandbox=auto (the weaker "
                                        "process sandbox where bubblewrap fails)")


# -- met while running: a reward function, a server, the disk, and where the traceback goes ----------------------


def test_reward_function_that_raises_on_everything(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def broken(prompts, completions, answer, **kw):\n"
                                            "    raise ZeroDivisionError('my reward divided by zero')\n")
    data = write_rows(tmp_path / "rows.jsonl", ['{"prompt": "1+1", "answer": "2"}', '{"prompt": "2+2", "answer": "4"}'])
    proc = train(tmp_path, "env=dataset", f"env.path={data}", f"env.eval_path={data}", "env.rewards=[my_rewards:broken]")
    # The first batch scored is the held-out evaluation's at step 0 (eval.at_start) or the first step's.
    assert_one_line(proc, "error: reward function(s) broken raised on all ", exact=False)
    assert re.fullmatch(r"error: reward function\(s\) broken raised on all \d+ completions of the batch, the first "
                        r"with ZeroDivisionError: my reward divided by zero: fix it \(the tracebacks are in the run's "
                        r"log file\); a completion it cannot score should get 0 or None, not an exception",
                        proc.stderr.strip())
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback" in log and "my reward divided by zero" in log


def test_server_unreachable(tmp_path):
    port = free_port()
    proc = train(tmp_path, "rollout=vllm_server", f"rollout.server.url=http://127.0.0.1:{port}")
    assert_one_line(proc, f"error: vLLM server at http://127.0.0.1:{port} is unreachable during the health check: "
                          "[Errno 111] Connection refused (is it running? start it with scripts/serve.py, "
                          "docs/rollout.md); no checkpoint yet: run the command again to start over")


def test_disk_full_while_saving(tmp_path):
    # The save of step 2 meets a full disk: the line names the file and the step-1 checkpoint to continue from.
    code = ("import errno\nfrom sdpo import checkpoint\nsave = checkpoint.save_model\n"
            "def full(model, tokenizer, staging, **kw):\n"
            "    if staging.name.endswith('2'):\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device', str(staging / 'model.safetensors'))\n"
            "    return save(model, tokenizer, staging, **kw)\n"
            "checkpoint.save_model = full")
    proc = train(tmp_path, "env=arithmetic", "trainer.save_every=1", code=code)
    root = tmp_path / "run" / "checkpoints"
    assert_one_line(proc, f"error: no space left on the device writing {root / '.tmp-step-000002' / 'model.safetensors'}"
                          f": free some space (or set trainer.keep_last lower); the newest checkpoint is "
                          f"{root / 'step-000001'}: continue with: python {TRAIN} ", exact=False)
    assert proc.stderr.strip().endswith(f"trainer.output_dir={tmp_path / 'run'} trainer.resume=auto")
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-000001"]


def test_verbose_shows_the_traceback_and_still_ends_with_the_line(tmp_path):
    proc = train(tmp_path, "env=dataset", f"env.path={tmp_path / 'nope.jsonl'}", "env.rewards=[exact_match]",
                 "logging.verbose=true")
    assert proc.returncode == 1 and "Traceback" in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: env.path: {tmp_path / 'nope.jsonl'} does not exist")
    assert "HYDRA_FULL_ERROR" not in proc.stderr


# -- the pieces, without a run ----------------------------------------------------------------------------------


def test_a_dead_server_says_so_in_one_line_and_that_resume_continues(tmp_path, monkeypatch):
    process = ServerProcess([sys.executable, "-c", "print('loading'); print('CUDA out of memory'); raise SystemExit(3)"],
                            {}, log_dir=tmp_path)
    process.process.wait()
    assert Path(process.log_path).parent == tmp_path
    client = ServerClient(f"http://127.0.0.1:{free_port()}", 5, process)
    with pytest.raises(ServerError) as caught:
        client.request("/inference/v1/generate", {}, "generation")
    message = str(caught.value)
    assert "\n" not in message and message.endswith(f": the server process exited with code 3 (its log: "
                                                    f"{process.log_path})")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000004" / ckpt.COMPLETE).write_text("4")
    monkeypatch.setattr(sys, "argv", [TRAIN, "model=tiny", f"trainer.output_dir={run_dir}"])
    line, code = describe(caught.value, run_dir, tmp_path / "train.log")
    assert code == 1 and line == (f"error: {message}; the newest checkpoint is {run_dir / 'checkpoints' / 'step-000004'}"
                                  f": {continue_command(run_dir)}")
    assert line.endswith(f"python {TRAIN} model=tiny trainer.output_dir={run_dir} trainer.resume=auto")


def test_unexpected_errors_name_their_type_and_the_log(tmp_path):
    line, code = describe(RuntimeError("CUDA error: an illegal memory access\nmore detail"), None, tmp_path / "t.log")
    assert code == 1 and line == f"error: RuntimeError: CUDA error: an illegal memory access (the traceback is in {tmp_path / 't.log'})"
    disk = OSError(errno.ENOSPC, "No space left on device")
    assert describe(disk, None, None)[0].startswith("error: no space left on the device: free some space")


def test_skip_bad_rows_leaves_them_out_and_counts_them(tmp_path, caplog):
    from sdpo.envs import build_environment

    data = write_rows(tmp_path / "rows.jsonl", ['{"prompt": "1+1", "answer": "2"}', '{"prompt": "2+2"}',
                                                '{"prompt": null, "answer": "3"}', '{"prompt": "3+3", "answer": "6"}'])
    config = load_config(["env=dataset", f"env.path={data}", "env.rewards=[exact_match]"])
    with pytest.raises(DataError, match=rf"^{data}:2: field 'answer': missing \(null\)"):
        build_environment(config.env).load("train")
    config.env.skip_bad_rows = True
    with caplog.at_level("WARNING", logger="sdpo"):
        problems = build_environment(config.env).load("train")
    assert [p.data["columns"]["answer"] for p in problems] == ["2", "6"]
    assert f"{data}: left out 2 of 4 rows with a null, missing or malformed value (env.skip_bad_rows=true)" in caplog.text


def test_a_handed_in_dataset_names_the_row_index(tmp_path):
    from datasets import Dataset

    from sdpo.envs.dataset import DatasetEnv, DatasetEnvConfig

    rows = Dataset.from_list([{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": None}])
    env = DatasetEnv(DatasetEnvConfig(rewards=["exact_match"]), train_dataset=rows)
    with pytest.raises(DataError, match=r"^train_dataset\[1\]: field 'answer': missing \(null\), and reward function "
                                        r"exact_match needs it"):
        env.load("train")


def test_sdpos_own_value_errors_are_their_message_and_a_librarys_names_its_type(tmp_path):
    from sdpo.envs.dataset import read_split

    with pytest.raises(ValueError) as ours:
        read_split(tmp_path / "rows.txt", "train") if (tmp_path / "rows.txt").write_text("x") else None
    assert describe(ours.value, None, None) == (f"error: env.path: {tmp_path / 'rows.txt'} is not a .jsonl, .json, "
                                                ".parquet or .csv file", 1)
    with pytest.raises(ValueError) as theirs:
        json.loads("{")
    line, _ = describe(theirs.value, None, tmp_path / "train.log")
    assert line.startswith("error: JSONDecodeError: Expecting property name") and line.endswith(
        f"(the traceback is in {tmp_path / 'train.log'})")


def test_a_library_error_raised_from_a_second_signal_is_the_stop(tmp_path):
    from sdpo.interrupt import StopNow

    try:
        try:
            raise StopNow(signal.SIGINT)
        except StopNow as stop:
            raise ImportError("initialization failed") from stop
    except ImportError as exc:
        line, code = describe(exc, tmp_path, None)
    assert code == 130 and line == "stopped at once by SIGINT; no checkpoint yet: run the command again to start over"
