"""`multimoe serve`: an OpenAI-compatible server in which every tenant is a model.

`/v1/models` lists the tenants; `/v1/completions` and `/v1/chat/completions` run a request as
the tenant its `model` field names (each with its own tokenizer and chat template where it has
them), in the one running batch of `ServingLoop`; `/metrics` and `/health` watch it. Built on
FastAPI, uvicorn and the `openai` package's types, as `transformers serve` is, and answering as
it does where it has chosen: streamed chunks as SSE `data:` lines with the finish reason and usage
in the last, a default of at least 1024 new tokens. Errors come in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`): 404 for an unknown model, 400 for malformed
JSON, bad or unsupported parameters and a prompt longer than the context.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta
from transformers import PreTrainedTokenizerBase

from ..validation import is_finite
from .continuous import Job, ServingLoop
from .engine import Engine
from .metrics import ServingMetrics
from .trace import Request

MIN_DEFAULT_NEW_TOKENS = 1024  # `transformers serve`'s floor for a request that names no limit
UNSET_CONTEXT = 10**29  # above this, a tokenizer's model_max_length is transformers' "unset" sentinel
MAX_STOP_STRINGS = 4  # OpenAI's limit
SHUTDOWN_MARGIN_S = 5  # for the aborted requests' last events to reach their clients
# Fields that change nothing here; any other field this server does not implement is refused
# (a silently ignored `n`, `logprobs` or `tools` would answer something else than was asked).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "safety_identifier", "stream_options",
                  "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"}
# `ignore_eos`: vLLM's extension (`extra_body={"ignore_eos": True}`), for load tests.
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n", "ignore_eos"}
CHAT_FIELDS = COMPLETION_FIELDS - {"prompt"} | {"messages", "max_completion_tokens"}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response_body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.response_body()}, status_code=self.status)


def ended(job: Job, reason: str) -> ApiError:
    """The error of a request the server could not finish: shut down ("abort"), or failed."""
    if reason == "abort":
        return ApiError(503, "The server shut down before this request finished.", code="server_shutdown")
    return ApiError(500, f"The engine failed on this request: {job.error}", code="engine_error")


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def is_plain_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_neutral(name: str, value: object) -> bool:
    """A value of an unimplemented parameter that asks for nothing (clients such as LangChain's
    send them by default): no penalty, no bias, one candidate, no echo, no log-probabilities."""
    if name in ("presence_penalty", "frequency_penalty"):
        return is_plain_number(value) and value == 0
    if name == "best_of":
        return type(value) is int and value == 1
    if name in ("echo", "logprobs"):
        return value is False
    return name == "logit_bias" and value == {}


def check_fields(body: dict, accepted: set[str]) -> None:
    for name, value in body.items():
        if name in accepted or name in IGNORED_FIELDS or value is None or is_neutral(name, value):
            continue
        raise bad(name, f"Unsupported parameter '{name}': this server does not implement it.")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise bad("n", "Only n=1 is supported.")


def number(body: dict, name: str, low: float, high: float, *, integer: bool = False, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if not (is_plain_number(value) and is_finite(value)) or (integer and not isinstance(value, int)):
        raise bad(name, f"'{name}' must be {'an integer' if integer else 'a finite number'}, got {value!r:.40}.")
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad(name, f"'{name}' must be in {interval}, got {value!r}.")
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 0 < len(stops) <= MAX_STOP_STRINGS or not all(
        isinstance(text, str) and text for text in stops
    ):
        raise bad("stop", f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them.")
    return tuple(stops)


def chat_messages(body: dict) -> list[dict]:
    """The messages, each content a string (text parts of a list are joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {'role', 'content'} objects.")
    plain = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(content, str):
            raise bad(f"messages[{index}]", f"messages[{index}] must have a string 'role' and a text 'content'.")
        plain.append({"role": message["role"], "content": content})
    return plain


class Tenants:
    """What the server knows of each tenant: its tokenizer and its context length."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase | None, tenant_tokenizers: Mapping[str, PreTrainedTokenizerBase]):
        self.names = list(model.tenants)
        missing = [name for name in self.names if name not in tenant_tokenizers and tokenizer is None]
        if missing:
            raise ValueError(f"No tokenizer for tenants {missing}: give the shared one (the checkpoint's own) or theirs.")
        self.tokenizers = {name: tenant_tokenizers.get(name, tokenizer) for name in self.names}
        self.model_context = model.config.max_position_embeddings

    def resolve(self, body: dict) -> str:
        name = body.get("model")
        if not isinstance(name, str):
            raise bad("model", "'model' must name a tenant (see /v1/models).")
        if name not in self.tokenizers:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves {self.names}.", "model",
                           "model_not_found")
        return name

    def context(self, name: str) -> int:
        """The model's positions, or the tokenizer's limit where it sets a smaller one."""
        limit = self.tokenizers[name].model_max_length
        return min(limit, self.model_context) if limit and limit < UNSET_CONTEXT else self.model_context


def sse(chunk) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


class OpenAIServer:
    """The FastAPI application (`.app`) over one `ServingLoop`."""

    def __init__(self, model, tokenizer=None, *, tenant_tokenizers: Mapping[str, PreTrainedTokenizerBase] | None = None,
                 max_batch_size: int = 8, shutdown_timeout_s: float = 30.0):
        self.tenants = Tenants(model, tokenizer, tenant_tokenizers or {})
        self.model = model
        self.metrics = ServingMetrics(self.tenants.names)
        engine = Engine(model, tokenizer, lambda rows: {"tenant_names": list(rows)}, self.tenants.tokenizers)
        self.loop = ServingLoop(engine, max_batch_size=max_batch_size, metrics=self.metrics)
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stopper: threading.Thread | None = None
        self.created = int(time.time())
        self.app = self.routes(FastAPI(title="multimoe", lifespan=self.lifespan))

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.loop.start()
        yield
        self.begin_shutdown()
        await asyncio.to_thread(self.stopper.join)

    def begin_shutdown(self) -> None:
        """Refuse new requests; in-flight ones finish within `shutdown_timeout_s` or are aborted."""
        if self.stopper is None:
            self.stopper = threading.Thread(target=self.loop.stop, args=(self.shutdown_timeout_s,), daemon=True)
            self.stopper.start()

    def routes(self, app: FastAPI) -> FastAPI:
        @app.exception_handler(ApiError)
        async def api_error(_, error: ApiError):
            return error.response()

        @app.get("/v1/models")
        async def models():
            data = [Model(id=name, created=self.created, object="model", owned_by="multimoe").model_dump()
                    for name in self.tenants.names]
            return {"object": "list", "data": data}

        @app.post("/v1/completions")
        async def completions(http: HttpRequest):
            return await self.generate(http, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(http: HttpRequest):
            return await self.generate(http, chat=True)

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

        @app.get("/health")
        async def health():
            if not self.loop.thread.is_alive():
                return JSONResponse({"status": "unhealthy", "reason": "the engine thread is not running"}, status_code=503)
            return {"status": "ok"}

        return app

    async def read_body(self, http: HttpRequest) -> dict:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"The request body is not valid JSON ({error}).") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    def prompt(self, body: dict, tenant: str, chat: bool) -> tuple[str, list[int]]:
        """The prompt's text and token ids, by the tenant's own tokenizer (and chat template)."""
        tokenizer = self.tenants.tokenizers[tenant]
        if chat:
            if not tokenizer.chat_template:
                raise bad("messages", f"The model '{tenant}' has no chat template; use /v1/completions.")
            try:
                text = tokenizer.apply_chat_template(chat_messages(body), add_generation_prompt=True, tokenize=False)
            except (TemplateError, ValueError, TypeError) as error:  # the template refuses the messages
                raise bad("messages", f"The chat template of '{tenant}' refused the messages: {error}") from None
            if not text:
                raise bad("messages", f"The chat template of '{tenant}' renders these messages to an empty prompt.")
            return text, tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote them
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str) or not text:
            raise bad("prompt", "'prompt' must be a non-empty string.")
        return text, tokenizer(text)["input_ids"]

    def request(self, body: dict, chat: bool) -> Request:
        """Everything checked, in OpenAI's terms, before the request reaches the batch."""
        check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
        tenant = self.tenants.resolve(body)
        temperature = number(body, "temperature", 0, 2)
        top_p = number(body, "top_p", 0, 1, low_open=True)
        seed = number(body, "seed", 0, 2**63 - 1, integer=True)
        limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = number(body, limit_name, 1, math.inf, integer=True)
        for flag in ("stream", "ignore_eos"):
            if body.get(flag) is not None and not isinstance(body[flag], bool):
                raise bad(flag, f"'{flag}' must be a boolean.")
        stop = stop_strings(body)
        text, ids = self.prompt(body, tenant, chat)
        context = self.tenants.context(tenant)
        if len(ids) >= context or (max_tokens is not None and len(ids) + max_tokens > context):
            asked = f"{len(ids)} in the prompt" + (f" and {max_tokens} to generate" if max_tokens else "")
            raise bad("messages" if chat else "prompt",
                      f"This model's maximum context length is {context} tokens; the request asks for {asked}.")
        # Unset settings come from the tenant's generation config, as `transformers serve` takes the model's.
        defaults = self.model.generation_configs[tenant]
        if max_tokens is None:
            max_tokens = min(max(defaults.max_new_tokens or 0, MIN_DEFAULT_NEW_TOKENS), context - len(ids))
        if temperature is None:
            temperature = (1.0 if defaults.temperature is None else defaults.temperature) if defaults.do_sample else 0.0
        if top_p is None:
            top_p = (defaults.top_p or 1.0) if defaults.do_sample else 1.0
        return Request(request_id=0, tenant=tenant, arrival_s=0.0, prompt=text, max_new_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                       ignore_eos=bool(body.get("ignore_eos")), prompt_ids=tuple(ids))

    async def generate(self, http: HttpRequest, *, chat: bool):
        body = await self.read_body(http)
        request = self.request(body, chat)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(text: str, reason: str | None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (text, reason))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        job = Job(request, emit)
        try:
            self.loop.submit(job)
        except RuntimeError as error:
            raise ApiError(503, str(error)) from None
        answer = Answer(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", request.tenant, len(request.prompt_ids),
                        chat, int(time.time()))
        if body.get("stream"):
            return StreamingResponse(self.stream(answer, events, job), media_type="text/event-stream")
        collected = await self.collect(http, events, job)
        if collected is None:  # the client left: nobody reads an answer
            return Response(status_code=499)
        text, reason = collected
        if reason in ("abort", "error"):
            raise ended(job, reason)
        return JSONResponse(answer.whole(text, reason, job.tokens).model_dump(exclude_none=True))

    async def collect(self, http: HttpRequest, events: asyncio.Queue, job: Job) -> tuple[str, str] | None:
        """The whole answer and its finish reason; None when the client leaves meanwhile, which
        frees its row (checked twice a second)."""
        pieces = []
        while True:
            try:
                text, reason = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    job.cancelled.set()
                    return None
                continue
            pieces.append(text)
            if reason is not None:
                return "".join(pieces), reason

    async def stream(self, answer: Answer, events: asyncio.Queue, job: Job) -> AsyncIterator[str]:
        finished = False
        try:
            if answer.chat:
                yield sse(answer.chunk(ChoiceDelta(role="assistant", content="")))
            while not finished:
                text, reason = await events.get()
                finished = reason is not None
                if reason in ("abort", "error"):
                    yield f"data: {json.dumps({'error': ended(job, reason).response_body()})}\n\n"
                    return
                if text:
                    yield sse(answer.chunk(ChoiceDelta(content=text) if answer.chat else text))
                if finished:
                    yield sse(answer.chunk(ChoiceDelta() if answer.chat else "", reason, job.tokens))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client left (the server cancels this generator): free the row now
                job.cancelled.set()


class Answer:
    """The response objects of one request, in the `openai` package's types."""

    def __init__(self, answer_id: str, tenant: str, prompt_tokens: int, chat: bool, created: int):
        self.id, self.tenant, self.prompt_tokens, self.chat, self.created = answer_id, tenant, prompt_tokens, chat, created

    def usage(self, completion_tokens: int) -> CompletionUsage:
        return CompletionUsage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                               total_tokens=self.prompt_tokens + completion_tokens)

    def whole(self, text: str, reason: str, tokens: int) -> Completion | ChatCompletion:
        if self.chat:
            choice = ChatChoice(index=0, message=ChatCompletionMessage(role="assistant", content=text), finish_reason=reason)
            return ChatCompletion(id=self.id, object="chat.completion", created=self.created, model=self.tenant,
                                  choices=[choice], usage=self.usage(tokens))
        choice = CompletionChoice(index=0, text=text, finish_reason=reason, logprobs=None)
        return Completion(id=self.id, object="text_completion", created=self.created, model=self.tenant,
                          choices=[choice], usage=self.usage(tokens))

    def chunk(self, delta, reason: str | None = None, tokens: int | None = None):
        """A streamed piece; the last carries the finish reason and the usage. Built unvalidated
        (`model_construct`): a mid-stream chunk has no finish reason, which the types' literals refuse."""
        usage = None if tokens is None else self.usage(tokens)
        if self.chat:
            choice = ChunkChoice.model_construct(index=0, delta=delta, finish_reason=reason)
            return ChatCompletionChunk.model_construct(id=self.id, object="chat.completion.chunk", created=self.created,
                                                       model=self.tenant, choices=[choice], usage=usage)
        choice = CompletionChoice.model_construct(index=0, text=delta, finish_reason=reason, logprobs=None)
        return Completion.model_construct(id=self.id, object="text_completion", created=self.created, model=self.tenant,
                                          choices=[choice], usage=usage)


