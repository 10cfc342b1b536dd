"""Where a measured figure came from: the command, the commit, the machine and how busy it was.

Scripts that print figures for the docs add this to the JSON they write, so a
figure kept under docs/results/ says which command produced it, on which
code, and beside how much other work (a shared 2-core VM: the load averages
at the start and at the end of the run are part of the result).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

from harness.paths import ROOT


def git_commit() -> str | None:
    """The short commit of this working tree, with '-dirty' when it has uncommitted changes to tracked files."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def command_line(argv: list[str] | None = None) -> str:
    """How this program was run, as the docs write it: `python scripts/x.py ...` or `python -m package.module ...`."""
    program = Path(sys.argv[0]).resolve()
    try:
        relative = program.relative_to(ROOT)
        runner = f"python {relative}" if relative.parts[0] == "scripts" else \
            "python -m " + ".".join(relative.with_suffix("").parts)
    except ValueError:
        runner = program.name
    return " ".join([runner, *(sys.argv[1:] if argv is None else argv)])


def provenance(argv: list[str] | None = None) -> dict:
    """Command line, commit, date, machine and load average now (call again at the end: `finished`)."""
    return {
        "command": command_line(argv),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cores": psutil.cpu_count(), "python": platform.python_version(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def finished(record: dict) -> dict:
    """`record` with the load average at the end of the run added."""
    return {**record, "load_average_1m_at_end": round(os.getloadavg()[0], 2)}


def write(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_json(path: Path) -> dict:
    """A results file a command reads back (a benchmark run, a memory measurement): a JSON object, or ValueError
    naming the file (a missing or malformed one gave FileNotFoundError or JSONDecodeError tracebacks)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the object this command reads")
    return data
