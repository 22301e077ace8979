"""Checks and writes of a sweep folder that must not leave it half-changed.

A sweep checks its folder before it writes anything, so that a bad `--out`
ends with one message and no partial files. Names that become path
components inside an output folder (the `--name` of a sweep, the file stem
of a probe) must be one plain component, so that they cannot point outside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stabiliscope.errors import ConfigError


def check_path_name(option: str, name: str) -> str:
    """Return `name` when it is one path component that stays inside its folder.

    Raises ConfigError for an empty name, `.` and `..`, and names that contain
    a path separator (`/` or `\\`), a NUL or another control character.
    """
    if not name:
        raise ConfigError(f"{option} is empty; expected a plain name such as depth-sweep")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(
            f"{option} {name!r} contains a path separator or is '.' or '..'; expected a plain name "
            "such as depth-sweep, which cannot point outside the output folder"
        )
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        raise ConfigError(
            f"{option} {name!r} contains a control character; expected a plain name such as depth-sweep"
        )
    return name


def prepare_sweep_folder(out: Path) -> None:
    """Create the sweep folder `out` when needed; raise ConfigError when it is not a writable folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep folder {str(out)!r} is a file; pass a folder path with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create sweep folder {str(out)!r}: {error.strerror}; "
            "pass a folder you can write to with --out"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(
            f"sweep folder {str(out)!r} is not writable; pass a folder you can write to with --out"
        )


def write_json_atomic(path: Path, values: Any) -> None:
    """Write `values` as indented JSON to `path` through a temporary file and a rename.

    Readers, and shards that write the same file at the same time, see either
    the old or the new content, never a partial file.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(temporary, path)
