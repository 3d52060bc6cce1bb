"""The routes: OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``; vLLM's tokenizer
routes (``/tokenize``, ``/detokenize``, ``/tokenizer_info``, which lm-evaluation-harness uses to count
tokens with the server's own tokenizer); the chat page.

A generation request is checked completely (body, model, prompt ids, options) before anything is
decoded, then becomes a :class:`~anexa_serve.jobs.Job` whose choices are rows of the model's engine,
answered as one JSON object or as server-sent events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from anexa_core.errors import AnexaError
from anexa_core.infer.chat import JinjaTemplate
from anexa_core.infer.sampling import SamplerChain, build_chain
from anexa_serve import responses
from anexa_serve.app import SERVER_ERROR, ServerState, parse, read_json, state
from anexa_serve.chat import render
from anexa_serve.errors import APIError, invalid
from anexa_serve.jobs import ClientGone, GenerationFailed, Job, Options
from anexa_serve.models import ServedModel
from anexa_serve.prompts import chat_prompt_ids, completion_prompts
from anexa_serve.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, GenerationRequest, TokenizeRequest

logger = logging.getLogger("anexa.serve")

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

page_router = APIRouter()
api_router = APIRouter()


# --- the page and the model list ---------------------------------------------------------------------


@page_router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: `curl -I`, link checkers
async def page(request: Request) -> Response:
    html = request.app.state.pages["index.html"]
    return Response(html, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@page_router.get("/app.js", include_in_schema=False)
async def page_script(request: Request) -> Response:
    script = request.app.state.pages["app.js"]
    return Response(script, media_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)


@page_router.api_route("/health", methods=["GET", "HEAD"])
async def health() -> dict[str, Any]:
    return {"status": "ok"}


@api_router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [served.card() for served in state(request).models.values()]}


@api_router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    return state(request).pick(model_id).card()


# --- generation --------------------------------------------------------------------------------------


@api_router.post("/v1/completions")
async def completions(request: Request) -> Response:
    server = state(request)
    req = parse(CompletionRequest, await read_json(request))
    served = server.pick(req.model)
    prompts = await completion_prompts(served, req.prompt_list())
    echo = bool(req.echo)
    if echo:
        _check_echo_lengths(served, prompts)
    eos = tuple(getattr(served.tokenizer, "eos_ids", ()) or ())
    options = Options(
        token_limit(server, req, echo), sampler_chain(req, served), req.seed, req.stops(), eos, req.logprobs, echo
    )
    return await generate(request, server, served, prompts, req, options, chat=False)


@api_router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    server = state(request)
    req = parse(ChatRequest, await read_json(request))
    served = server.pick(req.model)
    messages = [{"role": message.role, "content": message.text()} for message in req.messages]
    prompt = render(server.templates[served.name], served.tokenizer, messages, req.anexa.chat_template)
    ids = await chat_prompt_ids(served, prompt)
    stops = list(dict.fromkeys([*req.stops(), *prompt.stops]))
    options = Options(
        token_limit(server, req),
        sampler_chain(req, served),
        req.seed,
        stops,
        prompt.stop_ids,
        req.top(),
        fields=("messages", req.limit()[0]),
    )
    return await generate(request, server, served, [ids], req, options, chat=True)


def token_limit(server: ServerState, req: GenerationRequest, echo: bool | None = None) -> int:
    """The tokens to generate (:meth:`ServerState.max_tokens`), a refusal naming the field the limit came
    from: chat's ``max_completion_tokens`` when ``max_tokens`` is left out."""
    field, requested = req.limit()
    return server.max_tokens(requested, echo, field)


def sampler_chain(req: GenerationRequest, served: ServedModel) -> SamplerChain:
    """The request's sampler chain: ``anexa.samplers`` (parsed once, by the core) plus ``temperature`` and
    ``top_p`` — or, when it gives none of them, the sampling the model's makers recommend
    (:attr:`ServedModel.sampling`); 400 naming the field for an unknown sampler, a bad option or a sampler
    given twice."""
    chosen = req.anexa.samplers or req.temperature is not None or req.top_p is not None
    try:
        chain = build_chain(req.anexa.samplers if chosen else served.sampling)
    except AnexaError as exc:
        raise invalid(str(exc), param="anexa.samplers", code="invalid_sampler") from None
    named = list(zip(chain.names, chain.processors, strict=True))
    for option in ("temperature", "top_p"):
        value = getattr(req, option)
        if value is None:
            continue
        if option in chain.names:
            raise invalid(f"{option} is given twice: as {option} and in anexa.samplers", param=option)
        try:
            extra = build_chain([f"{option}={float(value)!r}"])
        except AnexaError as exc:
            raise invalid(str(exc), param=option, code="invalid_sampler") from None
        named += zip(extra.names, extra.processors, strict=True)
    return SamplerChain(named)


def _check_echo_lengths(served: ServedModel, prompts: list[list[int]]) -> None:
    """``echo`` scores every prompt token, so a prompt may be at most the context plus one token long."""
    most = served.context_length + 1
    for index, ids in enumerate(prompts):
        if len(ids) > most:
            param = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            raise invalid(
                f"echo scores prompts of at most {most} tokens (the model's context of {most - 1} plus one), "
                f"this one has {len(ids)}: shorten it",
                param=param,
            )


def _check_capacity(server: ServerState, served: ServedModel, prompts: int, n: int) -> None:
    capacity = server.decoders[served.name].capacity
    if prompts * n > capacity:
        raise invalid(
            f"this request asks for {prompts * n} choices ({prompts} prompts × n={n}), more than this server "
            f"holds at once ({capacity}: --parallel plus --queue): ask for fewer",
            param="n" if n > 1 else "prompt",
        )


