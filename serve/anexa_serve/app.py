"""The ASGI app: configuration, the served models' engines, request checks, error handling.

:func:`create_app` wires the routes (:mod:`anexa_serve.routes`) to a :class:`ServerState`: the models,
one :class:`~anexa_serve.engine.Decoder` per model (its engine and stepping thread), the chat template
each model uses, and the limits of :class:`ServeConfig`. Refusals are
:class:`~anexa_serve.errors.APIError` with OpenAI's error body; nothing else ever reaches a client.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from anexa_core.errors import AnexaError, choose_one_of
from anexa_core.infer.chat import Template, Transcript
from anexa_serve.chat import ChatOverride, model_template
from anexa_serve.engine import Decoder
from anexa_serve.errors import APIError, invalid
from anexa_serve.models import ServedModel

logger = logging.getLogger("anexa.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_HOST = re.compile(r"\[(?P<ipv6>[0-9A-Fa-f:.]+)\](?::\d{1,5})?|(?P<name>[^\s:\[\],/@]+)(?::\d{1,5})?")
"""A ``Host`` header: ``name[:port]`` or ``[IPv6][:port]``, nothing around it (RFC 9110 §7.2)."""
SERVER_ERROR = APIError(500, "internal server error (logged by the server)", type="server_error")
Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class ServeConfig:
    """Server limits and policies (``anexa serve`` flags).

    ``max_tokens_cap``: the largest ``max_tokens`` a request may ask for (tokens); a request without
    ``max_tokens`` gets ``min(default_max_tokens, max_tokens_cap)``. ``parallel``: rows each model's
    engine decodes at once. ``queue``: requests (choices) that may wait for a row; more get HTTP 429.
    ``max_body_bytes``: larger request bodies get HTTP 413. ``api_key``: when set, ``/v1`` and the
    tokenizer routes require ``Authorization: Bearer <key>``. ``allowed_hosts``: accepted ``Host``
    header names (defence against DNS rebinding for a loopback server); None accepts any.
    ``chat_template``: a transcript for models without a template of their own, or Jinja text for every
    model (:mod:`anexa_serve.chat`). ``threads``: torch CPU threads of each engine's thread (0: torch's
    default). ``max_cache_tokens``: the most KV-cache positions each model's batch may hold (rows ×
    capacity; see :class:`~anexa_core.infer.engine.Engine`): requests wait for room; None: ``parallel`` ×
    the context.
    """

    max_tokens_cap: int = 1024
    default_max_tokens: int = 200
    parallel: int = 8
    queue: int = 32
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    chat_template: ChatOverride = field(default_factory=Transcript)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    threads: int = 0
    max_cache_tokens: int | None = None

    def __post_init__(self) -> None:
        """Raises :class:`AnexaError` for an ``api_key`` no client could send: empty, or holding a space or a
        character outside printable ASCII (an HTTP header cannot carry it)."""
        if self.api_key is None:
            return
        if not self.api_key:
            raise AnexaError("--api-key (or ANEXA_API_KEY) is empty: give a key or leave it unset")
        if not all("!" <= c <= "~" for c in self.api_key):
            raise AnexaError(
                "--api-key (or ANEXA_API_KEY) holds a space or a character outside printable ASCII, which an HTTP "
                "header cannot carry: use letters, digits and punctuation only"
            )


@dataclass
class ServerState:
    """What the routes share: ``config``, the ``models`` by name, their ``decoders`` and ``templates``."""

    config: ServeConfig
    models: dict[str, ServedModel]
    decoders: dict[str, Decoder]
    templates: dict[str, Template]

    def pick(self, name: str | None) -> ServedModel:
        """The model a request names (404 for an unknown one); the only one when it names none."""
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise invalid(f"model is required: one of {', '.join(self.models)}", param="model")
        if name not in self.models:
            raise APIError(
                404,
                f"model {name!r} does not exist: {choose_one_of(name, self.models)} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return self.models[name]

    def max_tokens(self, requested: int | None, echo: bool | None = None, field: str = "max_tokens") -> int:
        """Tokens to generate: the default when none is asked for; 400 naming ``field`` (the request field
        the limit came from) below 1 (below 0 with ``echo``; ``None``: the endpoint has no echo, chat) or
        above the cap."""
        cap = self.config.max_tokens_cap
        if requested is None:
            return min(self.config.default_max_tokens, cap)
        if requested < (0 if echo else 1):
            hint = " (0 only with echo: true)" if echo is False else ""
            raise invalid(f"{field} must be at least 1{hint}, got {requested}", param=field, code="invalid_value")
        if requested > cap:
            raise invalid(
                f"{field} {requested} is over this server's cap of {cap} (anexa serve --max-tokens-cap)",
                param=field,
                code="max_tokens_over_cap",
            )
        return requested

    def close(self) -> None:
        for decoder in self.decoders.values():
            decoder.close()


def state(request: Request) -> ServerState:
    return request.app.state.server


async def check_host(request: Request) -> None:
    """400 for a ``Host`` other than the loopback names on a loopback server (DNS rebinding), or one that is
    not a host name or bracketed IPv6 address with an optional port."""
    allowed = state(request).config.allowed_hosts
    if allowed is None:
        return
    host = request.headers.get("host", "")
    match = _HOST.fullmatch(host)
    name = (match["ipv6"] or match["name"]) if match else ""
    if name.lower() not in allowed:
        raise APIError(
            400,
            f"Host {host!r} is not served: this server listens on a loopback address; use "
            "http://127.0.0.1:PORT or http://localhost:PORT",
            code="invalid_host",
        )


async def check_origin(request: Request) -> None:
    """403 for a request a web page of another origin sent (its ``Origin`` is not this server's own ``Host``).

    A browser lets any page POST a "simple" request (``Content-Type: text/plain``, no preflight) to a
    server on the visitor's machine; it marks such a request with ``Origin``, which this refuses, so no
    web page can make the server generate. Clients that are not browsers send no ``Origin``; the chat page
    sends its own."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    scheme, _, netloc = origin.partition("://")
    if scheme.lower() not in ("http", "https") or netloc.lower() != request.headers.get("host", "").lower():
        raise APIError(
            403,
            f"requests from the web page at {origin!r} are refused: this server answers its own chat page "
            "and clients that are not browsers",
            type="permission_error",
            code="cross_origin",
        )


async def check_key(request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <--api-key>`` (compared in constant time)."""
    key = state(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401,
            "missing or wrong API key: send the header `Authorization: Bearer <key>` with the key "
            "given to `anexa serve --api-key` (or ANEXA_API_KEY)",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 413 beyond ``max_body_bytes``, 400 when it is not a JSON object."""
    limit = state(request).config.max_body_bytes
    too_large = APIError(413, f"request body over this server's limit of {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # nobody to answer: not a server failure, so nothing is logged
        raise APIError(
            400, "the client disconnected before sending its whole body", code="client_disconnected"
        ) from None
    try:
        data = json.loads(body, object_pairs_hook=_once_each)
    except _GivenTwice as twice:  # JSON allows it, and one value would be dropped without a word
        raise invalid(f"the body gives {twice.key!r} twice: give each field once", param=twice.key) from None
    except (ValueError, RecursionError):
        raise invalid("the body is not valid JSON: send a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", code="invalid_json")
    return data


class _GivenTwice(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members as a dict; raises :class:`_GivenTwice` for a key given twice."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _GivenTwice(key)
        data[key] = value
    return data


def parse(kind: type[Body], data: dict[str, Any]) -> Body:
    """``data`` validated as ``kind``; 400 naming the field that is wrong, unknown or not honoured."""
    try:
        body = kind.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    refusal = getattr(body, "refusal", None)
    problem = refusal() if refusal is not None else None
    if problem:
        raise invalid(problem[1], param=problem[0], code="unsupported")
    return body


def _field_parts(loc: tuple[Any, ...], unknown: bool = False) -> list[str | int]:
    """Pydantic's error location without its union-branch names (``str``, ``list[TextPart]``, …). With
    ``unknown`` (an unknown field's location) the last part is the field as the client named it, kept
    whatever it is called (``int``, ``a-b``)."""
    return [
        part
        for index, part in enumerate(loc)
        if isinstance(part, int)
        or (unknown and index == len(loc) - 1)
        or (not any(c in part for c in "[]-") and part not in {"str", "int", "float", "bool", "list", "dict"})
    ]


def _field_path(loc: tuple[Any, ...], unknown: bool = False) -> str:
    """An error location as a request path: ``messages[0].role``."""
    path = ""
    for part in _field_parts(loc, unknown):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def _validation_error(exc: ValidationError) -> APIError:
    """Pydantic's most specific complaint (the deepest field; for unions, the branch that got furthest, and
    of branches as far, one whose type the value has: a list of 17 stops is too long, not "a valid string")
    as a 400 naming the field; a field that is only unknown is ``unsupported``."""
    errors = exc.errors()
    if all(error["type"] == "extra_forbidden" for error in errors):
        name = _field_path(errors[0]["loc"], unknown=True)
        message = f"unknown field {name}: this server does not honour it; leave it out (docs/serve.md lists them)"
        return invalid(message, param=name, code="unsupported")
    first = max(  # max keeps the first of ties
        errors, key=lambda error: (len(_field_parts(error["loc"])), not error["type"].endswith("_type"))
    )
    param = _field_path(first["loc"]) or None
    message = first["msg"] if first["type"] != "missing" else "is required"
    return invalid(f"{param}: {message}" if param else message, param=param, code="invalid_value")


def _page(name: str) -> str:
    return resources.files("anexa_serve").joinpath("static", name).read_text(encoding="utf-8")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            return APIError(404, f"no route {path}: the API is under /v1", code="not_found").response()
        if exc.status_code == 405:
            return APIError(405, f"{request.method} is not allowed on {path}", code="method_not_allowed").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return SERVER_ERROR.response()


def create_app(models: dict[str, ServedModel], config: ServeConfig | None = None) -> FastAPI:
    """The app serving ``models`` (name → :class:`ServedModel`, at least one) under ``config``.

    ``app.state.server`` is the :class:`ServerState`; ``app.state.server.decoders[name].stats`` count the
    tokens generated and the requests finished, cancelled, failed and rejected. The engines' threads
    start at the first request and stop when the app shuts down (ASGI lifespan) or at
    :meth:`ServerState.close`.
    """
    from fastapi import Depends

    from anexa_serve.routes import api_router, page_router

    if not models:
        raise ValueError("create_app needs at least one model")
    config = config or ServeConfig()
    server = ServerState(
        config,
        models,
        {
            name: Decoder(m.model, config.parallel, config.queue, config.threads, name, config.max_cache_tokens)
            for name, m in models.items()
        },
        {name: model_template(m.tokenizer, config.chat_template) for name, m in models.items()},
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.close()

    app = FastAPI(
        title="Anexa",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(check_host), Depends(check_origin)],
        lifespan=lifespan,
    )
    app.state.server = server
    app.state.pages = {"index.html": _page("index.html"), "app.js": _page("app.js")}
    _install_error_handlers(app)
    app.include_router(page_router)
    app.include_router(api_router, dependencies=[Depends(check_key)])
    return app
