"""Score a JSONL file of responses with any environment; print one JSON line per response.

    python scripts/score.py env=codecontests responses=FILE [split=test] [env.time_limit_s=2 ...]

Each input line names the problem and holds the response: {"id": "...", "response": "...", "truncated": false}
("truncated" is optional). Each output line: {"id", "reward", "feedback", "status", "score_s", "info"}, in input
order; a summary goes to stderr. Arguments other than `responses=` and `split=` are Hydra overrides of the usual
config (configs/config.yaml), so every env field can be set here; the script reads env.* only, and an override of
any other key (model.*, rollout.*, ...) is an error. Scoring runs through the environment's pool,
exactly as in training. For debugging environments; the tests use it too.
"""

from __future__ import annotations

import json
from pathlib import Path
import sys
import time

import _prelude  # noqa: F401 - this checkout's sdpo first; scoring never downloads anything

from sdpo.cli import check_used
from sdpo.config import ConfigError
from sdpo.envs import build_environment
from sdpo.hydra_config import load_config


def parse_args(argv: list[str]) -> tuple[Path, str | None, list[str]]:
    responses, split, overrides = None, None, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "responses":
            responses = Path(value)
        elif key == "split":
            split = value
        else:
            overrides.append(arg)
    if responses is None or not any(o.startswith("env=") for o in overrides):
        raise SystemExit("usage: python scripts/score.py env=<name> responses=FILE [split=test] [overrides...]")
    return responses, split, overrides


def read_responses(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("id"), (str, int)) or not isinstance(row.get("response"), str):
            raise SystemExit(f"{path}:{number}: each line needs \"id\" (the problem id) and \"response\" (text)")
        rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    responses_path, split, overrides = parse_args(argv)
    try:
        check_used(overrides, "scripts/score.py", uses=("env",))  # no model, no sampling: env.* only
        config = load_config(overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    env = build_environment(config.env)
    problems = {p.id: p for p in env.load(split or config.env.eval_split)}
    rows = read_responses(responses_path)
    missing = sorted({str(r["id"]) for r in rows} - set(problems))
    if missing:
        raise SystemExit(f"unknown problem ids (not in split {split or config.env.eval_split!r}): {missing[:5]}")
    start = time.monotonic()
    scores = env.score_batch(
        [problems[str(r["id"])] for r in rows], [r["response"] for r in rows], [bool(r.get("truncated")) for r in rows]
    )
    for row, score in zip(rows, scores):
        info = {k: v for k, v in score.info.items() if k not in ("status", "score_s")}
        record = {
            "id": row["id"], "reward": score.reward, "feedback": score.feedback,
            "status": score.info.get("status"), "score_s": round(score.info.get("score_s", 0.0), 4), "info": info,
        }
        print(json.dumps(record, ensure_ascii=False), flush=True)
    elapsed = time.monotonic() - start
    mean = sum(s.reward for s in scores) / max(len(scores), 1)
    print(f"scored {len(scores)} responses in {elapsed:.2f} s; mean reward {mean:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