async def generate(
    request: Request,
    server: ServerState,
    served: ServedModel,
    prompts: list[list[int]],
    req: CompletionRequest | ChatRequest,
    options: Options,
    chat: bool,
) -> Response:
    """Decode a checked request: one JSON answer, or server-sent events when ``req.stream``."""
    _check_capacity(server, served, len(prompts), req.choices)
    text = responses.TokenText(served.tokenizer) if options.logprobs is not None else None
    token_bytes = text.bytes_of if text is not None else None
    job = Job(server.decoders[served.name], served.tokenizer, prompts, req.choices, options, token_bytes)
    job.start()  # the last check (429): from here on the job is always cancelled when it ends
    first = responses.head(chat, served.name, bool(req.stream))
    if req.stream:
        return SSEResponse(_events(job, first, chat, text, req.include_usage), cleanup=job.cancel)
    return await _whole(request, job, first, chat, text)


async def _whole(
    request: Request, job: Job, first: dict[str, Any], chat: bool, text: responses.TokenText | None
) -> Response:
    """Collect every choice, stopping when the client goes away; one JSON answer."""
    texts: dict[int, list[str]] = {choice.index: [] for choice in job.choices}
    logprobs: dict[int, dict[str, Any] | None] = dict.fromkeys(texts)
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        async for update in job.updates():
            texts[update.index].append(update.text)
            logprobs[update.index] = _merged(logprobs[update.index], responses.logprobs_of(chat, update, text))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    except GenerationFailed as exc:
        raise _failure(exc) from None
    finally:
        watcher.cancel()
        job.cancel()
    choices = [
        responses.choice(chat, c.index, "".join(texts[c.index]), c.finish_reason, logprobs[c.index])
        for c in job.choices
    ]
    return JSONResponse({**first, "choices": choices, "usage": job.usage()})


def _merged(so_far: dict[str, Any] | None, more: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two logprobs objects of one choice as one (their lists joined)."""
    if so_far is None or more is None:
        return more if so_far is None else so_far
    return {key: so_far[key] + more[key] if isinstance(more[key], list) else more[key] for key in more}


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away (the body is read: ``receive`` now only reports a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.client_gone()
            return


async def _events(
    job: Job, first: dict[str, Any], chat: bool, text: responses.TokenText | None, include_usage: bool
) -> AsyncGenerator[str, None]:
    """The server-sent events of a streaming answer: the role (chat), the text pieces and finish reasons
    of every choice as they come (each chunk names its ``index``), the usage when asked, ``[DONE]``."""
    try:
        if chat:
            for choice in job.choices:
                yield responses.sse(responses.chunk(first, chat, choice.index, role=True))
        async for batch in job.batches():  # one write for what arrived together
            yield "".join(
                responses.sse(piece) for update in batch for piece in responses.chunks_of(first, chat, update, text)
            )
        if include_usage:
            yield responses.sse({**first, "choices": [], "usage": job.usage()})
    except GenerationFailed as exc:  # the status line is sent: report in the stream, as OpenAI does
        yield responses.sse(_failure(exc).body())
    finally:
        job.cancel()
    yield responses.sse("[DONE]")


def _failure(exc: GenerationFailed) -> APIError:
    """A failure after the request was accepted: a sampler's own error is the request's (400), anything
    else the server's (500, logged where it happened)."""
    if isinstance(exc.cause, AnexaError):
        return invalid(str(exc.cause), code="generation_failed")
    return SERVER_ERROR


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


# --- the tokenizer (vLLM's routes) -------------------------------------------------------------------


@api_router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    """``{"prompt", "add_special_tokens"?, "model"?}`` → ``{"count", "max_model_len", "tokens"}``: the ids the
    model is fed for the text (``add_special_tokens``, default true: with a BOS id where the tokenizer
    asks for one)."""
    from anexa_core.infer.generation import encode_prompt

    req = parse(TokenizeRequest, await read_json(request))
    served = state(request).pick(req.model)
    try:
        ids = encode_prompt(served.tokenizer, req.prompt, bos=req.add_special_tokens)
    except AnexaError as exc:
        raise invalid(str(exc), param="prompt", code="unencodable_prompt") from None
    return {"count": len(ids), "max_model_len": served.context_length, "tokens": ids}


@api_router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    """``{"tokens", "model"?}`` → ``{"prompt"}``: the text of the ids; 400 for ids outside the vocabulary."""
    req = parse(DetokenizeRequest, await read_json(request))
    served = state(request).pick(req.model)
    vocab = int(served.model.config.vocab_size)
    wrong = next((i for i in req.tokens if not 0 <= i < vocab), None)
    if wrong is not None:
        raise invalid(f"token id {wrong} is outside the vocabulary (0 to {vocab - 1})", param="tokens")
    return {"prompt": served.tokenizer.decode(req.tokens)}


@api_router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None) -> dict[str, Any]:
    """The tokenizer's special tokens (null where it has none), the chat template the model is served
    with when it is Jinja, the context (``model_max_length``) and the vocabulary size."""
    server = state(request)
    served = server.pick(model)
    special = getattr(served.tokenizer, "special_tokens", None) or {}
    template = server.templates[served.name]
    return {
        "tokenizer_class": served.meta.get("tokenizer", {}).get("name"),
        **{key: special.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "chat_template": template.source if isinstance(template, JinjaTemplate) else None,
        "model_max_length": served.context_length,
        "vocab_size": int(served.model.config.vocab_size),
    }
