"""`distill server`: Prefect's server (API + UI) in this process, hardened for SQLite against "database is locked"."""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from pipeline.core import processes


def immediate_sqlite_transactions() -> None:
    """Begin every server transaction IMMEDIATE on SQLite.

    Prefect begins them DEFERRED, and the upgrade to a write lock fails at once with SQLITE_BUSY (busy_timeout
    does not apply to it), so concurrent submits get 503 "database is locked". An IMMEDIATE transaction waits
    for the write lock (busy_timeout), so writers queue instead; reads outside transactions stay concurrent (WAL).
    """
    from contextlib import asynccontextmanager

    from prefect.server.database.configurations import AioSqliteConfiguration

    deferred = AioSqliteConfiguration.begin_transaction
    if getattr(deferred, "immediate", False):
        return

    @asynccontextmanager
    async def begin_immediate(self: Any, session: Any, with_for_update: bool = False) -> Any:
        async with deferred(self, session, with_for_update=True) as transaction:  # for_update -> IMMEDIATE
            yield transaction

    begin_immediate.immediate = True  # type: ignore[attr-defined]
    AioSqliteConfiguration.begin_transaction = begin_immediate


def sqlite_settings() -> dict[Any, Any]:
    """Longer statement and connection timeouts: a busy machine runs slow queries, and a writer may now wait
    for the lock. A setting the user gave in the environment wins."""
    import prefect.settings as ps

    wanted = {"PREFECT_SERVER_DATABASE_TIMEOUT": 60.0, "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": 30.0}
    return {getattr(ps, name): value for name, value in wanted.items() if name not in os.environ}


def uses_sqlite() -> bool:
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    return url is None or url.get_secret_value().startswith("sqlite")


def ui_api_url(public_url: str | None) -> str:
    """The API URL the UI's browser calls, as `/ui-settings` tells it.

    Prefect's default is PREFECT_API_URL, else http://127.0.0.1:4200/api: a server on any other port (or host)
    serves a UI that cannot reach its own API. A relative `/api` is resolved by the browser against the page it
    loaded, so it is right for any host, port, SSH tunnel or port mapping that reaches the server itself; a proxy
    that serves it under another path needs `--public-url`. A PREFECT_UI_API_URL the user set still wins over
    the default.
    """
    from prefect.settings import get_current_settings

    if public_url:
        return f"{public_url.rstrip('/')}/api"
    ui = get_current_settings().server.ui
    if "api_url" in ui.model_fields_set and ui.api_url:
        return ui.api_url
    return "/api"


def ui_settings(public_url: str | None) -> dict[Any, Any]:
    """The settings that make the UI (and the links the server writes) point at this server."""
    import prefect.settings as ps

    wanted: dict[Any, Any] = {ps.PREFECT_UI_API_URL: ui_api_url(public_url)}
    if public_url:
        wanted[ps.PREFECT_UI_URL] = public_url.rstrip("/")
    return wanted


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=4200, show_default=True, type=int)
@click.option("--public-url", default=None, metavar="URL",
              help="The URL browsers reach this server at, when it differs from what they load the page from "
                   "(a proxy serving it under a path, e.g. https://example.org/prefect).")
def server(host: str, port: int, public_url: str | None) -> None:
    """Start the Prefect server (API + UI) in this process; on SQLite its writers queue for the lock."""
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import temporary_settings

    sqlite = uses_sqlite()
    if sqlite:
        immediate_sqlite_transactions()
    settings = {**(sqlite_settings() if sqlite else {}), **ui_settings(public_url)}
    with temporary_settings(settings):
        app = create_app(final=True)
        what = "SQLite, transactions IMMEDIATE" if sqlite else "PostgreSQL"
        shown = public_url or f"http://{_url_host(host)}:{port}"
        click.echo(f"Prefect server on {shown} ({what}); its UI calls the API at {ui_api_url(public_url)}",
                   err=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def flush_to_api() -> None:
    """Send the log lines and events still queued for the API now, while its server is up.

    Prefect batches them in background workers that otherwise flush at interpreter exit: after a temporary
    server stopped, that prints "--- Error logging to API --- All connection attempts failed" under the run's
    last lines. Prefect's own test harness drains the same two workers before it stops its server.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30, at_exit=False)
    EventsWorker.drain_all(timeout=30, at_exit=False)


@contextmanager
def prefect_api() -> Iterator[None]:
    """The API a `distill run` reports to: PREFECT_API_URL when one is set, else a `distill server` started for
    the run (the profile's database, hardened as above) instead of Prefect's unhardened temporary server."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_UI_URL,
        get_current_settings,
        temporary_settings,
    )

    if get_current_settings().api.url:
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    origin = f"http://127.0.0.1:{port}"
    log_path = Path(PREFECT_HOME.value()) / "distill-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = processes.start([sys.executable, "-m", "pipeline.cli", "server", "--port", str(port),
                                "--public-url", origin], stdout=log, stderr=log, start_new_session=True)
    try:
        _wait_healthy(f"{origin}/api", proc, log_path)
        click.echo(f"temporary Prefect server at {origin} (log: {log_path})", err=True)
        # the flow's "View at" links are built from PREFECT_UI_URL
        with temporary_settings({PREFECT_API_URL: f"{origin}/api", PREFECT_UI_URL: origin}):
            try:
                yield
            finally:
                flush_to_api()
    finally:
        proc.stop(grace_s=20)


def _wait_healthy(url: str, proc: processes.Child, log_path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the Prefect server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise click.ClickException(f"the Prefect server did not answer within {timeout_s:.0f} s; see {log_path}")
