"""``anexa serve``: the OpenAI-compatible HTTP server and chat page (``anexa_serve``) under uvicorn.

fastapi, uvicorn and torch are imported inside the command, so ``anexa --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from anexa_cli.errors import user_errors
from anexa_cli.threads import use_threads
from anexa_core.errors import AnexaError

Models = Annotated[
    list[Path] | None,
    typer.Option(
        "--model",
        "-m",
        help="Run folder or model.safetensors; repeatable. Requests name a model by its folder name "
        "(tiny, tiny-2 when two share a name). Default: the newest under ./runs.",
    ),
]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for names and other IPs."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int):
    """A listening socket, so a taken port is a one-line error and ``--port 0`` can print the port chosen."""
    from anexa_serve.server import listen

    try:
        return listen(host, port)
    except OSError as exc:
        raise AnexaError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port or --host"
        ) from None


@user_errors
def serve(
    model: Models = None,
    host: Annotated[
        str, typer.Option(help="Address to bind. Anything but loopback exposes the models to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0 picks a free one and prints it).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="ANEXA_API_KEY", show_envvar=True, help="Require `Authorization: Bearer KEY` on /v1."),
    ] = None,
    max_tokens_cap: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 1024,
    default_max_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="max_tokens when a request gives none (at most the cap). \\[default: 200, or the cap when lower]",
        ),
    ] = None,
    parallel: Annotated[
        int, typer.Option(min=1, help="Rows each model's engine decodes at once (one batch, one forward per token).")
    ] = 8,
    queue: Annotated[
        int, typer.Option(min=0, help="Requests (choices) that may wait for a row; more get HTTP 429.")
    ] = 32,
    max_cache_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="KV-cache positions each model's batch may hold (rows × capacity); requests wait for room, "
            "one that cannot fit alone gets HTTP 400. \\[default: --parallel × the model's context]",
        ),
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Larger request bodies get HTTP 413.")] = 1 << 20,
    chat_template: Annotated[
        Path | None,
        typer.Option(
            help="FILE.toml: the plain transcript's keys, for models without a template of their own; "
            "FILE.jinja: a Jinja chat template replacing every model's (see docs/serve.md)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            min=0,
            show_default=False,
            help="CPU threads for torch's operations; 0 chooses from the cores other work leaves free. "
            "Concurrent requests are the parallelism: 1 is fastest for small models. "
            "\\[default: $ANEXA_THREADS or $OMP_NUM_THREADS if set, else 1]",
        ),
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible API (/v1) with a chat page at /."""
    # click reads an empty variable as unset, which would serve without a key: ServeConfig refuses it
    api_key = os.environ.get("ANEXA_API_KEY") if api_key is None else api_key
    if default_max_tokens is not None and default_max_tokens > max_tokens_cap:
        raise AnexaError(
            f"--default-max-tokens {default_max_tokens} is above --max-tokens-cap {max_tokens_cap}, which every "
            "request is held to: lower it or raise the cap"
        )
    if not is_loopback(host):
        typer.echo(
            f"warning: --host {host} is not a loopback address: anyone who can reach this machine can use "
            f"the models{'' if api_key else ' (no --api-key set)'}",
            err=True,
        )

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise AnexaError(
            f"anexa serve needs the serve extra ({exc.name} is missing): pip install 'anexa[serve]'"
        ) from None
    from anexa_core.infer.chat import Transcript
    from anexa_serve.chat import check_override_used, read_override

    template = read_override(chat_template) if chat_template is not None else Transcript()

    threads = use_threads(threads, default=1)  # before torch loads: the engines' threads read OMP_NUM_THREADS
    from anexa_serve import ServeConfig, create_app, load_models
    from anexa_serve.app import LOOPBACK_HOSTS
    from anexa_serve.server import uvicorn_server

    config = ServeConfig(  # checks the key before anything is loaded
        max_tokens_cap=max_tokens_cap,
        # not given: ServeConfig's default, which a lower cap lowers (ServerState.max_tokens)
        **({} if default_max_tokens is None else {"default_max_tokens": default_max_tokens}),
        parallel=parallel,
        queue=queue,
        max_body_bytes=max_body_bytes,
        api_key=api_key.strip() if api_key is not None else None,
        chat_template=template,
        allowed_hosts=(*LOOPBACK_HOSTS, host.strip("[]").lower()) if is_loopback(host) else None,
        threads=threads,
        max_cache_tokens=max_cache_tokens,
    )
    sock = _listen(host, port)  # before loading: a taken port fails at once
    served = load_models(model, device)
    if chat_template is not None:
        check_override_used(chat_template, template, {name: one.tokenizer for name, one in served.items()})
    app = create_app(served, config)
    _announce(served, host, sock.getsockname()[1])
    uvicorn_server(app).run(sockets=[sock])


def _announce(served: dict, host: str, port: int) -> None:
    """Where the models are served (the first line of stderr, which scripts read for the port) and the
    sampling each one's makers recommend."""
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    typer.echo(f"serving {', '.join(served)} on http://{shown}:{port} (chat page at /, OpenAI API at /v1)", err=True)
    for name, one in served.items():
        if one.sampling:
            typer.echo(f"{name}: requests that choose no sampling get its makers' {' → '.join(one.sampling)}", err=True)
