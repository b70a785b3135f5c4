"""Where the data comes from: the repository's own data/ folder, a Hugging Face data set (`env.hub`), and the
one-line message for a data set that is missing.

The hub path is exercised offline on local copies in the hub's layout: a dataset repository with its README's
`configs:` block (as openai/gsm8k has), a `save_to_disk` folder, and the json builder over release files (as the
LiveCodeBench preset reads test6.jsonl from the hub).
"""

from __future__ import annotations

import json
from pathlib import Path
import subprocess

import datasets
import pytest
from test_env_code import lcb_row, make_env
from test_scripts_cli import run_script

from sdpo.config import ConfigError
from sdpo.envs import ENVIRONMENTS
from sdpo.envs.base import REPO_ROOT, MissingDataError

GSM8K_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
"""


def gsm8k_env(**overrides):
    cls = ENVIRONMENTS.get("gsm8k")
    config = cls.config_class()
    for key, value in overrides.items():
        setattr(config.hub, key, value)
    return cls(config)


def shipped_rows(split: str, n: int) -> list[dict]:
    lines = (REPO_ROOT / "data" / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_environments_read_the_repository_data_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    env = gsm8k_env()
    assert env.data_dir == REPO_ROOT / "data"
    assert len(env.load("test")) == 1319


def test_gsm8k_from_a_hub_repository_layout_equals_the_shipped_files(tmp_path):
    repo = tmp_path / "openai__gsm8k"
    (repo / "main").mkdir(parents=True)
    (repo / "README.md").write_text(GSM8K_README)
    for split in ("train", "test"):
        datasets.Dataset.from_list(shipped_rows(split, 12)).to_parquet(repo / "main" / f"{split}-00000-of-00001.parquet")
    from_hub = gsm8k_env(id=str(repo), name="main")
    local = gsm8k_env()
    for split in ("train", "test"):
        hub_problems = from_hub.load(split)
        assert len(hub_problems) == 12
        assert hub_problems == local.load(split)[:12]


def test_a_save_to_disk_folder_and_row_errors_name_the_row(tmp_path):
    rows = shipped_rows("test", 5)
    rows[3]["answer"] = "no final line"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(shipped_rows("train", 3)),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    env = gsm8k_env(id=str(tmp_path / "saved"))
    assert [p.data["answer"] for p in env.load("train")] == [p.data["answer"] for p in gsm8k_env().load("train")[:3]]
    with pytest.raises(ValueError, match=r"saved\[test\]:4: field 'answer': no final '#### <number>' line"):
        env.load("test")


def test_livecodebench_through_the_json_builder_as_the_preset_reads_the_hub(tmp_path):
    cases = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    rows = [lcb_row("in", "2025-03-01T00:00:00", cases, cases), lcb_row("out", "2024-01-01T00:00:00", cases, cases)]
    release = tmp_path / "test6.jsonl"
    release.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cls = ENVIRONMENTS.get("livecodebench")
    config = cls.config_class(time_limit_s=2.0)
    config.hub.id, config.hub.data_files = "json", str(release)
    tasks = cls(config).read_tasks()
    assert [t.id for t in tasks] == ["in"]  # the paper's contest-date window still applies


def test_missing_data_names_what_where_from_and_the_option(tmp_path):
    with pytest.raises(MissingDataError) as missing:
        ENVIRONMENTS.get("livecodebench")(ENVIRONMENTS.get("livecodebench").config_class()).read_tasks()
    message = str(missing.value)
    assert "\n" not in message
    assert message.startswith(f"LiveCodeBench: {REPO_ROOT / 'data' / 'livecodebench'} does not exist;")
    assert "env.hub.id=json env.hub.data_files=hf://datasets/livecodebench/code_generation_lite/test6.jsonl" in message
    assert "set env.data_dir" in message
    with pytest.raises(MissingDataError, match=r"could not load env.hub.id=.*no-such-folder"):
        gsm8k_env(id=str(tmp_path / "no-such-folder")).load("train")
    saved = tmp_path / "one-split"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(shipped_rows("test", 2))}).save_to_disk(str(saved))
    with pytest.raises(MissingDataError, match=r"has no split 'train' \(it has \['validation'\]\)"):
        gsm8k_env(id=str(saved)).load("train")
    with pytest.raises(FileNotFoundError, match="env.data_dir"):
        make_env("humaneval", data_dir=str(tmp_path)).load("test")


def test_hub_options_without_an_id_are_refused():
    cls = ENVIRONMENTS.get("gsm8k")
    config = cls.config_class()
    config.hub.revision = "abc123"
    with pytest.raises(ConfigError, match="need env.hub.id"):
        config.__post_init__()


@pytest.mark.slow  # a scripts/train.py process
def test_train_script_reports_missing_data_in_one_line(tmp_path):
    proc = run_script("train.py", "model=tiny", "rollout=hf", "env=livecodebench", cwd=tmp_path, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: LiveCodeBench: ") and "env.hub.id=json" in last and "env.data_dir" in last


def test_nothing_in_the_repository_names_a_folder_beside_it():
    # Code, configs, docs, tests, scripts, benchmarks and data: everything tracked. A clone stands alone.
    sibling = "../" + "shared"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.fail(f"git ls-files failed in {REPO_ROOT}: {tracked.stderr}")
    offenders = []
    for name in tracked.stdout.splitlines():
        path = REPO_ROOT / name
        if path.suffix in (".parquet", ".png", ".gz") or not path.is_file():
            continue
        if sibling in path.read_text(encoding="utf-8", errors="replace"):
            offenders.append(name)
    assert offenders == []
    assert Path(REPO_ROOT / "data" / "README.md").exists()
