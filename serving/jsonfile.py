"""Read a JSON file someone else wrote, failing with one line that names the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[ValueError], missing: str) -> dict[str, Any]:
    """The JSON object at ``path``; ``error(missing)`` if there is no file, ``error("PATH: unreadable ...")``
    if it is not a readable JSON object. Each artifact reader passes its own error type."""
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as reason:
        raise error(f"{path}: unreadable ({reason})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: unreadable (not a JSON object)")
    return data
