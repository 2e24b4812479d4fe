"""A real, throw-away PostgreSQL server for the many-worker tests.

``initdb`` into a temporary folder and ``pg_ctl start`` listening on 127.0.0.1 only (plus a Unix
socket in that folder), stopped and removed at teardown. Connections over TCP need the password
(scram-sha-256, as the README's set-up), so a test can tell a password that was used from one that
was ignored; URLs are written as the README writes them, ``postgresql://user:pw@host:port/db``. PostgreSQL refuses to run as root, so as
root the server runs as the ``postgres`` user (created by Debian's ``postgresql`` package; made
here if missing). The tests skip when the server binaries are absent, except under CI (``CI`` set),
where they fail: ``.ci/run`` installs the package.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "s3cret-Pw_never-printed"  # the superuser's; tests check that it is never printed


def pg_bindir() -> Path | None:
    """The folder holding initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: [int(x) if x.isdigit() else x for x in p.split("/")])
    return Path(candidates[-1]).parent if candidates else None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> str:
    """The unprivileged account the server runs as when we are root."""
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"], check=True)
    return "postgres"


@dataclass
class PostgresServer:
    port: int
    root: Path

    def url(self, database: str, *, password: bool = True, user: str = "postgres") -> str:
        """The README's form: ``postgresql://user[:password]@127.0.0.1:port/database``."""
        auth = f"{user}:{PASSWORD}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def sql(self, *statements: str) -> None:
        """Run statements as the superuser, outside a transaction (CREATE DATABASE needs that)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", password=PASSWORD, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()

    def create_database(self, prefix: str = "study", owner: str = "postgres") -> str:
        """A fresh, empty database; returns its URL (with a password that must never be printed)."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.sql(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        return self.url(name, user=owner)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = pg_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; `apt-get install -y postgresql` (.ci/run does)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="slmsearch-pg-"))  # not under pytest's 0700 tmp: the server user must reach it
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = _server_user()
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    data, log, pwfile = root / "data", root / "server.log", root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if prefix:
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    try:
        subprocess.run(
            prefix + [str(bindir / "initdb"), "-D", str(data), "--auth-local=trust", "--auth-host=scram-sha-256",
                      f"--pwfile={pwfile}", "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True, capture_output=True, text=True, cwd=root,
        )
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=100")
        started = subprocess.run(
            prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"],
            capture_output=True, text=True, cwd=root,
        )
        if started.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"pg_ctl start failed: {started.stderr}\n{tail}")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {exc.stderr}")
    try:
        yield PostgresServer(port=port, root=root)
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)
