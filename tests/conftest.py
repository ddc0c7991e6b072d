"""Shared fixtures: the embedded default model, loaded once per test session, and a private
PostgreSQL server for the store's tests (started and stopped by the session; skipped, with the
reason, where its binaries are missing)."""

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from optim.policy import Policy  # noqa: E402

PROMPT = "OCT: retinal layers with subretinal fluid"
FAST = dict(steps=4, guidance=5.0, eta=1.0)  # few steps keep the suite quick; the math is per step
STORES = ["sqlite", "postgresql"]  # the store backends the store's tests run against


@pytest.fixture(scope="session")
def policy():
    return Policy.load()


def nudged_version(room, by: float = 0.02) -> str:
    """A new current version of ``room`` without an update's cost (seconds, not minutes, on a busy CPU):
    every LoRA B entry moved by ``by``, saved and recorded as ``apply_update`` saves and records one."""
    with room.model_lock:
        room.policy.load_lora_state_dict({k: v + by if "lora_B" in k else v for k, v in room.policy.lora_state_dict().items()})
        version = room.policy.save_version(room.version_store, algorithm="nudge")
    room.store.record_version(version.id, version.parent, version.algorithm, version.metrics)
    return version.id


def postgres_binaries() -> Path | None:
    """The folder with initdb and pg_ctl: Debian's /usr/lib/postgresql/<major>/bin (the newest), else PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parents[1].name)
                    if p.parents[1].name.isdigit() else 0)
    initdb = debian[-1] if debian else (Path(found) if (found := shutil.which("initdb")) else None)
    return initdb.parent if initdb is not None and (initdb.parent / "pg_ctl").exists() else None


class PostgresServer:
    """A throw-away PostgreSQL server: its data folder and unix socket in a fresh temporary folder, a
    free port, no TCP listener, trust authentication for the one user ``workbench``. fsync is off:
    the server dies with the session, so durability would only slow the tests.

    PostgreSQL refuses to run as root, so under root (CI containers) it runs as the ``postgres``
    user that Debian's package creates, through ``runuser``.
    """

    USER = "workbench"

    def __init__(self, binaries: Path):
        self.binaries = binaries
        self.folder = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
        self.data, self.log = self.folder / "data", self.folder / "server.log"
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.binaries / program), *args], capture_output=True, text=True)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} failed (exit {done.returncode}): {done.stderr.strip()}\n{log}")

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data), "-U", self.USER, "-A", "trust", "-E", "UTF8", "--no-locale",
                  "--no-sync")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses='' -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        return self

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one of this server's databases (psycopg 3 over the unix socket)."""
        return f"postgresql+psycopg://{self.USER}@/{database}?host={self.folder}&port={self.port}"

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.folder), port=self.port, user=self.USER, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(statement)

    @contextlib.contextmanager
    def database(self):
        """A fresh, empty database for one test (or module); dropped afterwards. Yields its URL."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self._admin(f"DROP DATABASE {name} WITH (FORCE)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server; skipped, saying what is missing, where it cannot run here."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: `apt-get install postgresql` "
                    "(.ci/run installs it)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg (PostgreSQL driver) not installed: pip install -r requirements.txt")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as "
                        "(Debian's postgresql package creates it)")
    server = PostgresServer(binaries).start()
    yield server
    server.stop()


@contextlib.contextmanager
def store_database(request, backend: str):
    """The ``store_url`` for ``backend``: None (SQLite in the work directory) or a fresh PostgreSQL database."""
    if backend == "sqlite":
        yield None
        return
    with request.getfixturevalue("postgres").database() as url:
        yield url


@pytest.fixture(params=STORES)
def store_url(request):
    """Each test that takes it runs once on SQLite and once on a fresh PostgreSQL database."""
    with store_database(request, request.param) as url:
        yield url
