"""Command line: build the settings once, construct the parts, run them."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from llmos.settings import ConfigError, load_settings

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="llmos: a language model that keeps learning while it serves."
)


@app.callback()
def _main() -> None:
    """llmos command line."""


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file (default: $LLMOS_CONFIG).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default ./llmos-data).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the daemon: HTTP API, background trainer and serving engine in one process."""
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        typer.echo(f"llmos: --log-level must be debug, info, warning or error, not '{log_level}'", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(config, **{"server.host": host, "server.port": port, "data_dir": data_dir})
    except ConfigError as exc:
        typer.echo(f"llmos: {exc}", err=True)
        raise typer.Exit(2) from exc

    import uvicorn

    from llmos.api.app import create_app
    from llmos.daemon import Daemon

    try:
        daemon = Daemon(settings)
    except ValueError as exc:
        typer.echo(f"llmos: {exc}", err=True)
        raise typer.Exit(2) from exc
    if daemon.admin_token_path is not None:
        typer.echo(f"llmos: admin token is in {daemon.admin_token_path}", err=True)
    server_config = uvicorn.Config(
        create_app(daemon),
        host=settings.server.host,
        port=settings.server.port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=8,
    )
    _make_server_class()(server_config).run()


def _make_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would end with
        -15; a daemon that stopped cleanly on request should exit 0 (systemd, Kubernetes)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
                captured.remove(sig)

    return Server


def main() -> None:
    app()


if __name__ == "__main__":
    main()
