"""Names that become paths: the one rule every writer uses.

Class, group, run and stage names are the user's (an experiment file, the command line) and reach
the file system as folder names: the source cache (``<cache_dir>/<name>-<key>``), the loggers' run
folders (``tensorboard/source:cat/seed=0``), lock files. Here each becomes a name that stays inside
the folder it is joined to: no ``..``, no absolute path, no leading dot (a hidden or temporary
name), no byte a shell or another file system trips on, and short enough for a file system's
255-byte limit on one name.
"""

from __future__ import annotations

import hashlib
import re

UNSAFE = re.compile(r"[^A-Za-z0-9_.,:=+@-]+|\.{2,}")
# Most file systems allow 255 bytes a name; a long name is cut and keeps a hash of the whole, so two
# long names that share their start stay two folders.
NAME_MAX = 255


def safe_name(name: str, fallback: str = "run", max_length: int = 120) -> str:
    """``name`` as one folder or file name, at most ``max_length`` characters (ASCII, so bytes)."""
    safe = UNSAFE.sub("_", str(name)).strip("._") or fallback
    if len(safe) > max_length:
        digest = hashlib.sha256(str(name).encode()).hexdigest()[:8]
        safe = f"{safe[:max_length - 9].rstrip('._')}-{digest}"
    return safe


def safe_relative_path(name: str, fallback: str = "run") -> str:
    """A name whose ``/`` nests folders (a logger's run name, ``arm=dynamic/seed=0``) as a relative
    path of safe names: each part by ``safe_name``; empty, ``.`` and ``..`` parts dropped."""
    parts = [safe_name(part, fallback) for part in str(name).split("/") if part.strip(". ")]
    return "/".join(parts) or fallback
