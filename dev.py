#!/usr/bin/env python3
"""Set up and run awq-nb on a fresh Linux machine that has only python3.

    python3 dev.py demo    # quantize the bundled SmolLM2 with AWQ; fp vs RTN vs AWQ table (offline)
    python3 dev.py test    # the test suite
    python3 dev.py setup   # only create/refresh the virtualenv (.venv)

The virtualenv is created once and refreshed when a requirements file changes. The CPU build
of torch is pinned (requirements-dev.txt), so nothing pulls a multi-GB CUDA build.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
REQS = ["requirements.txt", "requirements-dev.txt", "requirements-offline.txt", "requirements-test.txt", "pyproject.toml"]


def sh(*cmd: str, **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def setup() -> None:
    stamp = VENV / ".awq-nb-stamp"
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in REQS if (ROOT / f).exists())).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and PY.exists():
        return
    if not PY.exists():
        sh(sys.executable, "-m", "venv", str(VENV))
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    sh(*pip, "-c", "requirements-dev.txt", "torch==2.13.0")
    sh(*pip, "-c", "requirements-dev.txt", "-r", "requirements.txt", "-r", "requirements-dev.txt", "-r", "requirements-test.txt")
    sh(*pip, "--no-deps", "-r", "requirements-offline.txt")
    sh(*pip, "--no-deps", "-e", ".")
    stamp.write_text(digest)


def parallel(args: list[str], env: dict) -> list[str]:
    """pytest-xdist options that run the suite on every core (at most 4 workers: each may hold a
    real model), with one intra-op thread per worker unless OMP_NUM_THREADS is set: most tests
    are small ops where a second thread mostly waits (timings in docs/benchmarks.md). Pass ``-n 0``
    to run in one process."""
    if "no:xdist" in args or any(a in ("-n", "--numprocesses") or a.startswith(("-n=", "--numprocesses=")) for a in args):
        return []
    cores = os.cpu_count() or 1
    workers = min(4, cores)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
    return ["-n", str(workers), "--dist", "worksteal"]


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    if cmd not in ("setup", "demo", "test"):
        print(__doc__)
        return 0 if cmd in ("help", "-h", "--help") else 2
    setup()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if cmd == "demo":
        return subprocess.run([str(PY), "-m", "awq_nb", "demo", *argv[1:]], cwd=ROOT, env=env).returncode
    if cmd == "test":
        return subprocess.run([str(PY), "-m", "pytest", "-q", *parallel(argv[1:], env), *argv[1:]], cwd=ROOT, env=env).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