def load_for_serving(source: str | None, *, testbed: bool = False, device: str = "cpu", dtype: str | None = None):
    """The model and shared tokenizer `multimoe serve` runs: a saved multi-tenant checkpoint
    (directory or Hub id; its tokenizer if it has one), or the shipped testbed's four task tenants."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import testbed as shipped
    from ..modeling import MultiTenantForCausalLM

    torch_dtype = getattr(torch, dtype) if dtype else None
    if testbed:
        sources = {name: shipped.checkpoint(name) for name in shipped.TASKS}
        model = MultiTenantForCausalLM.from_models(sources, dtype=torch_dtype)
        tokenizer = shipped.tokenizer()
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):  # no shared tokenizer: every tenant must carry its own
            tokenizer = None
    return model.to(device).eval(), tokenizer


class UvicornServer(uvicorn.Server):
    """uvicorn's server for an `OpenAIServer`: on SIGINT or SIGTERM it stops accepting connections
    (uvicorn) and starts the serving loop's shutdown at once (requests in flight get
    `shutdown_timeout_s` to finish, then are aborted with an error their clients receive); uvicorn
    waits for their connections to close a little longer than that."""

    def __init__(self, server: OpenAIServer, **config):
        timeout = math.ceil(server.shutdown_timeout_s) + SHUTDOWN_MARGIN_S
        super().__init__(uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=timeout, **config))
        self.openai_server = server

    def handle_exit(self, sig, frame) -> None:
        self.openai_server.begin_shutdown()
        super().handle_exit(sig, frame)


def serve(server: OpenAIServer, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run `server` until SIGINT or SIGTERM (see `UvicornServer`)."""
    UvicornServer(server, host=host, port=port).run()


__all__ = ["ApiError", "OpenAIServer", "UvicornServer", "load_for_serving", "serve"]
