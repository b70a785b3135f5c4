"""`env=dataset`: any local dataset, read through `datasets`, scored by reward functions in TRL's style.

    python scripts/train.py env=dataset env.path=my_data.jsonl env.prompt_column=question env.rewards=[math_verify]
    SDPOTrainer(train_dataset=Dataset.from_list(rows), reward_funcs=[my_reward])     # the same, from a notebook

Data: `env.path` is a .json / .jsonl / .parquet / .csv file (compressed too), a folder of such files (splits from
the file names, as `datasets` infers them) or a dataset saved with `save_to_disk`; or a `datasets.Dataset` handed to
the trainer. `env.train_split` / `env.eval_split` are split names of that dataset, with `datasets`' slicing for
files (`"env.train_split='train[:90%]'" "env.eval_split='train[90%:]'"`); `env.eval_path` points the eval split elsewhere.
A single file has one split, "train": without an eval split or `env.eval_path` there is no held-out set.

Prompts: the prompt column holds text (it becomes the user message, after `env.system_prompt` when set) or a chat
(a list of {"role", "content"} messages). Every other column reaches the reward functions (sdpo/envs/rewards.py).
A `privileged_context` column (`env.teacher_context_column`, TRL's name) is text only the self-teacher sees.
A missing column fails at load time, naming the columns the dataset has; so does a row whose value in a column that
is used (the prompt, env.id_column, a column a reward function names) is null or missing, naming file:line and the
field (for a handed-in `datasets.Dataset`: `train_dataset[index]`), unless `env.skip_bad_rows=true` leaves such rows
out (and logs how many).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass, field
import json
import logging
from pathlib import Path
from typing import Any

from sdpo.config import ConfigError, EnvConfig
from sdpo.envs.base import ENVIRONMENTS, DataError, Environment, Problem, Score
from sdpo.envs.rewards import RewardFunction, Rewards, resolve_reward, why_not_in_processes

log = logging.getLogger(__name__)

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}
_ROLES = ("system", "user", "assistant")


@dataclass
class DatasetEnvConfig(EnvConfig):
    _target_: str = "sdpo.envs.dataset.DatasetEnv"
    name: str = "dataset"
    # A local file, folder or saved dataset (relative paths: from the working directory). None: the trainer's
    # train_dataset= argument.
    path: str | None = None
    eval_path: str | None = None  # None: the eval split of `path`
    prompt_column: str = "prompt"
    id_column: str | None = None  # None: ids are "<split>/<row>"
    system_prompt: str | None = None
    # Reward functions: built-in names (math_verify, exact_match) or module:function; summed with reward_weights.
    rewards: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    answer_column: str = "answer"  # what the built-in rewards compare with
    # Text only the self-teacher sees (a reference solution, a hint), rendered into its reprompt
    # (algorithm.reprompt.data_context); TRL's column name. Rows without it (or None / "") have none.
    teacher_context_column: str | None = "privileged_context"
    # A row whose prompt, id or a column a reward function needs is null or missing (or malformed) is an error
    # naming its file:line and field; true: such rows are left out, and their number logged.
    skip_bad_rows: bool = False


@ENVIRONMENTS.register("dataset")
class DatasetEnv(Environment):
    """Rows of a dataset as problems; the reward functions score one completion at a time.

    `train_dataset` / `eval_dataset` (a `datasets.Dataset`, or a `DatasetDict` holding the configured splits) and
    `reward_funcs` (callables) stand in for `config.path` / `config.eval_path` / `config.rewards`.
    Picklable reward functions of importable modules run in killable worker processes; others (lambdas, closures,
    notebook functions) in threads, which cannot be stopped after a timeout.
    """

    config_class = DatasetEnvConfig

    def __init__(self, config: DatasetEnvConfig, train_dataset: Any = None, eval_dataset: Any = None,
                 reward_funcs: list[RewardFunction] | None = None) -> None:
        super().__init__(config)
        self._given = {"train": train_dataset, "eval": eval_dataset}
        if reward_funcs is None:
            reward_funcs = [resolve_reward(name, config.answer_column) for name in config.rewards]
        self.rewards = Rewards(reward_funcs, config.reward_weights)
        reason = why_not_in_processes(self.rewards.funcs)
        self.scoring_mode = "process" if reason is None else "thread"
        if reason is not None:
            log.warning("reward functions run in threads, not worker processes: %s. A thread cannot be stopped: a call "
                        "that takes longer than env.score_timeout_s=%g s gives its sample reward 0 and keeps running in "
                        "the background. Define the functions in an importable .py module to run them in worker "
                        "processes, which are killed on a timeout.", reason, config.score_timeout_s)

    def __getstate__(self) -> dict[str, Any]:
        # Scoring workers need the reward functions, not the data.
        return {**self.__dict__, "_given": {"train": None, "eval": None}}

    # -- data

    def load(self, split: str) -> list[Problem]:
        cfg: DatasetEnvConfig = self.config  # type: ignore[assignment]
        if not self.rewards.funcs:  # checked here, at the start of training, so that an env without them still builds
            raise ConfigError("env=dataset has no reward function: pass reward_funcs=[...] to SDPOTrainer or set "
                              "env.rewards (e.g. [math_verify], [exact_match] or [my_module:my_reward])")
        is_eval = split == cfg.eval_split and split != cfg.train_split
        dataset, where = self._split(split, is_eval)
        if dataset is None:
            # Expected when a notebook hands in training data only; worth a warning when a file lacks the split.
            log.log(logging.INFO if where == "train_dataset" else logging.WARNING,
                    "no held-out data: %s has no split %r; set env.eval_path, or env.eval_split (e.g. "
                    "env.train_split='train[:90%%]' env.eval_split='train[90%%:]'), or pass eval_dataset=", where, split)
            return []
        self._check_columns(dataset.column_names, where)
        problems, skipped = [], []
        for index, row in enumerate(dataset):
            try:
                problems.append(self._problem(row, index, split, where))
            except DataError as exc:
                if not cfg.skip_bad_rows:
                    exc.args = (f"{exc} (fix the row, or set env.skip_bad_rows=true to leave such rows out)",)
                    raise
                skipped.append(exc)
        if skipped:
            log.warning("%s: left out %d of %d rows with a null, missing or malformed value (env.skip_bad_rows=true); "
                        "the first: %s", where, len(skipped), len(skipped) + len(problems), skipped[0])
        return problems[: cfg.max_eval_rows if is_eval else cfg.max_train_rows]

    def _split(self, split: str, is_eval: bool) -> tuple[Any, str]:
        """(the split as a `datasets.Dataset` or None when the source has no such split, a name for messages)."""
        cfg: DatasetEnvConfig = self.config  # type: ignore[assignment]
        if is_eval and self._given["eval"] is not None:
            return _given_split(self._given["eval"], split, True, "eval_dataset"), "eval_dataset"
        if is_eval and cfg.eval_path:
            path = Path(cfg.eval_path).expanduser()
            # A file has one split, "train": that is the held-out data when it has no split named eval_split.
            dataset = read_split(path, split, required=False)
            return (read_split(path, "train") if dataset is None else dataset), cfg.eval_path
        if self._given["train"] is not None:
            return _given_split(self._given["train"], split, is_eval, "train_dataset"), "train_dataset"
        if cfg.path is None:
            raise ValueError("env=dataset needs data: set env.path (a .jsonl/.json/.parquet/.csv file, a folder of "
                             "them, or a save_to_disk folder) or pass train_dataset= to SDPOTrainer")
        return read_split(Path(cfg.path).expanduser(), split, required=not is_eval), cfg.path

    def _needed_columns(self) -> dict[str, str]:
        """The columns every row needs a value in, each with what names it."""
        cfg: DatasetEnvConfig = self.config  # type: ignore[assignment]
        needed = {cfg.prompt_column: "env.prompt_column"}
        if cfg.id_column:
            needed[cfg.id_column] = "env.id_column"
        for name, wanted in self.rewards.required_columns().items():
            needed |= {c: f"reward function {name}" for c in wanted if c not in needed}
        return needed

    def _check_columns(self, columns: list[str], where: str) -> None:
        missing = [f"{c!r} (named by {who})" for c, who in self._needed_columns().items() if c not in columns]
        if missing:
            raise ValueError(f"{where}: no column {', '.join(missing)}; its columns are: {', '.join(columns)}")

    def _problem(self, row: dict[str, Any], index: int, split: str, where: str) -> Problem:
        cfg: DatasetEnvConfig = self.config  # type: ignore[assignment]
        prompt = row[cfg.prompt_column]
        if where in ("train_dataset", "eval_dataset"):  # handed in: the row's index, as dataset[index] reads it
            where, line = f"{where}[{index}]", None
        else:
            line = index + 1  # the line of a JSON Lines file; the row number otherwise
        for column, who in self._needed_columns().items():
            if row.get(column) is None:  # a null, or a key the row lacks (`datasets` fills in null)
                raise DataError(where, line, column, f"missing (null), and {who} needs it")
        messages = chat_messages(prompt, cfg.system_prompt, where, line, cfg.prompt_column)
        problem_id = str(row[cfg.id_column]) if cfg.id_column else f"{split}/{index}"
        columns = {k: v for k, v in row.items() if k != cfg.prompt_column}
        context = row.get(cfg.teacher_context_column) if cfg.teacher_context_column else None
        if context is not None and not isinstance(context, str):
            raise DataError(where, line, cfg.teacher_context_column,
                            f"expected text (what only the teacher sees) or nothing, got {type(context).__name__}")
        return Problem(id=problem_id, messages=messages, data={"prompt": prompt, "columns": columns},
                       teacher_context=context or None)

    # -- scoring

    def score(self, problem: Problem, response: str, truncated: bool = False) -> Score:
        prompt = problem.data["prompt"]
        completion = response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]
        return self.rewards.score(prompt, completion, problem.data["columns"])


def chat_messages(prompt: Any, system_prompt: str | None, where: str, line: int, column: str) -> list[dict[str, str]]:
    """The chat the policy sees: a text prompt as the user message, or the row's own messages checked."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(where, line, column, "empty")
        return [*system, {"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(where, line, column, f"expected text or a list of chat messages, got {type(prompt).__name__}")
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and message.get("role") in _ROLES and isinstance(message.get("content"), str)):
            raise DataError(where, line, f"{column}[{i}]", 'expected {"role": system/user/assistant, "content": text}')
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(where, line, column, "the chat has no user message")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return system + messages if system and messages[0]["role"] != "system" else messages


def _given_split(given: Any, split: str, is_eval: bool, where: str) -> Any:
    """A handed-in dataset: a `Dataset` (or a list of rows) is the split itself; a `DatasetDict` (or dict) is looked
    up by name."""
    from datasets import Dataset

    if isinstance(given, list):
        given = Dataset.from_list(given)
    if isinstance(given, Dataset):
        if is_eval and where == "train_dataset":
            return None  # one Dataset is the training data only
        return given
    if split in given:
        return given[split]
    if is_eval:
        return None
    raise ValueError(f"{where} has no split {split!r} (it has: {', '.join(given)}); set env.train_split")


def read_split(path: Path, split: str, required: bool = True) -> Any:
    """One split of a local dataset as a `datasets.Dataset` (None if the source lacks it and it is not required)."""
    import datasets

    if not path.exists():
        raise FileNotFoundError(f"env.path: {path.resolve()} does not exist (a .jsonl/.json/.parquet/.csv file, a "
                                "folder of them, or a folder written by save_to_disk)")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.Dataset):  # a single saved Dataset: the training data
            return saved if required else None
        return _given_split(saved, split, not required, str(path))
    suffixes = [s for s in path.suffixes if s not in _COMPRESSION]
    if path.is_dir():
        args: dict[str, Any] = {"path": str(path)}
    elif suffixes and suffixes[-1] in _BUILDERS:
        args = {"path": _BUILDERS[suffixes[-1]], "data_files": str(path)}
    else:
        raise ValueError(f"env.path: {path} is not a .jsonl, .json, .parquet or .csv file")
    try:
        with _quiet("datasets"):  # its own ERROR line for a broken row counts rows its way; ours names the line
            return datasets.load_dataset(**args, split=split)
    except Exception as exc:
        broken = first_broken_json_line(path) if args["path"] == "json" and path.is_file() else None
        if broken is not None:  # datasets' reader failed on a line: say which, instead of its traceback
            raise broken from None
        if not isinstance(exc, ValueError) or ("Unknown split" not in str(exc) and "Bad split" not in str(exc)):
            raise
        if required:
            raise ValueError(f"{path}: no split {split!r} ({exc}); set env.train_split") from None
        return None


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """A library's log records below CRITICAL dropped inside the block (its failure still raises)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def first_broken_json_line(path: Path) -> DataError | None:
    """The first line of a JSON Lines file (or the place in a JSON file) that does not parse as a row, as an error
    naming file:line and what is wrong there; None when every line parses (compressed files are not read)."""
    if path.suffixes and path.suffixes[-1] in _COMPRESSION:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return DataError(path, exc.lineno, None, f"not valid JSON ({exc.msg}, column {exc.colno})")
        return None
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            return DataError(path, line, None, f"not valid JSON ({exc.msg}, column {exc.colno}): fix or remove "
                             "the line")
        if not isinstance(row, dict):
            return DataError(path, line, None, f"a row must be a JSON object, got {type(row).__name__}")
    return None
