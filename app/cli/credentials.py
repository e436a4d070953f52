"""Where the CLI keeps its login: ``STUDIO_API_KEY`` wins, else a per-API-URL entry in a 0600 file
(``STUDIO_CREDENTIALS_FILE``, default ``~/.config/fine-tuning-studio/credentials.json``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def credentials_file() -> Path:
    default = Path.home() / ".config" / "fine-tuning-studio" / "credentials.json"
    return Path(os.environ.get("STUDIO_CREDENTIALS_FILE", default))


def _read() -> dict[str, str]:
    path = credentials_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def load_token(api_url: str) -> str | None:
    return os.environ.get("STUDIO_API_KEY") or _read().get(api_url)


def save_token(api_url: str, token: str) -> Path:
    return _write(_read() | {api_url: token})


def forget_token(api_url: str) -> bool:
    data = _read()
    if data.pop(api_url, None) is None:
        return False
    _write(data)
    return True


def _write(data: dict[str, str]) -> Path:
    """Write a private temporary file, then rename it over the old one: never readable by others, never
    half-written."""
    path = credentials_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials-")  # created 0600
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
    os.replace(tmp, path)
    return path
