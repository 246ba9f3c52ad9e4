"""PostgreSQL for the tests, real servers only.

- ``pg_url``: an empty database for one test. The run gets a fresh
  database of its own on the machine's server (``CHATD_TEST_POSTGRES``,
  default ``postgresql://postgres@127.0.0.1:5432/test``: trust auth), or,
  if none is reachable, on a private server made with ``initdb`` and
  ``pg_ctl`` from PATH; each test then starts from an empty schema.
- ``pg_private``: a private server on a free port, for tests that stop or
  restart it (never the machine's).

When PostgreSQL cannot be had these tests skip, except under ``CI=true``,
where they fail: CI must never pass without them.

Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid

import psycopg
import pytest

from tests.conftest import free_port

ADMIN_URL = os.environ.get("CHATD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL tests cannot run: {why}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {why}")


class PrivatePostgres:
    """A PostgreSQL server of the tests' own, from ``initdb``/``pg_ctl`` on
    PATH, on 127.0.0.1 and a free port, with trust auth for ``postgres``.
    Run as the ``postgres`` user when the tests run as root (PostgreSQL
    refuses root)."""

    def __init__(self) -> None:
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            unavailable("initdb and pg_ctl are not on PATH")
        self.dir = tempfile.mkdtemp(prefix="chatd-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-N",
                  "-E", "UTF8", "--locale=C")
        self.start()

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            unavailable(f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=50")
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l",
                  os.path.join(self.dir, "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients get 'terminating connection due to
        administrator command'; ``immediate``: as a crash."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        subprocess.run([*self.as_user, "pg_ctl", "-D", self.data, "-m", "immediate", "-w",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def _reachable(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


def with_database(url: str, dbname: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + dbname


@pytest.fixture(scope="session")
def pg_run_database():
    """A database of this run's own: (its URL, the admin URL that made it)."""
    private = None
    admin = ADMIN_URL
    if not _reachable(admin):
        private = PrivatePostgres()
        admin = private.url
    name = f"chatd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield with_database(admin, name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    if private is not None:
        private.destroy()


@pytest.fixture
def pg_url(pg_run_database):
    """An empty database (this run's, its schema emptied) for one test."""
    with psycopg.connect(pg_run_database, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return pg_run_database


@pytest.fixture(scope="session")
def pg_private_server():
    server = PrivatePostgres()
    yield server
    server.destroy()


@pytest.fixture
def pg_private(pg_private_server):
    """The private server, running, with an empty database ``chatd``."""
    server = pg_private_server
    if not _reachable(server.url):
        server.start()
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS chatd WITH (FORCE)")
        conn.execute("CREATE DATABASE chatd")
    return server
