"""Reading data rows with errors that name the file, the line and the field.

Environments read JSON Lines files (plain or .gz) under `env.data_dir` (the repository's `data/` by default), or a
Hugging Face data set named by `env.hub` (a hub id through `datasets.load_dataset`, or a local copy in the hub's
layout); a malformed row fails at load time, never halfway through training.
"""

from __future__ import annotations

from collections.abc import Iterator
import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

_MISSING = object()


class DataError(ValueError):
    """A malformed data row; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int | None, field_name: str | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: field {field_name!r}: {problem}" if field_name else f"{where}: {problem}")


class MissingDataError(FileNotFoundError):
    """A data set that is not there; the message says what is missing, where to get it and which option to set."""


def data_file(data_dir: Path, relative: str, what: str, hub_hint: str | None = None) -> Path:
    """`data_dir / relative`, or a MissingDataError that says what is missing, where to get it and what to set."""
    path = Path(relative).expanduser()
    path = path if path.is_absolute() else data_dir / path
    if not path.exists():
        source = f"get it from the Hugging Face hub ({hub_hint}) or " if hub_hint else ""
        raise MissingDataError(
            f"{what}: {path} does not exist; {source}set env.data_dir (now {data_dir}) to a folder that holds "
            f"{relative} (docs/environments.md says where each data set comes from)"
        )
    return path


def hub_rows(hub: Any, split: str | None, what: str) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """(name, rows) of one split of the data set `env.hub` names: a hub id (the hub's cache serves it offline once
    downloaded), a local folder in the hub's layout, or a `save_to_disk` folder. Rows are numbered from 1."""
    import datasets

    local = Path(hub.id).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(hub.id, name=hub.name, revision=hub.revision, data_files=hub.data_files)
    except RuntimeError as exc:  # datasets >= 4 refuses repositories that need a loading script
        raise MissingDataError(
            f"{what}: env.hub.id={hub.id} cannot be loaded by `datasets` ({str(exc).splitlines()[0]}); read its data "
            f"files with the json builder instead: env.hub.id=json env.hub.data_files=hf://datasets/{hub.id}/<file>"
        ) from None
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise MissingDataError(
            f"{what}: could not load env.hub.id={hub.id}"
            + (f" (revision {hub.revision})" if hub.revision else "")
            + f": {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Download it once with network "
            "access (the scripts run offline unless HF_HUB_OFFLINE=0 is set; the hub's cache then serves it offline) "
            "or set env.hub.id to a local copy in the hub's layout"
        ) from None
    if isinstance(loaded, datasets.Dataset):  # a save_to_disk folder of one split
        loaded = datasets.DatasetDict({hub.split or "train": loaded})
    wanted = split if split is not None else hub.split
    if wanted is None:
        if len(loaded) != 1:
            raise MissingDataError(
                f"{what}: env.hub.id={hub.id} has splits {sorted(loaded)}; set env.hub.split to the one to read"
            )
        wanted = next(iter(loaded))
    if wanted not in loaded:
        raise MissingDataError(
            f"{what}: env.hub.id={hub.id} has no split {wanted!r} (it has {sorted(loaded)}); "
            + ("set env.hub.split" if split is None else "map the files to it with env.hub.data_files={" + wanted + ": ...}")
        )
    where = f"{hub.id}" + (f"@{hub.revision}" if hub.revision else "") + f"[{wanted}]"
    return where, ((number, _as_json(row)) for number, row in enumerate(loaded[wanted], start=1))


def _as_json(row: dict[str, Any]) -> dict[str, Any]:
    """A hub row as its JSON Lines file holds it: Arrow's inferred dates and times back to ISO text."""
    return {k: v.isoformat() if isinstance(v, (dt.date, dt.time)) else v for k, v in row.items()}


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line; a line that is not a JSON object is a DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, "<line>", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(path, number, "<line>", f"expected a JSON object, got {type(record).__name__}")
            yield number, record


def get_field(
    record: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path, line: int, default: Any = _MISSING
) -> Any:
    """record[name], checked against `kind`; missing or mistyped is a DataError unless a default is given."""
    if name not in record or record[name] is None:
        if default is not _MISSING:
            return default
        raise DataError(path, line, name, "missing")
    value = record[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise DataError(path, line, name, f"expected {names}, got {type(value).__name__}")
    if isinstance(value, str) and str in _as_tuple(kind) and not value.strip() and default is _MISSING:
        raise DataError(path, line, name, "empty")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
