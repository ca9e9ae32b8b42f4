"""``weightbank serve``: serve many checkpoints of a bank over HTTP (FastAPI + uvicorn).

``register(app)`` adds the command to a Typer app; the command is a thin shell:
it parses options, builds a :class:`~weightbank.serving.ModelService` and the
app from :func:`weightbank.http.create_app`, and runs uvicorn. Management
endpoints need a bearer token (``$WEIGHTBANK_TOKEN`` or ``--token-file``); the
command refuses to start without one unless ``--insecure-local`` on 127.0.0.1.

Example:
    >>> import typer
    >>> from weightbank.cli.serve import register
    >>> app = typer.Typer(); register(app)
    >>> [c.name for c in app.registered_commands]
    ['serve']
"""

from __future__ import annotations

import copy
import os
from typing import Annotated, Any

import typer
import uvicorn

from .. import open as open_bank
from ..bank.trust import check_verify
from ..errors import InvalidArgument, NotABank
from ..http import create_app, load_token
from ..serving import ModelService, TensorHandler, load_handler
from ..serving.budget import parse_budget, parse_bytes
from ..serving.handler import Handler, load_object
from ..serving.router import check_route_name

__all__ = ["build_server", "log_config", "register", "run_server"]

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _input_shape(text: str | None) -> tuple[int | None, ...] | None:
    if not text:
        return None
    try:
        return tuple(None if p.strip() in ("*", "?", "") else int(p) for p in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use sizes and * separated by commas, e.g. '*,16'") from None


def _parse_route(spec: str) -> tuple[str, dict[str, float]]:
    name, sep, arms_text = spec.partition("=")
    if not sep or not arms_text:
        raise typer.BadParameter(
            f"{spec!r}: expected NAME=ARM:WEIGHT,ARM:WEIGHT (e.g. tts=prod:90,canary:10)"
        )
    arms: dict[str, float] = {}
    for part in arms_text.split(","):
        ref, _, weight = part.rpartition(":")
        try:
            arms[ref.strip()] = float(weight)
        except ValueError:
            raise typer.BadParameter(f"{part!r} in {spec!r}: expected ARM:WEIGHT") from None
    return check_route_name(name.strip()), arms


def _handler(spec: str, model: str | None, input_shape: str | None) -> Handler:
    if spec != "tensor":
        return load_handler(spec)
    if not model:
        raise typer.BadParameter(
            "the built-in tensor handler needs --model pkg.module:factory (factory(info) -> Module)"
        )
    factory = load_object(model)
    if not callable(factory):
        raise typer.BadParameter(f"--model {model} is not callable")
    return TensorHandler(factory, input_shape=_input_shape(input_shape))


def build_server(
    bank_path: str,
    *,
    handler: str,
    model: str | None = None,
    input_shape: str | None = None,
    budget: str | None = None,
    device: str = "cpu",
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: str | None = None,
    insecure_local: bool = False,
    max_body: str = "16MiB",
    ttl: float | None = None,
    min_residency: float = 0.0,
    max_loads: int = 2,
    poll: float = 1.0,
    prefix: str = "",
    routes: list[str] | None = None,
    preload: list[str] | None = None,
    verify: str = "always",
) -> tuple[ModelService, uvicorn.Config]:
    """Everything ``serve`` starts, without starting it: the service and uvicorn's config (with the app)."""
    token = load_token(token_file)
    if token is None and not insecure_local:
        raise typer.BadParameter(
            "management endpoints need a bearer token: set WEIGHTBANK_TOKEN or pass --token-file,"
            " or pass --insecure-local to serve 127.0.0.1 without one"
        )
    if insecure_local and token is None and host not in LOOPBACK_HOSTS:
        raise typer.BadParameter(f"--insecure-local only serves on 127.0.0.1, not on {host}")
    if "://" not in bank_path and not os.path.isdir(bank_path):
        raise NotABank(os.path.abspath(bank_path), "no such directory")
    try:
        mode = check_verify(verify)
    except InvalidArgument as e:
        raise typer.BadParameter(f"--verify {verify!r}: {e.reason}") from None
    bank = open_bank(bank_path, create=False, verify=mode)
    h = _handler(handler, model, input_shape)
    parsed_routes = [_parse_route(r) for r in routes or []]
    service = ModelService(
        bank,
        h,
        poll=poll,
        device=device,
        budget=parse_budget(budget) if budget else None,
        ttl=ttl,
        min_residency=min_residency,
        max_concurrent_loads=max_loads,
        prefix=prefix,
    )
    try:
        for name, arms in parsed_routes:
            service.router.set(name, arms)
        for ref in preload or []:
            service.cache.load(service.live.resolve(ref))
        app = create_app(service, token=token, insecure_local=insecure_local, max_body=parse_bytes(max_body))
    except BaseException:
        service.close()
        raise
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        server_header=False,
        log_config=log_config(),
    )
    return service, config


