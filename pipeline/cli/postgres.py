"""`distill postgres`: a local PostgreSQL (Debian's packages, no Docker) for a Prefect server beyond light use."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import click

from pipeline.cli.common import CliError

DEFAULT_PORT = 5433
USER = "prefect"
INSTALL_HINT = "install Debian's PostgreSQL: apt-get install -y postgresql (or `make prefect-postgres`)"


def pg_binary(name: str) -> str:
    """`initdb`, `pg_ctl`, ... from PATH or Debian's /usr/lib/postgresql/<version>/bin (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        raise CliError(f"PostgreSQL's {name} is not installed; {INSTALL_HINT}")
    return candidates[-1]


class LocalPostgres:
    """A PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port`, with a trusted role `prefect`.

    PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` system user (which Debian's
    package creates), and its directory must be reachable by that user.
    """

    def __init__(self, data_dir: str | Path, port: int = DEFAULT_PORT):
        self.data_dir, self.port = Path(data_dir).resolve(), port
        self.socket_dir = self.data_dir.parent / f"{self.data_dir.name}.sock"

    def _as_owner(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args

    def _run(self, args: list[str], what: str) -> str:
        res = subprocess.run(self._as_owner(args), capture_output=True, text=True)
        if res.returncode != 0:
            raise CliError(f"{what} failed (exit {res.returncode}): {(res.stderr or res.stdout)[-1500:]}")
        return res.stdout

    def _prepare_dirs(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.data_dir, self.socket_dir):
            path.mkdir(mode=0o700, exist_ok=True)
            if os.geteuid() == 0:
                owner = pwd.getpwnam("postgres")
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def start(self) -> None:
        """Create the cluster if needed and start it (waiting until it accepts connections)."""
        if not self.initialized():
            self._prepare_dirs()
            self._run([pg_binary("initdb"), "-D", str(self.data_dir), "-U", USER, "--auth=trust", "-E", "UTF8"],
                      "initdb")
        if self.running():
            return
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run([pg_binary("pg_ctl"), "-D", str(self.data_dir), "-o", options, "-l",
                   str(self.data_dir / "server.log"), "-w", "-t", "60", "start"], "pg_ctl start")
        self.create_database("prefect")

    def running(self) -> bool:
        res = subprocess.run(self._as_owner([pg_binary("pg_ctl"), "-D", str(self.data_dir), "status"]),
                             capture_output=True, text=True)
        return res.returncode == 0

    def stop(self) -> None:
        if self.initialized() and self.running():
            self._run([pg_binary("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"], "pg_ctl stop")

    def create_database(self, name: str) -> None:
        """Create database `name` owned by `prefect` (nothing to do when it exists)."""
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
        if exists != "1":
            self._psql(f'CREATE DATABASE "{name}" OWNER {USER}')

    def _psql(self, sql: str) -> str:
        return self._run([pg_binary("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", "postgres",
                          "-tA", "-c", sql], "psql")

    def url(self, database: str = "prefect") -> str:
        """The connection URL for PREFECT_API_DATABASE_CONNECTION_URL (asyncpg, which Prefect already needs)."""
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{database}"


def default_dir() -> Path:
    # as root the cluster runs as `postgres`, which cannot enter /root
    if os.geteuid() == 0:
        return Path("/var/lib/zephyr-distill/postgres")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "zephyr-distill" / "postgres"


@click.group()
def postgres() -> None:
    """A local PostgreSQL for the Prefect server (Debian's packages; no Docker needed)."""


@postgres.command()
@click.option("--dir", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Cluster directory (default: /var/lib/zephyr-distill/postgres as root, else ~/.local/share/...).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
def start(data_dir: str | None, port: int) -> None:
    """Create (once) and start the cluster; print the Prefect connection URL."""
    pg = LocalPostgres(data_dir or default_dir(), port)
    pg.start()
    click.echo(f"export PREFECT_API_DATABASE_CONNECTION_URL={pg.url()}")
    click.echo(f"# then: prefect server start (or distill server); stop with: distill postgres stop --dir {pg.data_dir}",
               err=True)


@postgres.command()
@click.option("--dir", "data_dir", type=click.Path(file_okay=False), default=None)
def stop(data_dir: str | None) -> None:
    """Stop the cluster."""
    LocalPostgres(data_dir or default_dir()).stop()
