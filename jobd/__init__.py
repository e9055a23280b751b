"""jobd: the daemon that runs, supervises and streams jobs over mutual TLS.

``serve(config, task_status=...)`` runs the server in a Trio program and
reports a :class:`Server` (bound addresses, shutdown) once it listens.
The server is imported lazily, so ``jobd._config`` stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobd._version import __version__

if TYPE_CHECKING:
    from jobd._config import ServerConfig, parse_args
    from jobd._server import Server, serve

__all__ = ["Server", "ServerConfig", "__version__", "parse_args", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("Server", "serve"):
        from jobd import _server

        return getattr(_server, name)
    if name in ("ServerConfig", "parse_args"):
        from jobd import _config

        return getattr(_config, name)
    raise AttributeError(f"module 'jobd' has no attribute {name!r}")
