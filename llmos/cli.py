"""Command line: build the settings once, construct the parts, run them."""

from __future__ import annotations

import inspect
import ipaddress
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from llmos import remote
from llmos.logs import LogFormat, configure
from llmos.settings import ConfigError, Settings, load_settings

Role = Literal["all", "api"]  # llmos/daemon.py's (not imported here: it imports torch)


def _reflowed(help_text: str | None) -> str | None:
    # A docstring's single line breaks wrap the source, not the help: typer's rich help would keep
    # them, breaking sentences mid-line in the list of commands.
    if help_text is None:
        return None
    return "\n\n".join(" ".join(p.split("\n")) for p in inspect.cleandoc(help_text).split("\n\n"))


def _untyped_flags(params: list[Any]) -> list[Any]:
    # typer's help writes "<bool>" beside every flag, --help included, as if it took a value; an
    # empty metavar leaves a flag's type column empty.
    for p in params:
        if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _reflowed(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="llmos: a language model that keeps learning while it serves.",
)


@app.callback()
def _main() -> None:
    """llmos command line."""


@app.command(cls=_Command)
def serve(
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file (default: $LLMOS_CONFIG).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default ./llmos-data).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="text (for people) or json (one object per line).")
    ] = "text",
    role: Annotated[
        Role,
        typer.Option(help="all: the API and its trainer; api: the API alone, serving what `llmos train` promotes."),
    ] = "all",
) -> None:
    """Run the daemon: HTTP API, background trainer and serving engine (the trainer in a process of
    its own, or in a thread with runtime.trainer = thread). With --role api, an API replica: no
    trainer; it serves the store's active version, whoever promoted it (see docs/operations.md)."""
    settings = _settings(
        config, log_level, log_format, **{"server.host": host, "server.port": port, "data_dir": data_dir}
    )
    if not settings.auth.api_keys and not is_loopback(settings.server.host):
        typer.echo(
            f"llmos: refusing to listen on {settings.server.host} without API keys: anyone who can reach it could "
            "feed the model text and use it. Set auth.api_keys (e.g. LLMOS_AUTH__API_KEYS='[\"<a long random "
            "key>\"]'), or bind to 127.0.0.1.",
            err=True,
        )
        raise typer.Exit(2)
    if role == "all" and settings.runtime.trainer == "process":
        from llmos.trainer import launch

        launch.warm_up()  # the trainer's imports, side by side with the ones below

    import uvicorn

    from llmos.api.app import create_app
    from llmos.api.http import protocol
    from llmos.daemon import Daemon

    try:
        daemon = Daemon(settings, role)
    except ValueError as exc:
        typer.echo(f"llmos: {exc}", err=True)
        raise typer.Exit(2) from exc
    if daemon.admin_token_path is not None:
        if log_format == "json":
            logging.getLogger("llmos").info("admin token is in %s", daemon.admin_token_path)
        else:
            typer.echo(f"llmos: admin token is in {daemon.admin_token_path}", err=True)
    server_config = uvicorn.Config(
        create_app(daemon),
        host=settings.server.host,
        port=settings.server.port,
        log_level=log_level.lower(),
        log_config=None,  # keep the handler configure() installed: one format for every line
        timeout_graceful_shutdown=settings.server.shutdown_timeout_s,
        http=protocol(settings.server.head_timeout_s, settings.server.body_timeout_s),  # uvicorn's, with deadlines
    )
    _make_server_class(daemon.stopping)(server_config).run()


@app.command(cls=_Command)
def train(
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file (default: $LLMOS_CONFIG).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default ./llmos-data).")] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Serve /metrics and /healthz here (train.metrics_port).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="text (for people) or json (one object per line).")
    ] = "text",
) -> None:
    """Run the trainer alone, no HTTP API, on the configured store and data directory: one trainer
    per store trains (a second waits as a standby); API replicas (serve --role api) serve what it
    promotes. SIGTERM or SIGINT stops it after its step."""
    settings = _settings(config, log_level, log_format, data_dir=data_dir, **{"train.metrics_port": metrics_port})
    from llmos.trainer.alone import run

    try:
        code = run(settings)
    except ValueError as exc:  # a setting the trainer cannot use (eval.anchor_file), a store that is not durable
        typer.echo(f"llmos: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


def _settings(config: Path | None, log_level: str, log_format: LogFormat, **overrides: Any) -> Settings:
    """Logging configured, then the settings, once; a usage error exits 2."""
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        typer.echo(f"llmos: --log-level must be debug, info, warning or error, not '{log_level}'", err=True)
        raise typer.Exit(2)
    configure(log_level, log_format)
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        typer.echo(f"llmos: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command(cls=_Command)
def export(
    version: Annotated[int, typer.Argument(min=0, help="The stored version to export.")],
    directory: Annotated[Path, typer.Argument(help="A new (or empty) directory to write.")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file (default: $LLMOS_CONFIG).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default ./llmos-data).")] = None,
) -> None:
    """Write VERSION as a Hugging Face model directory: AutoModelForCausalLM.from_pretrained(DIRECTORY)
    loads it, and greedy generation reproduces what llmos served (a LoRA adapter is merged)."""
    try:
        settings = load_settings(config, data_dir=data_dir)
    except ConfigError as exc:
        typer.echo(f"llmos: {exc}", err=True)
        raise typer.Exit(2) from exc
    from llmos.export import ExportError, export_version
    from llmos.registry.registry import CorruptCheckpoint, UnknownVersion

    try:
        info = export_version(settings, version, directory)
    except UnknownVersion as exc:
        typer.echo(f"llmos: no stored version {version} in {settings.data_dir}", err=True)
        raise typer.Exit(1) from exc
    except (ExportError, CorruptCheckpoint) as exc:
        typer.echo(f"llmos: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"exported version {version} ({info['status']}) to {directory}")


# Commands that talk to a running server (llmos/remote.py).
for command in (remote.ingest, remote.status, remote.checkpoints, remote.rollback, remote.forget, remote.generate):
    app.command(cls=_Command)(command)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only admits this machine (an IP literal in 127/8 or ::1, or localhost)."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve to anything: not known to be loopback


def _make_server_class(on_exit: Callable[[], None]) -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would end with
        -15; a daemon that stopped cleanly on request should exit 0 (systemd, Kubernetes).
        ``on_exit``: told at the signal, before the requests in flight are answered."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            on_exit()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
                captured.remove(sig)

    return Server


def main() -> None:
    app()


if __name__ == "__main__":
    main()
