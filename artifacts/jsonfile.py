"""Read a JSON file someone else wrote, failing with one line that names the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from artifacts.files import UnreadableFileError, read_regular_file

MAX_JSON_BYTES = 1 << 30  # a manifest or an index's keys for tens of millions of samples


def read_json(path: Path, error: type[ValueError], missing: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object at ``path``; ``error(missing)`` if there is no file, ``error("PATH: <why>")``
    if it is not a regular, readable file of at most ``max_bytes`` holding a JSON object. Each artifact
    reader passes its own error type."""
    path = Path(path)
    if not path.exists():
        raise error(missing)
    try:
        data = json.loads(read_regular_file(path, max_bytes))
    except UnreadableFileError as reason:
        raise error(f"{path}: {reason}") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as reason:
        raise error(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    return data
