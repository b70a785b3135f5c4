"""A teacher model other than the policy (algorithm.teacher.kind=external, docs/algorithm.md §11): where its weights
come from, how they are checked against the policy, and how rows are routed between several of them.

`ExternalWeights` is a weight source like the policy's own (`sdpo.teacher.weights`, registered as "external" in
`WEIGHT_SOURCES`): it answers the same calls (`use`, `place`, `parameters`, `release`, `update`, `state_dict`, ...),
so that the teacher that scores with it is the same `Teacher` object, with any context (`TEACHER_CONTEXTS`) and any
distillation mode. Its weights are loaded once, frozen, in `algorithm.teacher.dtype` (default: the policy's), with
the policy's attention implementation; nothing of them is saved in a checkpoint (a resumed run loads them again).

A teacher must share the policy's tokenizer: its log-probs are read at the policy's token ids, and logit-level modes
compare the two distributions entry by entry. `check_tokenizer` refuses, at start, a teacher whose tokenizer's
vocabulary or output head differs from the policy's.

Several teachers (`algorithm.teacher.models` + `key`): `TeacherRouter` gives each row the index of the teacher its
data column names; the teacher forwards each teacher's rows apart, and `RoutedHead` turns the joined features back
into each row's own teacher's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.checkpoint import latest_checkpoint
from sdpo.config.checks import ConfigError
from sdpo.models import DTYPES, is_adapter_dir, reshard, unwrap
from sdpo.teacher.choices import TEACHER_SCORERS, WEIGHT_SOURCES


def teacher_dir(path: str, key: str) -> Path:
    """The folder `algorithm.teacher.<key>=path` names: a model folder (config.json, or a LoRA adapter's
    adapter_config.json; a run's checkpoints/step-N/ and checkpoints/best/ are such folders), or a run directory,
    whose newest complete checkpoints/step-N/ is taken (the final checkpoint of a finished run)."""
    folder = Path(path).expanduser()
    if (folder / "config.json").exists() or is_adapter_dir(folder):
        return folder
    newest = latest_checkpoint(folder / "checkpoints")
    if newest is not None:
        return newest
    raise ConfigError(f"algorithm.teacher.{key}={path}: neither a model folder (config.json, as save_pretrained "
                      "writes it) nor a run directory with a complete checkpoints/step-N/")


def load_teacher_model(folder: Path, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    """The teacher's weights, frozen and in eval mode (a LoRA adapter is merged into its base model)."""
    from sdpo.config import ModelConfig
    from sdpo.models import load_model

    name = next(n for n, d in DTYPES.items() if d == dtype)
    config = ModelConfig(name_or_path=str(folder), dtype=name, **(
        {"attn_implementation": attn_implementation} if attn_implementation else {}))
    return load_model(config, folder).requires_grad_(False).eval()


class ExternalWeights:
    """Frozen teacher models of their own: one (`algorithm.teacher.model`) or one per route (`models`)."""

    def __init__(self, policy: nn.Module, config: Any) -> None:
        if not (config.model or config.models):
            raise ConfigError("algorithm.teacher.kind=external needs a teacher model: algorithm.teacher.model=<path> "
                              "(a model folder or a run directory), or algorithm.teacher.models={value: path, ...} "
                              "with algorithm.teacher.key=<data column>")
        self.paths = [("model", config.model)] if config.model else [(f"models.{k}", p) for k, p in config.models.items()]
        self.folders = [teacher_dir(path, key) for key, path in self.paths]
        dtype = DTYPES[config.dtype] if config.dtype else next(policy.parameters()).dtype
        attn = getattr(unwrap(policy).config, "_attn_implementation", None)
        # Loaded here only where the trainer runs them (a server of the teacher holds its own: scorer=server).
        in_update = TEACHER_SCORERS.get(config.scorer).forward_in_update
        self.models = [load_teacher_model(folder, dtype, attn) for folder in self.folders] if in_update else []
        self.vocab_size = _output_size(policy)

    @property
    def model(self) -> nn.Module | None:
        return self.models[0] if self.models else None

    def check_tokenizer(self, tokenizer: Any) -> None:
        """At start: each teacher's tokenizer (saved in its folder) has the policy's vocabulary, and its output head
        the policy's size."""
        from transformers import AutoTokenizer

        if tokenizer is None:
            raise ValueError("an external teacher is checked against the policy's tokenizer: pass it (build_teacher)")
        ours = tokenizer.get_vocab()
        for (key, path), folder in zip(self.paths, self.folders, strict=True):
            where = f"algorithm.teacher.{key}={path}"
            try:
                theirs = AutoTokenizer.from_pretrained(folder).get_vocab()
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(f"{where}: no tokenizer in {folder} to check against the policy's ({type(exc).__name__}); "
                                  f"save the teacher's with tokenizer.save_pretrained({str(folder)!r})") from exc
            if theirs != ours:
                differ = sorted(set(theirs.items()) ^ set(ours.items()))[:2]
                raise ConfigError(f"{where}: its tokenizer's vocabulary differs from the policy's ({len(theirs)} tokens "
                                  f"against {len(ours)}; e.g. {differ}): a teacher must share the policy's tokenizer")
            size = _folder_output_size(folder)
            if size != self.vocab_size:
                raise ConfigError(f"{where}: its output head has {size} entries, the policy's {self.vocab_size}: a "
                                  "teacher must share the policy's tokenizer and vocabulary size")

    def use(self, policy: nn.Module, route: int = 0) -> contextlib.AbstractContextManager[nn.Module]:
        return contextlib.nullcontext(self.models[route])

    def place(self, policy: nn.Module, prepare_copy: Callable[[nn.Module], nn.Module]) -> None:
        self.models = [prepare_copy(model) for model in self.models]

    def parameters(self) -> list[Tensor]:
        return [p for model in self.models for p in model.parameters()]

    def release(self) -> None:
        for model in self.models:
            reshard(model)

    def update(self, policy: nn.Module) -> None:
        """Frozen: an external teacher never moves."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}  # loaded from its folder at every start

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


def _output_size(model: nn.Module) -> int:
    return int(getattr(unwrap(model), "config").vocab_size)


def _folder_output_size(folder: Path) -> int:
    """The vocabulary size of the model a folder holds (a LoRA adapter: its base model's)."""
    from transformers import AutoConfig

    if is_adapter_dir(folder):
        from peft import PeftConfig

        folder = Path(PeftConfig.from_pretrained(folder).base_model_name_or_path or "").expanduser()
    return int(AutoConfig.from_pretrained(folder).vocab_size)


WEIGHT_SOURCES.register("external")(lambda policy, copy_policy, config: ExternalWeights(policy, config))


def row_value(problem: Any, key: str) -> Any:
    """The data column `key` of a problem's row: env=dataset keeps a row's columns in data["columns"]; other
    environments' problems carry their fields in `data` itself."""
    columns = problem.data.get("columns")
    if isinstance(columns, dict) and key in columns:
        return columns[key]
    if key in problem.data:
        return problem.data[key]
    fields = sorted(columns if isinstance(columns, dict) else problem.data)
    raise ConfigError(f"algorithm.teacher.key={key}: problem {problem.id!r} has no such column ("
                      f"{'its columns: ' + ', '.join(fields) if fields else 'it has none'})")


class TeacherRouter:
    """Each row's teacher, by the value of its data column `key` (`algorithm.teacher.models`' keys, in order)."""

    def __init__(self, key: str, names: Sequence[str]) -> None:
        self.key, self.names = key, [str(n) for n in names]
        self.index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def routes(self, problems: Sequence[Any]) -> Tensor:
        """[B] long: the teacher of each row; a row whose value names no teacher is an error."""
        out = []
        for problem in problems:
            value = str(row_value(problem, self.key))
            if value not in self.index:
                raise ConfigError(f"algorithm.teacher.key={self.key}: problem {problem.id!r} has {self.key}={value!r}, "
                                  f"which algorithm.teacher.models does not name (it names {', '.join(self.names)}): "
                                  "add a teacher for it")
            out.append(self.index[value])
        return torch.tensor(out, dtype=torch.long)


class RoutedHead:
    """The logits of rows scored by different teachers, grouped: rows spans[k] by heads[k], which reads the first
    widths[k] features (the joined features are padded to the widest teacher's)."""

    def __init__(self, heads: Sequence[Callable[[Tensor], Tensor]], spans: Sequence[slice], widths: Sequence[int]) -> None:
        self.heads, self.spans, self.widths = list(heads), list(spans), list(widths)

    def __call__(self, values_bCX: Tensor) -> Tensor:
        parts = [head(values_bCX[span, :, :width]) for head, span, width in zip(self.heads, self.spans, self.widths)]
        dtype = parts[0].dtype if all(p.dtype == parts[0].dtype for p in parts) else torch.float32
        return torch.cat([p.to(dtype) for p in parts])
