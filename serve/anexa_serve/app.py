"""The ASGI app: OpenAI's ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``; the chat page.

Each handler parses and checks the request, calls the core (tokenizer, :func:`build_chain`,
:func:`generate_text` through :class:`~anexa_serve.engine.Generation`) and formats OpenAI's JSON or
server-sent events. Refusals are :class:`~anexa_serve.errors.APIError` with OpenAI's error body.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from anexa_core.errors import AnexaError
from anexa_core.infer.generation import encode_prompt
from anexa_serve.chat import ROLE_ALIASES, ROLES, ChatTemplate
from anexa_serve.engine import Engine, Generation
from anexa_serve.errors import APIError, invalid
from anexa_serve.models import ServedModel
from anexa_serve.schemas import ChatRequest, CompletionRequest

logger = logging.getLogger("anexa.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SERVER_ERROR = APIError(500, "internal server error (logged by the server)", type="server_error")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class ServeConfig:
    """Server limits and policies (``anexa serve`` flags).

    ``max_tokens_cap``: the largest ``max_tokens`` a request may ask for (tokens); a request without
    ``max_tokens`` gets ``min(default_max_tokens, max_tokens_cap)``. ``parallel``: generations running
    at once (worker threads). ``queue``: requests that may wait beyond those; more get HTTP 429.
    ``max_body_bytes``: larger request bodies get HTTP 413. ``api_key``: when set, ``/v1`` requires
    ``Authorization: Bearer <key>``. ``allowed_hosts``: accepted ``Host`` header names (defence
    against DNS rebinding for a loopback server); None accepts any.
    """

    max_tokens_cap: int = 1024
    default_max_tokens: int = 200
    parallel: int = 8
    queue: int = 32
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS


def _page(name: str) -> str:
    return resources.files("anexa_serve").joinpath("static", name).read_text(encoding="utf-8")


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def _field_path(loc: tuple[Any, ...]) -> str:
    """Pydantic's error location as a request path (``messages[0].role``), without its union-branch names."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not any(c in part for c in "[]-") and part not in {"str", "int", "float", "bool", "list", "dict"}:
            path += f".{part}" if path else part
    return path


def _validation_error(exc: ValidationError) -> APIError:
    """Pydantic's most specific complaint (the deepest field; for unions, the branch that got furthest)
    as a 400 naming the field."""
    errors = exc.errors()
    first = max(errors, key=lambda error: len(_field_path(error["loc"])))  # max keeps the first of ties
    param = _field_path(first["loc"]) or None
    message = first["msg"] if first["type"] != "missing" else "is required"
    return invalid(f"{param}: {message}" if param else message, param=param, code="invalid_value")


