"""``replication_allowed`` puts ``pg_hba.conf`` back as it was, and reloads, after
the replica tests: checked on a throwaway PostgreSQL server of our own (initdb
on a free loopback port) whose ``pg_hba.conf`` refuses replication, never on the
shared server."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .conftest import IN_CI
from .replica import HBA_LINE, free_port, pg_bin, replication_accepted, replication_allowed

HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, Path]]:
    bindir = pg_bin()
    if bindir is None:
        if IN_CI:
            pytest.fail("CI requires the PostgreSQL server binaries")
        pytest.skip("PostgreSQL server binaries not found")
    base = Path(tempfile.mkdtemp(prefix="sessionscope-hba-"))
    data, port = base / "data", free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--no-sync", "-A", "trust")
        (data / "pg_hba.conf").write_text(HBA)
        run(
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )  # fmt: skip
        yield port, data / "pg_hba.conf"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True, timeout=120,
        )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def test_line_added_inside_and_file_restored_after(server: tuple[int, Path]) -> None:
    port, hba = server
    before = hba.read_bytes()
    assert not replication_accepted("127.0.0.1", port)
    with replication_allowed("127.0.0.1", port) as changed:
        assert changed
        assert HBA_LINE in hba.read_text().splitlines()
        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres replication=true",
            autocommit=True,
        ):
            pass
    assert hba.read_bytes() == before
    assert not replication_accepted("127.0.0.1", port)  # reloaded: refused again


def test_file_restored_when_the_tests_fail(server: tuple[int, Path]) -> None:
    port, hba = server
    before = hba.read_bytes()
    with pytest.raises(RuntimeError), replication_allowed("127.0.0.1", port):
        raise RuntimeError("a replica test failed")
    assert hba.read_bytes() == before
    assert not replication_accepted("127.0.0.1", port)
