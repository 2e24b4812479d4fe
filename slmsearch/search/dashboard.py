"""`slmsearch dashboard`: optuna-dashboard on the loopback interface over a study's storage.

Only 127.0.0.1 is served (the dashboard has no authentication and can edit studies); from another
machine, forward the port (``ssh -L 8080:127.0.0.1:8080 host``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from slmsearch.errors import SlmsearchError
from slmsearch.search.storage import LocatedStudy, open_storage, redact

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port(port: int, host: str = HOST) -> int:
    """``port`` if it is free on ``host`` (0 = pick a free one); a one-line error otherwise."""
    if not 0 <= port <= 65535:
        raise SlmsearchError(f"--port must be 0-65535, got {port}")
    if port == 0:
        return free_port(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise SlmsearchError(f"port {port} on {host} is in use; pass --port N, or --port 0 for a free one") from None
    return port


def dashboard_url(port: int, study_id: int | None = None, host: str = HOST) -> str:
    """The dashboard's address (the study's page when ``study_id`` is given)."""
    base = f"http://{host}:{port}/dashboard"
    return f"{base}/studies/{study_id}" if study_id is not None else base


def serve(located: LocatedStudy, *, port: int = 8080, log: Callable[[str], Any] = print) -> None:
    """Serve optuna-dashboard for the study's storage on 127.0.0.1 until interrupted."""
    from optuna_dashboard import run_server

    port = check_port(port)
    storage = located.storage if located.storage is not None else open_storage(located.url)  # one handle per process
    study_id = storage.get_study_id_from_name(located.name)
    log(f"optuna-dashboard for study {located.name!r} ({redact(located.url)}) at {dashboard_url(port, study_id)}")
    log("press Ctrl-C to stop")
    try:
        run_server(storage, host=HOST, port=port)
    except KeyboardInterrupt:
        pass
