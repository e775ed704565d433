"""A throwaway PostgreSQL server for the tests and the benchmarks.

Where the server comes from, first match wins:

1. ``PERFMON_TEST_DSN``: an existing server (CI or a developer's); nothing is started.
2. Server binaries: ``PG_BIN``, else ``pg_config --bindir``, else the newest
   ``/usr/lib/postgresql/*/bin``, else the binaries bundled in the ``pgserver`` wheel.
   ``initdb`` + ``pg_ctl`` build a cluster in a temporary directory, on a free port. PostgreSQL
   refuses to run as root, so as root the commands run as ``nobody`` through ``setpriv``.

Fixtures (``from tests._postgres import *`` in ``conftest.py``):

* ``postgres_dsn`` (session): the DSN of a server shared by the whole run.
* ``postgres_cluster`` (function): a separate :class:`PostgresCluster` of its own, which the
  test may ``stop()`` and ``start()`` again.

Both skip the test when there is no server and no binaries to start one.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = [
    "PostgresCluster",
    "find_bin_dir",
    "postgres_cluster",
    "postgres_dsn",
    "start_postgres",
]

_COMMAND_TIMEOUT_S = 60
_SERVER_SETTINGS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
    "-c full_page_writes=off -c max_connections=200"
)


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or ``None`` if there is none."""
    system = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major_version, reverse=True)
    candidates = [os.environ.get("PG_BIN"), _pg_config_bindir(), *system, _pgserver_bindir()]
    for candidate in candidates:
        if candidate and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _pg_config_bindir() -> str | None:
    if shutil.which("pg_config") is None:
        return None
    result = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or None


def _major_version(path: str) -> int:
    version = Path(path).parent.name
    return int(version) if version.isdigit() else 0


def _pgserver_bindir() -> str | None:
    """The binaries inside the ``pgserver`` wheel, found without importing it."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresCluster:
    """A PostgreSQL cluster in a temporary directory, which can be stopped and started again."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.directory = Path(tempfile.mkdtemp(prefix="perfmon-pg-"))
        self.port = _free_port()
        self._as_user: list[str] = []
        try:
            if os.geteuid() == 0:
                self._drop_privileges_to("nobody")
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        except BaseException:  # a failed or interrupted initdb must not leave the directory
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.directory / "data"

    @property
    def dsn(self) -> str:
        """A DSN over TCP on 127.0.0.1, as user ``postgres`` (trust authentication)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-k {self.directory} -p {self.port} {_SERVER_SETTINGS}"
        log = str(self.directory / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends sessions cleanly, ``immediate`` kills them."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def is_running(self) -> bool:
        """Whether the server process is up."""
        result = self._run("pg_ctl", "-D", str(self.data), "status", check=False)
        return result.returncode == 0

    def destroy(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        if self.data.exists() and self.is_running():
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def _drop_privileges_to(self, user: str) -> None:
        """Run the server commands as ``user``: ``initdb`` and ``postgres`` refuse root."""
        account = pwd.getpwnam(user)
        os.chmod(self.directory, 0o755)
        os.chown(self.directory, account.pw_uid, account.pw_gid)
        self._as_user = [
            "setpriv",
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--clear-groups",
            "--",
        ]

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [*self._as_user, str(self.bin_dir / program), *args]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=self.directory,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
        if check and result.returncode != 0:
            failed = f"{' '.join(command)} failed ({result.returncode})"
            msg = f"{failed}:\n{result.stderr}{self._log_tail()}"
            raise RuntimeError(msg)
        return result

    def _log_tail(self) -> str:
        log = self.directory / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""


@contextmanager
def start_postgres(bin_dir: Path | None = None) -> Iterator[PostgresCluster]:
    """A running throwaway cluster, deleted on exit. ``RuntimeError`` if there are no binaries."""
    bin_dir = bin_dir or find_bin_dir()
    if bin_dir is None:
        msg = (
            "No PostgreSQL server binaries: install the server (e.g. apt-get install postgresql), "
            "pip install pgserver, set PG_BIN to the directory holding pg_ctl, or set "
            "PERFMON_TEST_DSN to an existing server."
        )
        raise RuntimeError(msg)
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@contextmanager
def dsn_of_any_server() -> Iterator[str]:
    """``PERFMON_TEST_DSN`` if set, else the DSN of a throwaway cluster started for the block."""
    external = os.environ.get("PERFMON_TEST_DSN")
    if external:
        yield external
        return
    with start_postgres() as cluster:
        yield cluster.dsn


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """The DSN of a PostgreSQL server shared by the test session."""
    if not os.environ.get("PERFMON_TEST_DSN") and find_bin_dir() is None:
        pytest.skip("no PostgreSQL server: set PERFMON_TEST_DSN or install the server binaries")
    with dsn_of_any_server() as dsn:
        yield dsn


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the test's own, which it may stop and start again."""
    if find_bin_dir() is None:
        pytest.skip("stopping a server needs PostgreSQL server binaries (pg_ctl)")
    with start_postgres() as cluster:
        yield cluster
