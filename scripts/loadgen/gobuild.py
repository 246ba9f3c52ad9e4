"""Build the Go programs of the bench on first use, offline, into a cache directory.

Two programs are written in Go: the compiled peers (``scripts/peers/go_ws``,
the ``go-ws`` and ``go-coalesce`` servers) and the compiled load engine
(``scripts/loadgen/engine``). They are built with Debian's ``golang-go``
and ``golang-github-gorilla-websocket-dev`` in GOPATH mode
(``GOPATH=/usr/share/gocode GO111MODULE=off``), so nothing is downloaded;
``GOFLAGS=-mod=vendor`` and the module proxy are never involved.

The binary lands in ``$CHATD_BENCH_CACHE`` (default
``$XDG_CACHE_HOME/chatd-bench``, else ``~/.cache/chatd-bench``) under a
name that carries a hash of its sources and of ``go version``, so an edit
rebuilds and concurrent runs build once (a lock file).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Program name -> its source directory (package main).
PROGRAMS = {
    "go-ws": REPO / "scripts" / "peers" / "go_ws",
    "loadgen-engine": REPO / "scripts" / "loadgen" / "engine",
}
#: Where Debian installs Go sources (golang-github-gorilla-websocket-dev).
DEBIAN_GOPATH = "/usr/share/gocode"
GORILLA = Path(DEBIAN_GOPATH) / "src" / "github.com" / "gorilla" / "websocket"


def cache_dir() -> Path:
    base = os.environ.get("CHATD_BENCH_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "chatd-bench"


def go_problem(program: str = "go-ws") -> str | None:
    """Why ``program`` cannot be built here, in a few words; None if it can."""
    if shutil.which("go") is None:
        return "go not found (Debian: apt-get install golang-go)"
    if program == "go-ws" and not GORILLA.is_dir():
        return f"gorilla/websocket not in {GORILLA.parent.parent.parent} " \
               "(Debian: apt-get install golang-github-gorilla-websocket-dev)"
    return None


def _fingerprint(source: Path) -> str:
    digest = hashlib.sha256()
    version = subprocess.run(["go", "version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    for path in sorted(source.glob("*.go")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def go_binary(program: str) -> Path:
    """The built ``program``, building it first if the cache lacks this version.

    Raises SystemExit with one line if Go cannot be had or the build fails.
    """
    problem = go_problem(program)
    if problem:
        raise SystemExit(f"loadtest: cannot build {program}: {problem}")
    source = PROGRAMS[program]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"{program}-{_fingerprint(source)}"
    if binary.exists():
        return binary
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        print(f"loadtest: building {program} with go (GOPATH mode, offline) into {cache}",
              file=sys.stderr)
        env = {**os.environ, "GOPATH": DEBIAN_GOPATH, "GO111MODULE": "off",
               "GOCACHE": str(cache / "gocache"), "GOFLAGS": "", "GOPROXY": "off",
               "CGO_ENABLED": "0"}
        partial = binary.with_suffix(".tmp")
        proc = subprocess.run(["go", "build", "-o", str(partial), "."], cwd=source, env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"loadtest: building {program} failed: {detail}")
        partial.rename(binary)
    return binary
