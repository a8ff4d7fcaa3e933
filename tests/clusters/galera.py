"""A real 3-node MariaDB Galera cluster on loopback, for tests.

Each node is a ``mariadbd`` process with its own data directory, ``tmpdir``
(mariadbd deletes ``#sql*`` files in its tmpdir at start: a shared one would
delete other servers' temporary tables), socket, free loopback ports (SQL,
group communication, IST, rsync SST) and a ``--defaults-file`` of its own, so
no file of the machine's own MariaDB server is read or touched. The first node
bootstraps the cluster (``--wsrep-new-cluster``); the others join it by rsync
SST. Everything lives under one temporary directory removed by :meth:`destroy`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pymysql

__all__ = ["GaleraCluster", "GaleraNode", "GaleraSetupError", "galera_missing"]

PROVIDER = Path(os.environ.get("SESSIONSCOPE_GALERA_PROVIDER", "/usr/lib/galera/libgalera_smm.so"))
_BINARIES = ("mariadbd", "mariadb-install-db", "rsync", "wsrep_sst_rsync")
DATABASE = "sessionscope_galera"


class GaleraSetupError(RuntimeError):
    """The cluster could not be built; the message says which step failed."""


def galera_missing() -> str | None:
    """Why a Galera cluster cannot be built here, or None."""
    if not PROVIDER.is_file():
        return f"the Galera provider {PROVIDER} is missing (Debian package galera-4)"
    for name in _BINARIES:
        if shutil.which(name) is None and not Path("/usr/sbin", name).is_file():
            return f"{name} is not installed (Debian packages mariadb-server, galera-4, rsync)"
    return None


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _mariadbd() -> str:
    return shutil.which("mariadbd") or "/usr/sbin/mariadbd"


class GaleraNode:
    """One ``mariadbd`` of the cluster."""

    def __init__(self, index: int, base: Path, ports: list[int], peers: str) -> None:
        self.index = index
        self.name = f"node{index}"
        self.port, self.gcomm, self.ist, self.sst = ports
        self.dir = base / self.name
        self.datadir = self.dir / "data"
        self.tmpdir = self.dir / "tmp"
        self.socket = self.dir / "mysqld.sock"
        self.log = self.dir / "error.log"
        self.cnf = self.dir / "my.cnf"
        self.peers = peers
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        for path in (self.dir, self.datadir, self.tmpdir):
            path.mkdir(parents=True, exist_ok=True)
        options = ";".join(
            [
                f"gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm}",
                f"ist.recv_addr=127.0.0.1:{self.ist}",
                "gcache.size=64M",
                # A killed peer is noticed in seconds, not the default 15 s.
                "evs.keepalive_period=PT0.5S",
                "evs.suspect_timeout=PT2S",
                "evs.inactive_timeout=PT4S",
                "evs.install_timeout=PT4S",
            ]
        )
        self.cnf.write_text(
            "[mysqld]\n"
            f"datadir={self.datadir}\n"
            f"tmpdir={self.tmpdir}\n"
            f"socket={self.socket}\n"
            f"pid-file={self.dir / 'mysqld.pid'}\n"
            f"log-error={self.log}\n"
            f"port={self.port}\n"
            "bind-address=127.0.0.1\n"
            "skip-name-resolve\n"
            "user=mysql\n"
            "innodb_buffer_pool_size=32M\n"
            "innodb_log_file_size=16M\n"
            "innodb_flush_log_at_trx_commit=0\n"
            "performance_schema=OFF\n"
            "binlog_format=ROW\n"
            "default_storage_engine=InnoDB\n"
            "innodb_autoinc_lock_mode=2\n"
            "wsrep_on=ON\n"
            f"wsrep_provider={PROVIDER}\n"
            "wsrep_cluster_name=sessionscope_test\n"
            f"wsrep_cluster_address=gcomm://{self.peers}\n"
            f"wsrep_node_name={self.name}\n"
            f"wsrep_node_address=127.0.0.1:{self.gcomm}\n"
            f"wsrep_node_incoming_address=127.0.0.1:{self.port}\n"
            "wsrep_sst_method=rsync\n"
            f"wsrep_sst_receive_address=127.0.0.1:{self.sst}\n"
            f'wsrep_provider_options="{options}"\n'
        )
        _chown_mysql(self.dir)

    def start(self, *, bootstrap: bool = False) -> None:
        # A killed server leaves its socket file behind; until the new one
        # listens, the admin connection must not find it.
        self.socket.unlink(missing_ok=True)
        args = [_mariadbd(), f"--defaults-file={self.cnf}"]
        if bootstrap:
            args.append("--wsrep-new-cluster")
        with open(self.dir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: a crash, in-flight transactions cut off."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def connect(self, database: str | None = None, **kw: Any) -> pymysql.Connection[Any]:
        """An admin connection over the node's socket (root by socket auth)."""
        return pymysql.connect(
            unix_socket=str(self.socket),
            user="root",
            database=database,
            autocommit=True,
            connect_timeout=5,
            **kw,
        )

    def status(self, *names: str) -> dict[str, str]:
        with self.connect() as conn, conn.cursor() as cur:
            placeholders = ", ".join(["%s"] * len(names))
            cur.execute(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({placeholders})", names)
            return {str(k): str(v) for k, v in cur.fetchall()}

    def synced(self, size: int) -> bool:
        if not self.socket.exists():
            return False  # not listening yet (a failed PyMySQL connect leaks its socket)
        try:
            st = self.status("wsrep_local_state", "wsrep_cluster_size", "wsrep_ready")
        except pymysql.MySQLError:
            return False
        return (
            st.get("wsrep_local_state") == "4"
            and st.get("wsrep_ready") == "ON"
            and st.get("wsrep_cluster_size") == str(size)
        )

    def wait_synced(self, size: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.synced(size):
            if not self.running:
                raise GaleraSetupError(f"{self.name} exited\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise GaleraSetupError(f"{self.name} did not sync\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def url(self, driver: str = "pymysql") -> str:
        return f"mariadb+{driver}://root@127.0.0.1:{self.port}/{DATABASE}"


class GaleraCluster:
    """Three (or ``size``) nodes; :meth:`build` starts them, :meth:`destroy`
    stops them and deletes every file."""

    def __init__(self, size: int = 3) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="sessionscope-galera-"))
        _chown_mysql(self.base)
        ports = _free_ports(4 * size)
        node_ports = [ports[4 * i : 4 * i + 4] for i in range(size)]
        peers = ",".join(f"127.0.0.1:{p[1]}" for p in node_ports)
        self.nodes = [GaleraNode(i + 1, self.base, node_ports[i], peers) for i in range(size)]

    def build(self) -> None:
        first = self.nodes[0]
        for node in self.nodes:
            node.write_config()
        proc = subprocess.run(
            [
                "mariadb-install-db",
                f"--defaults-file={first.cnf}",
                "--user=mysql",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise GaleraSetupError(f"mariadb-install-db failed: {proc.stderr[-2000:]}")
        first.start(bootstrap=True)
        first.wait_synced(1)
        # root over TCP from loopback, no password: a throwaway test cluster.
        with first.connect() as c:
            with c.cursor() as cur:
                cur.execute("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'")
                cur.execute("GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
                cur.execute(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
        for size, node in enumerate(self.nodes[1:], start=2):
            node.start()
            node.wait_synced(size)
        for node in self.nodes:
            node.wait_synced(len(self.nodes))

    def execute(self, node: GaleraNode, *statements: str) -> list[Any]:
        """Run ``statements`` on ``node`` (autocommit); the last one's rows. Reads
        are causal (``wsrep_sync_wait``): they see every write the cluster
        committed before, whichever node it was made on."""
        rows: list[Any] = []
        with node.connect(DATABASE) as conn, conn.cursor() as cur:
            cur.execute("SET SESSION wsrep_sync_wait = 1")
            for statement in statements:
                cur.execute(statement)
                rows = list(cur.fetchall())
        return rows

    def destroy(self) -> None:
        """Stop every node and delete the directory; never raises."""
        for node in self.nodes:
            try:
                node.stop()
            except Exception:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


def _chown_mysql(path: Path) -> None:
    if os.geteuid() != 0:
        return
    owner = pwd.getpwnam("mysql")
    for root, dirs, files in os.walk(path):
        os.chown(root, owner.pw_uid, owner.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), owner.pw_uid, owner.pw_gid)
