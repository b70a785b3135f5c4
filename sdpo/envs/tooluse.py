"""Tool use (ToolAlpaca-derived, ReAct format): the paper's tool-use environment (docs/algorithm.md §6).

Data: `tooluse_sdpo/test.jsonl` is SDPO's exact test split (68 problems). SDPO's train split (4046 problems) is not
shipped: put it at `tooluse_sdpo/train.jsonl` (same fields), or read it with `env.hub` (a local folder in the
SDPO repository's layout, `datasets/tooluse` with its train/test JSON Lines files). Two extra held-out splits come from
the original ToolAlpaca eval files in the same prompt format: `eval_simulated` and `eval_real` (only the rows whose
gold inputs parse, `answer_parseable`).

Reward, as in SDPO: collect every `Action: <name>` and every `Action Input: {json}` of the response; reward 1 iff
the multiset of action names equals the gold one and the merged input dicts (later keys win) are equal.
Feedback is off by default, as in the paper, because the mismatch text reveals the answer. `feedback=format` only
says what could not be parsed; `feedback=full` gives SDPO's "Actions mismatch / Action inputs mismatch" text.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
import json
import re
from typing import Any

from sdpo.config import EnvConfig, check_choice
from sdpo.envs.base import ENVIRONMENTS, DataError, Environment, Problem, Score
from sdpo.envs.rows import data_file, get_field, read_jsonl

FEEDBACK_LEVELS = ["none", "format", "full"]
SPLIT_FILES = {
    "train": "train.jsonl",
    "test": "test.jsonl",
    "eval_simulated": "toolalpaca_eval_simulated.sdpo_format.jsonl",
    "eval_real": "toolalpaca_eval_real.sdpo_format.jsonl",
}
_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ACTION_INPUT = re.compile(r"Action[ \t]*Input[ \t]*:[ \t]*", re.IGNORECASE)
NO_ACTION_FEEDBACK = "No action found: use the format 'Action: <tool name>' followed by 'Action Input: <JSON object>'."


@dataclass
class ToolUseEnvConfig(EnvConfig):
    _target_: str = "sdpo.envs.tooluse.ToolUseEnv"
    name: str = "tooluse"
    folder: str = "tooluse_sdpo"
    feedback: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("env.feedback", self.feedback, FEEDBACK_LEVELS)


def parse_actions(response: str) -> tuple[list[str], dict[str, Any], list[str]]:
    """(action names, merged inputs, problems): every `Action:` line, every `Action Input:` JSON object."""
    names = [m.group(1) for m in _ACTION.finditer(response)]
    merged: dict[str, Any] = {}
    problems = []
    decoder = json.JSONDecoder()
    for match in _ACTION_INPUT.finditer(response):
        text = response[match.end() :].lstrip()
        try:
            value, _ = decoder.raw_decode(text)
        except json.JSONDecodeError:
            problems.append(f"Action Input is not valid JSON: {text[:80]!r}")
            continue
        if isinstance(value, dict):
            merged.update(value)
        else:
            problems.append(f"Action Input is not a JSON object: {json.dumps(value)[:80]}")
    return names, merged, problems


def gold_actions(answer_text: str, path, line: int) -> tuple[list[str], dict[str, Any]]:
    try:
        steps = json.loads(answer_text)
        names, merged = [], {}
        for step in steps:
            names.append(step["Action"])
            given = step.get("Action_Input") or "{}"
            merged.update(json.loads(given) if isinstance(given, str) else given)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DataError(path, line, "answer", f"expected a JSON list of {{Action, Action_Input}} ({exc})") from None
    return names, merged


@ENVIRONMENTS.register("tooluse")
class ToolUseEnv(Environment):
    config_class = ToolUseEnvConfig
    # SDPO's train split lives in its GitHub repository (lasgroup/SDPO, datasets/tooluse/train.json), not on the hub.
    hub_hint = "env.hub.id=<a copy of lasgroup/SDPO's datasets/tooluse folder>"
    scoring_mode = "inline"  # regexes and json.loads on one response: bounded work

    def load(self, split: str) -> list[Problem]:
        cfg: ToolUseEnvConfig = self.config  # type: ignore[assignment]
        name = {cfg.train_split: "train", cfg.eval_split: "test"}.get(split, split)
        if name not in SPLIT_FILES:
            raise ValueError(f"tooluse has splits {sorted(SPLIT_FILES)}, not {split!r}")
        what = "SDPO tool-use train split (not shipped; see docs/environments.md)" if name == "train" else "tool use"
        path, rows = self.read_rows(f"{cfg.folder}/{SPLIT_FILES[name]}", what, name)
        problems = []
        for line, row in rows:
            if row.get("answer_parseable") is False:
                continue
            names, inputs = gold_actions(get_field(row, "answer", str, path, line), path, line)
            problem_id = row.get("id") if row.get("id") is not None else row.get("idx")
            if problem_id is None:
                raise DataError(path, line, "idx", "missing (and no id)")
            messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
            messages.append({"role": "user", "content": get_field(row, "prompt", str, path, line)})
            problems.append(Problem(id=str(problem_id), messages=messages, data={"actions": names, "inputs": inputs}))
        limit = cfg.max_train_rows if name == "train" else cfg.max_eval_rows
        return problems[:limit]

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        level = self.config.feedback
        names, inputs, problems = parse_actions(response)
        gold_names, gold_inputs = problem.data["actions"], problem.data["inputs"]
        names_ok = Counter(names) == Counter(gold_names)
        inputs_ok = inputs == gold_inputs
        if names_ok and inputs_ok:
            return Score(1.0, "", {"status": "correct"})
        status = "no_action" if not names else ("wrong_action" if not names_ok else "wrong_input")
        lines = []
        if level != "none":
            lines += [NO_ACTION_FEEDBACK] if not names else problems
        if level == "full":
            if not names_ok:
                lines.append(f"Actions mismatch: predicted {names}, expected {gold_names}")
            if not inputs_ok:
                lines.append(f"Action inputs mismatch: predicted {inputs}, expected {gold_inputs}")
        return Score(0.0, "\n".join(lines), {"status": status})

    def follow_up(self, problem: Problem, response: str, score: Score) -> str:
        """Multi-turn episodes: the checker's verdict (at env.feedback's level) and another try. The tools' results
        cannot be computed here (ToolAlpaca's APIs were simulated by a language model and the data holds no outputs),
        so the reply is the checker's, not a tool's."""
        verdict = score.feedback or "That is not the right tool call."
        return f"{verdict}\nTry again: give the complete Action and Action Input lines."