def log_config() -> dict[str, Any]:
    """uvicorn's logging set-up, plus ``weightbank`` loggers on the same handler at INFO.

    The HTTP app logs every error reply there (``weightbank.http``): a 4xx as
    one INFO line, a 5xx as an ERROR with its traceback.

    Example:
        >>> log_config()["loggers"]["weightbank"]["level"]
        'INFO'
    """
    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["weightbank"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def run_server(config: uvicorn.Config) -> None:
    """Run uvicorn until interrupted (tests replace this to drive the app in-process)."""
    uvicorn.Server(config).run()


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""

    @app.command("serve")
    def serve(
        bank: Annotated[
            str, typer.Argument(help="The bank: a directory, file://… or memory://….", metavar="BANK")
        ],
        handler: Annotated[
            str,
            typer.Option(
                help="pkg.module:Handler (loaded by import path), or 'tensor' with --model.", metavar="SPEC"
            ),
        ] = "tensor",
        model: Annotated[
            str | None,
            typer.Option(help="For --handler tensor: pkg.module:factory, factory(info) -> Module."),
        ] = None,
        input_shape: Annotated[
            str | None, typer.Option(help="For --handler tensor: expected input shape, e.g. '*,16'.")
        ] = None,
        budget: Annotated[
            str | None,
            typer.Option(
                help="Byte budget per tier, e.g. device=20GiB,host=64GiB (disk=100GiB caps a remote bank's disk cache).",
                metavar="SPEC",
            ),
        ] = None,
        device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
        token_file: Annotated[
            str | None,
            typer.Option(help="File holding the management bearer token (else $WEIGHTBANK_TOKEN)."),
        ] = None,
        insecure_local: Annotated[
            bool, typer.Option(help="Allow management without a token, to loopback clients only.")
        ] = False,
        max_body: Annotated[str, typer.Option(help="Largest request body accepted.")] = "16MiB",
        ttl: Annotated[float | None, typer.Option(help="Seconds an idle checkpoint stays resident.")] = None,
        min_residency: Annotated[
            float, typer.Option(help="Seconds a new checkpoint is safe from eviction.")
        ] = 0.0,
        max_loads: Annotated[int, typer.Option(min=1, help="Loads running at once.")] = 2,
        poll: Annotated[float, typer.Option(help="Seconds between tag polls (0: never).")] = 1.0,
        prefix: Annotated[
            str, typer.Option(help="Checkpoint tensor name prefix of the model ('model.').")
        ] = "",
        route: Annotated[
            list[str] | None, typer.Option(help="A route: NAME=ARM:WEIGHT,… (repeatable).", metavar="SPEC")
        ] = None,
        preload: Annotated[
            list[str] | None, typer.Option(help="Load these refs before serving (repeatable).")
        ] = None,
        verify: Annotated[
            str,
            typer.Option(
                help="How loads check chunks: always (hash every chunk), once (trust a chunk this "
                "process verified from the same unchanged local file), never (unsafe).",
                metavar="MODE",
            ),
        ] = "always",
    ) -> None:
        """Serve many checkpoints of BANK over HTTP, swapping them under a byte budget."""
        service, config = build_server(
            bank,
            handler=handler,
            model=model,
            input_shape=input_shape,
            budget=budget,
            device=device,
            host=host,
            port=port,
            token_file=token_file,
            insecure_local=insecure_local,
            max_body=max_body,
            ttl=ttl,
            min_residency=min_residency,
            max_loads=max_loads,
            poll=poll,
            prefix=prefix,
            routes=route,
            preload=preload,
            verify=verify,
        )
        try:
            run_server(config)
        finally:
            service.close()
