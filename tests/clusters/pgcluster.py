"""A PostgreSQL primary of the tests' own (``initdb`` on a free loopback port, its
own data and socket directory), for a standby (tests/replica) to follow and
take over from. The machine's own PostgreSQL server is not involved.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

from ..replica import ReplicaSetupError

__all__ = ["DATABASE", "OwnPrimary"]

DATABASE = "sessionscope_failover"


class OwnPrimary:
    """A throwaway primary: :meth:`create`, :meth:`start`, :meth:`stop`, :meth:`destroy`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.base = Path(tempfile.mkdtemp(prefix="sessionscope-pgprimary-"))
        self.datadir = self.base / "data"
        self.log = self.base / "postgres.log"
        self.running = False
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)

    def _run(self, *args: str, what: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise ReplicaSetupError(
                f"{what} failed for the test primary (exit {proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )

    def create(self) -> None:
        self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8", what="initdb",
        )  # fmt: skip
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\n"
                "wal_level = replica\n"
                "max_wal_senders = 5\n"
                "wal_keep_size = '64MB'\n"
                "hot_standby = on\n"
                "shared_buffers = 16MB\n"
                "fsync = off\n"
            )
        with (self.datadir / "pg_hba.conf").open("a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")

    def start(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-w", "-t", "60", "start",
            what="pg_ctl start",
        )  # fmt: skip
        self.running = True
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", what="pg_ctl stop")
        self.running = False

    def conninfo(self, dbname: str = DATABASE) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    def destroy(self) -> None:
        """Stop (if running) and delete everything; never raises."""
        if self.running:
            try:
                self.stop("immediate")
            except Exception:
                pass
        shutil.rmtree(self.base, ignore_errors=True)
