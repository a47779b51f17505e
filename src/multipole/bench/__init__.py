"""Benchmarks behind ``multipole bench``: each checks its outputs before timing them."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_revision(path: str | Path | None = None) -> str:
    """The commit of the checkout holding ``path`` (default: this package), with ``+dirty``
    when tracked files differ from it, so that a report says which code made it; ``unknown``
    outside a git checkout."""
    where = Path(__file__).parent if path is None else Path(path)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=where)
        except OSError:  # no git
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "--short", "HEAD")
    if not sha:
        return "unknown"
    changes = git("status", "--porcelain", "--untracked-files=no")
    return f"{sha}+dirty" if changes else sha
