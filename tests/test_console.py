"""The quiet terminal (sdpo/console.py): library chatter to the log file, sdpo warnings and errors to the terminal,
a short header and a closing summary."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from sdpo.checkpoint import COMPLETE
from sdpo.console import header, native_output_to, setup_logging, summary
from sdpo.hydra_config import load_config


@pytest.fixture
def restore_logging(monkeypatch):
    """setup_logging reconfigures the process: put the root handlers, the warnings capture and env vars back."""
    for name in ("VLLM_CONFIGURE_LOGGING", "WANDB_SILENT"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's own value is undone afterwards
        monkeypatch.delenv(name)
    handlers, level, sdpo_level = logging.root.handlers[:], logging.root.level, logging.getLogger("sdpo").level
    yield
    logging.getLogger("sdpo").setLevel(sdpo_level)
    for handler in logging.root.handlers:
        if handler not in handlers:
            handler.close()
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)
    logging.captureWarnings(False)


def test_library_messages_go_to_the_log_file_and_sdpo_messages_and_errors_to_the_terminal(tmp_path, restore_logging):
    terminal = io.StringIO()
    log_file = setup_logging(tmp_path / "train.log", terminal=terminal)
    logging.getLogger("vllm.worker").info("vllm info")
    logging.getLogger("vllm.worker").warning("vllm warning")
    logging.getLogger("transformers.modeling_utils").warning("transformers warning")
    logging.getLogger("sdpo.rollout.vllm").debug("sdpo start-up detail")
    logging.getLogger("sdpo.test_time").info("sdpo progress")
    logging.getLogger("sdpo.trainer").warning("sdpo warning")
    logging.getLogger("vllm.worker").error("vllm error")
    shown, logged = terminal.getvalue(), log_file.read_text()
    for message in ("vllm info", "vllm warning", "transformers warning", "sdpo start-up detail", "sdpo progress",
                    "sdpo warning", "vllm error"):
        assert message in logged
    assert "sdpo progress" in shown and "sdpo warning" in shown and "vllm error" in shown
    assert not any(m in shown for m in ("vllm info", "vllm warning", "transformers warning", "sdpo start-up detail"))
    # vLLM and wandb are told before they are imported.
    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0" and os.environ["WANDB_SILENT"] == "true"


def test_verbose_leaves_the_terminal_alone(tmp_path, restore_logging):
    handlers = logging.root.handlers[:]
    setup_logging(tmp_path / "train.log", verbose=True)
    assert logging.root.handlers == handlers and "VLLM_CONFIGURE_LOGGING" not in os.environ


def test_native_output_goes_to_the_log_and_the_descriptors_come_back(tmp_path, capfd):
    log_file = tmp_path / "train.log"
    with native_output_to(log_file):
        os.write(2, b"oneDNN says hello\n")  # what C++ code prints, below Python's sys.stderr
        os.write(1, b"a library print\n")
    os.write(2, b"back on the terminal\n")
    out, err = capfd.readouterr()
    assert "oneDNN says hello" in log_file.read_text() and "a library print" in log_file.read_text()
    assert "oneDNN" not in err and "a library print" not in out and "back on the terminal" in err
    with pytest.raises(RuntimeError), native_output_to(log_file):
        raise RuntimeError("an error leaves the block")
    os.write(2, b"restored after an error\n")
    assert "restored after an error" in capfd.readouterr().err


def test_header_fits_in_five_lines_and_names_what_runs(tmp_path, monkeypatch):
    config = load_config(["rollout=vllm", "model.autocast_dtype=none", "rollout.vllm.dtype=float32"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    text = header(config, tmp_path, tmp_path / "train.log")
    lines = text.splitlines()
    assert len(lines) <= 5
    for fragment in ("sdpo_grpo", "ema teacher", "smollm2-135m-instruct", "arithmetic", "vllm (float32)",
                     "precision float32", "2 threads", str(tmp_path), "train.log", "wandb offline"):
        assert fragment in text, fragment


def test_summary_reports_final_and_best_held_out_accuracy_and_where_things_are(tmp_path):
    rows = [{"step": 0, "eval/avg@4": 0.5}, {"step": 1, "reward/mean": 0.4}, {"step": 2, "eval/avg@4": 0.9},
            {"step": 3, "eval/avg@4": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint = tmp_path / "checkpoints" / "step-000003"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE).write_text("")
    text = summary(tmp_path, tmp_path / "train.log")
    assert "done: 3 steps" in text
    assert "avg@4: 0.500 at step 0 -> 0.800 at step 3 (best 0.900 at step 2)" in text
    assert str(tmp_path / "reward_curve.png") in text and str(tmp_path / "train.log") in text
    assert f"checkpoint {checkpoint}" in text
    assert "no held-out evaluation" in summary(Path(tmp_path / "empty"))