def _choice(chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    """One choice of a whole (non-streamed) answer."""
    if chat:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _chunk(
    head: dict[str, Any], chat: bool, text: str | None = None, finish: str | None = None, role: bool = False
) -> dict[str, Any]:
    """One streamed chunk: a piece of text, the opening role (chat), or the closing ``finish_reason``."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**head, "choices": [choice]}


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed and ``cleanup`` always called, even when the
    client disconnects while an event is being sent (Starlette then cancels the response)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[str, None], cleanup: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._content.aclose()
            finally:
                self._cleanup()


def create_app(models: dict[str, ServedModel], config: ServeConfig | None = None) -> FastAPI:
    """The app serving ``models`` (name → :class:`ServedModel`, at least one) under ``config``.

    ``app.state.engine`` is the :class:`~anexa_serve.engine.Engine` (its ``stats`` count generated
    tokens, finished and cancelled requests).
    """
    if not models:
        raise ValueError("create_app needs at least one model")
    config = config or ServeConfig()
    engine = Engine(config.parallel, config.queue)
    index_html, app_js = _page("index.html"), _page("app.js")

    async def check_host(request: Request) -> None:
        if config.allowed_hosts is None:
            return
        host = request.headers.get("host", "")
        name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if name.lower() not in config.allowed_hosts:
            raise APIError(
                400,
                f"Host {host!r} is not served: this server listens on a loopback address; use "
                "http://127.0.0.1:PORT or http://localhost:PORT",
                code="invalid_host",
            )

    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given, wanted = token.strip().encode(), config.api_key.encode()
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, wanted):
            raise APIError(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer <key>` with the key "
                "given to `anexa serve --api-key` (or ANEXA_API_KEY)",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app = FastAPI(
        title="Anexa",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(check_host)],
    )
    app.state.engine = engine
    app.state.models = models
    app.state.config = config
    api = [Depends(check_key)]

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

    async def read_json(request: Request) -> dict[str, Any]:
        """The body as a JSON object; 413 beyond ``max_body_bytes``, 400 when it is not a JSON object."""
        limit = config.max_body_bytes
        too_large = APIError(413, f"request body over this server's limit of {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise invalid("the body is not valid JSON: send a JSON object", code="invalid_json") from None
        if not isinstance(data, dict):
            raise invalid("the body must be a JSON object", code="invalid_json")
        return data

    def pick_model(name: str | None) -> ServedModel:
        if name is None:
            if len(models) == 1:
                return next(iter(models.values()))
            raise invalid(f"model is required: one of {', '.join(models)}", param="model")
        if name not in models:
            raise APIError(
                404,
                f"model {name!r} does not exist: choose one of {', '.join(models)} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return models[name]

    def max_tokens(requested: int | None) -> int:
        cap = config.max_tokens_cap
        if requested is None:
            return min(config.default_max_tokens, cap)
        if requested < 1:
            raise invalid(f"max_tokens must be at least 1, got {requested}", param="max_tokens", code="invalid_value")
        if requested > cap:
            raise invalid(
                f"max_tokens {requested} is over this server's cap of {cap} (anexa serve --max-tokens-cap)",
                param="max_tokens",
                code="max_tokens_over_cap",
            )
        return requested

    def sampler_chain(req: CompletionRequest | ChatRequest):
        from anexa_core.infer.sampling import build_chain, parse_sampler_options

        specs = list(req.anexa.samplers)
        try:
            named = parse_sampler_options(specs)
            for option in ("temperature", "top_p"):
                if getattr(req, option) is not None and option in named:
                    raise invalid(f"{option} is given twice: as {option} and in anexa.samplers", param=option)
            if req.top_p is not None:
                specs.append(f"top_p={req.top_p!r}")
            return build_chain(specs, req.temperature)
        except AnexaError as exc:
            raise invalid(str(exc), param="anexa.samplers", code="invalid_sampler") from None

    async def encode(served: ServedModel, prompt: str, param: str, own_text: str | None = None) -> list[int]:
        """The prompt's ids; 400 naming the characters the tokenizer cannot encode, or an empty prompt.

        ``own_text``: the request's own text inside ``prompt`` (chat): when it encodes but the prompt does
        not, the chat template's text is to blame and the message says so.
        """
        try:
            ids = await anyio.to_thread.run_sync(encode_prompt, served.tokenizer, prompt)
        except AnexaError as exc:
            hint = ""
            if own_text is not None:
                try:
                    await anyio.to_thread.run_sync(encode_prompt, served.tokenizer, own_text)
                    hint = " (they come from the chat template: change it with anexa.chat_template or --chat-template)"
                except AnexaError:
                    pass
            raise invalid(f"{exc}{hint}", param=param, code="unencodable_prompt") from None
        if not ids:
            raise invalid("the prompt is empty: give at least one character of text", param=param)
        return ids

    def parse(kind: type[CompletionRequest] | type[ChatRequest], data: dict[str, Any]):
        try:
            req = kind.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        problem = req.unsupported()
        if problem:
            raise invalid(problem[1], param=problem[0], code="unsupported")
        return req

    async def respond(
        request: Request, req, served: ServedModel, prompt: str, prompt_ids: list[int], stops: list[str], chat: bool
    ) -> Response:
        """Generate for a checked request: one JSON answer, or server-sent events when ``req.stream``."""
        generation = Generation(
            served, prompt, prompt_ids, max_tokens(req.max_tokens), sampler_chain(req), req.seed, stops, engine.stats
        )
        ticket = engine.admit()  # the last check: from here on the ticket is always released
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": served.name,
        }
        if not req.stream:
            try:
                async with aclosing(engine.stream(ticket, generation)) as pieces:
                    async for _ in pieces:
                        if await request.is_disconnected():
                            break  # nobody will read the answer: stop generating
            except AnexaError as exc:
                raise invalid(str(exc), code="generation_failed") from None
            finally:
                ticket.release()
            choice = _choice(chat, generation.text, generation.finish_reason)
            return JSONResponse({**head, "choices": [choice], "usage": generation.usage()})

        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncGenerator[str, None]:
            try:
                if chat:
                    yield _sse(_chunk(head, chat, role=True))
                async with aclosing(engine.stream(ticket, generation)) as pieces:
                    async for piece in pieces:
                        yield _sse(_chunk(head, chat, piece))
                yield _sse(_chunk(head, chat, finish=generation.finish_reason))
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": generation.usage()})
            except AnexaError as exc:  # the status line is sent: report in the stream, as OpenAI does
                yield _sse(invalid(str(exc), code="generation_failed").body())
            except Exception:
                logger.exception("generation failed on %s", request.url.path)
                yield _sse(SERVER_ERROR.body())
            finally:
                ticket.release()
            yield _sse("[DONE]")

        return SSEResponse(events(), cleanup=ticket.release)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(index_html, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/app.js", include_in_schema=False)
    async def page_script() -> Response:
        return Response(app_js, media_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=api)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [served.card() for served in models.values()]}

    @app.get("/v1/models/{model_id:path}", dependencies=api)
    async def get_model(model_id: str) -> dict[str, Any]:
        return pick_model(model_id).card()

    @app.post("/v1/completions", dependencies=api)
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await read_json(request))
        served = pick_model(req.model)
        prompt = req.prompt_text()
        prompt_ids = await encode(served, prompt, "prompt")
        return await respond(request, req, served, prompt, prompt_ids, req.stops(), chat=False)

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await read_json(request))
        served = pick_model(req.model)
        template = config.chat_template
        if req.anexa.chat_template:
            try:
                template = template.updated(req.anexa.chat_template)
            except (AnexaError, TypeError) as exc:
                raise invalid(str(exc), param="anexa.chat_template", code="invalid_value") from None
        messages = []
        for index, message in enumerate(req.messages):
            role = ROLE_ALIASES.get(message.role, message.role)
            if role not in ROLES:
                raise invalid(
                    f"messages[{index}].role {message.role!r} is not supported: use system, user or assistant",
                    param=f"messages[{index}].role",
                    code="invalid_value",
                )
            messages.append((role, message.text()))
        prompt = template.render(messages)
        prompt_ids = await encode(served, prompt, "messages", own_text="".join(text for _, text in messages))
        stops = list(dict.fromkeys([*req.stops(), *template.stop]))
        return await respond(request, req, served, prompt, prompt_ids, stops, chat=True)

    return app
