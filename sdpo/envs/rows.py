"""Reading data rows with errors that name the file, the line and the field .

Every environment reads local JSON Lines files (plain or .gz) under `env.data_dir`; a malformed row fails at load
time, never halfway through training.
"""

from __future__ import annotations

from collections.abc import Iterator
import gzip
import json
from pathlib import Path
from typing import Any

from sdpo.envs.base import DataError

_MISSING = object()


def data_file(data_dir: Path, relative: str, what: str) -> Path:
    """`data_dir / relative`, or a FileNotFoundError that says where it looked and what the file is."""
    path = Path(relative).expanduser()
    path = path if path.is_absolute() else data_dir / path
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: {path} does not exist. Set env.data_dir (now {data_dir}) to the folder that holds it; "
            "see docs/environments.md for where each data set comes from."
        )
    return path


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

