"""Science QA: SciKnowEval L3 multiple choice, the paper's exact splits and prompt (docs/algorithm.md §6).

Data: `sciknoweval_sdpo/<domain>/{train,test}.jsonl`, the files of the official SDPO code. The system prompt is
the row's own (`system`, asking for `<reasoning>...</reasoning><answer>X</answer>`); the user message is the row's
`prompt` (`{question}\n\n{choices}\nPlease reason step by step.`). Reward, as in SDPO: the text between the last
`<answer>` and the following `</answer>`, stripped, must equal the gold letter.

Feedback: none by default, as in the paper (the teacher learns from sibling solutions only). `feedback=format`
says when the answer tag is missing; `feedback=full` also says that the chosen letter is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdpo.config import EnvConfig, check_choice
from sdpo.envs.base import ENVIRONMENTS, DataError, Environment, Problem, Score
from sdpo.envs.rows import data_file, get_field, read_jsonl

DOMAINS = ["biology", "chemistry", "material", "physics"]
FEEDBACK_LEVELS = ["none", "format", "full"]
NO_ANSWER_FEEDBACK = (
    "No answer found: the response must end with <answer>X</answer>, where X is only the letter of the chosen option."
)


@dataclass
class ScienceEnvConfig(EnvConfig):
    _target_: str = "sdpo.envs.science.ScienceEnv"
    name: str = "science"
    # Paper runs train and evaluate one domain at a time (e.g. env.domains=[chemistry]).
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    folder: str = "sciknoweval_sdpo"
    feedback: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        for domain in self.domains:
            check_choice("env.domains[]", domain, DOMAINS)
        check_choice("env.feedback", self.feedback, FEEDBACK_LEVELS)


def last_answer(response: str) -> str | None:
    """Text between the last `<answer>` and the next `</answer>` (or the end), stripped; None without the tag."""
    if "<answer>" not in response:
        return None
    return response.rsplit("<answer>", 1)[1].split("</answer>", 1)[0].strip()


@ENVIRONMENTS.register("science")
class ScienceEnv(Environment):
    config_class = ScienceEnvConfig
    scoring_mode = "inline"  # a string split: nothing to time out

    def load(self, split: str) -> list[Problem]:
        cfg: ScienceEnvConfig = self.config  # type: ignore[assignment]
        file_split = {cfg.train_split: "train", cfg.eval_split: "test"}.get(split, split)
        if file_split not in ("train", "test"):
            raise ValueError(f"science has splits 'train' and 'test', not {split!r}")
        problems = []
        for domain in cfg.domains:
            path = data_file(self.data_dir, f"{cfg.folder}/{domain}/{file_split}.jsonl", f"SciKnowEval {domain}")
            for line, row in read_jsonl(path):
                answer = get_field(row, "answer", str, path, line).strip()
                if answer not in ("A", "B", "C", "D"):
                    raise DataError(path, line, "answer", f"expected a letter A-D, got {answer!r}")
                messages = [
                    {"role": "system", "content": get_field(row, "system", str, path, line)},
                    {"role": "user", "content": get_field(row, "prompt", str, path, line)},
                ]
                idx = get_field(row, "idx", int, path, line)
                problems.append(Problem(id=f"{domain}/{idx}", messages=messages, data={"answer": answer, "domain": domain}))
        limit = cfg.max_train_rows if file_split == "train" else cfg.max_eval_rows
        return problems[:limit]

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        level = self.config.feedback
        predicted = last_answer(response)
        if predicted is None:
            return Score(0.0, NO_ANSWER_FEEDBACK if level != "none" else "", {"status": "no_answer"})
        if predicted == problem.data["answer"]:
            return Score(1.0, "", {"status": "correct"})
        feedback = f"The answer {predicted[:20]!r} is not correct." if level == "full" else ""
        return Score(0.0, feedback, {"status": "wrong_answer", "predicted": predicted[:20]})
