"""Shared helpers for the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import numpy
    import torch

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "faiss": faiss_version,
        "loadavg_1_5_15min": os.getloadavg(),  # other work on the machine skews timings
        "git": git_state(),
    }


def git_state() -> str | None:
    """HEAD commit of the repository, with "+dirty" when tracked files under src/ are modified."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def busy_processes() -> list[str]:
    """Other processes using CPU right now (from /proc), so a timing run can say it was not alone."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[1:]
    except (OSError, subprocess.CalledProcessError):
        return []
    me = str(os.getpid())
    return [line.strip()[:120] for line in out if float(line.split()[1]) > 20 and line.split()[0] != me]


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"command": command(), "machine": machine(), **payload}, indent=2) + "\n")
    return path
