"""Real PostgreSQL streaming replicas for tests.

:class:`StreamingReplica` makes a hot standby of the running test server with
``pg_basebackup -R`` (run as the ``postgres`` system user when we are root),
starts it on a free loopback port with its socket in its own directory, waits
until it streams, and removes it afterwards. :func:`replication_allowed` makes
sure the primary accepts loopback replication connections: if it does not, it
appends one ``pg_hba.conf`` line (``host replication postgres 127.0.0.1/32
trust``) and reloads the server, and puts the file back as it was (and reloads)
when the tests are done, whether they passed or not.

Nothing here is a mock: the standby is a real ``postgres`` process replaying the
primary's WAL, so replica lag, ``pg_wal_replay_pause()`` and
``pg_ctl stop -m immediate`` behave as in production.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

__all__ = [
    "HBA_LINE",
    "ReplicaSetupError",
    "StreamingReplica",
    "free_port",
    "pg_bin",
    "replication_accepted",
    "replication_allowed",
]

HBA_LINE = "host replication postgres 127.0.0.1/32 trust"
_HBA_COMMENT = "# sessionscope tests: loopback streaming replicas (tests/replica)"
# A standby refuses to start when these are lower than on its primary.
_MATCH_PRIMARY = (
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
)


class ReplicaSetupError(RuntimeError):
    """The standby could not be made; the message says which step failed."""


def pg_bin() -> Path | None:
    """The PostgreSQL server binaries (``SESSIONSCOPE_PG_BIN``, else the Debian
    path of the server's major version 15), or None when absent."""
    path = Path(os.environ.get("SESSIONSCOPE_PG_BIN", "/usr/lib/postgresql/15/bin"))
    needed = ("pg_basebackup", "pg_ctl", "postgres")
    return path if all((path / name).is_file() for name in needed) else None


def _conninfo(host: str, port: int, dbname: str, **extra: str) -> str:
    parts = [
        f"host={host}",
        f"port={port}",
        "user=postgres",
        f"dbname={dbname}",
        "connect_timeout=5",
    ]
    parts += [f"{k}={v}" for k, v in extra.items()]
    return " ".join(parts)


def replication_accepted(host: str, port: int) -> bool:
    try:
        with psycopg.connect(
            _conninfo(host, port, "postgres", replication="true"), autocommit=True
        ):
            return True
    except psycopg.OperationalError as err:
        if "pg_hba.conf" in str(err):
            return False
        raise


@contextmanager
def replication_allowed(host: str, port: int) -> Iterator[bool]:
    """Make the primary accept loopback replication connections for ``postgres``
    for the duration of the ``with`` block.

    Yields True when ``pg_hba.conf`` had to be changed: then one line was added
    and the server reloaded, and on leaving the block (also when it raises) the
    file gets its original content back and the server is reloaded again.
    """
    if replication_accepted(host, port):
        yield False
        return
    with psycopg.connect(_conninfo(host, port, "postgres"), autocommit=True) as conn:
        row = conn.execute("SHOW hba_file").fetchone()
        assert row is not None
        hba = Path(row[0])
    try:
        original = hba.read_bytes()
        text = original.decode()
        separator = "" if text.endswith("\n") or not text else "\n"
        hba.write_text(f"{text}{separator}{_HBA_COMMENT}\n{HBA_LINE}\n")
    except OSError as err:
        raise ReplicaSetupError(
            f"the primary refuses replication connections and {hba} is not writable "
            f"here ({err}); add '{HBA_LINE}' to it and reload the server"
        ) from err
    try:
        _reload(host, port)
        deadline = time.monotonic() + 10
        while not replication_accepted(host, port):
            if time.monotonic() > deadline:
                raise ReplicaSetupError(f"added '{HBA_LINE}' to {hba}, but the reload did not take")
            time.sleep(0.1)
        yield True
    finally:
        hba.write_bytes(original)
        _reload(host, port)


def _reload(host: str, port: int) -> None:
    with psycopg.connect(_conninfo(host, port, "postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StreamingReplica:
    """One hot standby of the primary at ``primary_host:primary_port``."""

    def __init__(self, name: str, bindir: Path, primary_host: str, primary_port: int) -> None:
        self.name = name
        self.bindir = bindir
        self.primary = (primary_host, primary_port)
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix=f"sessionscope-{name}-"))
        self.datadir = self.base / "data"
        self.log = self.base / "postgres.log"
        self.running = False
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)

    # -- commands ------------------------------------------------------------------

    def _run(self, *args: str, what: str, timeout: float = 120) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            # The server refuses to run as root; the files must be postgres's.
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise ReplicaSetupError(
                f"{what} failed for {self.name} (exit {proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def create(self) -> None:
        """``pg_basebackup -R`` into a fresh directory, plus the config files the
        Debian layout keeps outside the data directory."""
        host, port = self.primary
        self._run(
            "pg_basebackup",
            "-h", host, "-p", str(port), "-U", "postgres",
            "-D", str(self.datadir),
            "-R",  # standby.signal + primary_conninfo: start as a streaming standby
            "-X", "stream",
            "--checkpoint=fast",  # do not wait for the primary's next checkpoint
            "--no-sync",  # throwaway copy: skip fsync
            what="pg_basebackup",
        )  # fmt: skip
        with psycopg.connect(_conninfo(host, port, "postgres"), autocommit=True) as conn:
            settings = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in _MATCH_PRIMARY
            }
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.base}'",
            "hot_standby = on",
            "shared_buffers = 16MB",
            "fsync = off",
            "logging_collector = off",
            *(f"{name} = {value}" for name, value in settings.items()),
        ]
        self._write("postgresql.conf", "\n".join(conf) + "\n")
        self._write(
            "pg_hba.conf",
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n",
        )
        self._write("pg_ident.conf", "")

    def _write(self, name: str, content: str) -> None:
        path = self.datadir / name
        path.write_text(content)
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def start(self) -> None:
        """Start the standby and wait until it accepts connections."""
        self._run(
            "pg_ctl", "-D", str(self.datadir),
            "-o", f"-p {self.port} -k {self.base}",
            "-l", str(self.log), "-w", "-t", "60", "start",
            what="pg_ctl start",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>``: ``immediate`` is a crash (no shutdown
        checkpoint, clients cut off), as when a server dies."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", what="pg_ctl stop")
        self.running = False

    def promote(self) -> None:
        """``pg_ctl promote``: the standby ends recovery and becomes a primary."""
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "promote", what="pg_ctl promote")

    def destroy(self) -> None:
        """Stop (if running) and delete everything; never raises."""
        if self.running:
            try:
                self.stop("immediate")
            except Exception:
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    # -- state ---------------------------------------------------------------------

    def url(self, database: str, driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def query(self, sql: str, database: str = "postgres") -> Any:
        with psycopg.connect(_conninfo("127.0.0.1", self.port, database), autocommit=True) as c:
            row = c.execute(sql).fetchone()
            return None if row is None else row[0]

    def wait_streaming(self, timeout: float = 60) -> None:
        """Wait until the WAL receiver streams from the primary."""
        deadline = time.monotonic() + timeout
        while self.query("SELECT status FROM pg_stat_wal_receiver") != "streaming":
            if time.monotonic() > deadline:
                raise ReplicaSetupError(f"{self.name} is not streaming\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_replayed(self, timeout: float = 60) -> None:
        """Wait until the standby has replayed everything the primary has written
        so far (its current WAL position)."""
        host, port = self.primary
        with psycopg.connect(_conninfo(host, port, "postgres"), autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            target = row[0]
        deadline = time.monotonic() + timeout
        sql = f"SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '{target}') >= 0"
        while not self.query(sql):
            if time.monotonic() > deadline:
                raise ReplicaSetupError(f"{self.name} did not replay up to {target}")
            time.sleep(0.02)
