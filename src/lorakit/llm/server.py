"""An OpenAI-compatible HTTP server (FastAPI) over the engine: one base model, many adapters, each request naming
its adapter in `model` (as vLLM, LoRAX and TGI do) or a weighted stack in the extra body field `adapters`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorakit.core.errors import LoraError
from lorakit.core.model import adapters as adapter_names
from lorakit.core.model import delete, set_weights
from lorakit.formats import hub
from lorakit.formats.io import load
from lorakit.llm import engine as engine_mod


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object with this HTTP status."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


# fields that would change the output and that lorakit does not implement: refused rather than ignored
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "presence_penalty", "frequency_penalty",
               "logit_bias", "tools", "functions", "response_format", "min_tokens")


class Sampling(BaseModel):
    """The fields both endpoints share; other fields (user, metadata, ...) are accepted and ignored, except the
    output-changing ones lorakit does not implement (UNSUPPORTED), which are refused when set."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    adapters: dict[str, float] | None = None  # lorakit's extra field: a weighted stack for this request
    ignore_eos: bool = False  # as vLLM's extra field: run to max_tokens


class CompletionBody(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    lora_name: str


def create_app(engine: engine_mod.Engine, model_name: str, paths: dict[str, str],
               allow_runtime_loading: bool = False) -> FastAPI:
    """The app: /v1/models, /v1/completions, /v1/chat/completions, vLLM's load/unload endpoints, /health, /metrics."""
    app = FastAPI(title="lorakit serve")
    tok = engine.tokenizer
    created = int(time.time())
    # the served adapters (name -> path): requests are checked against this, not the model, which the engine's
    # thread changes while loading and unloading
    paths = {**{n: n for n in adapter_names(engine.model)}, **paths}

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        kind = {400: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                429: "rate_limit_error"}.get(e.status, "server_error")
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                            status_code=e.status)

    async def parse(request: Request, cls: type[BaseModel]):
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ApiError(400, f"{where}: {err['msg']}", "invalid_value", where or None) from None
        for name, value in (body.model_extra or {}).items():
            if name in UNSUPPORTED and value not in (None, False, 0, [], {}):
                raise ApiError(400, f"{name}: not supported by lorakit serve; leave it out", "unsupported", name)
        return body

    def adapter_set(body: Sampling) -> dict[str, float]:
        have = list(paths)
        if body.model not in (model_name, "base", "", *have):
            raise ApiError(404, f"the model `{body.model}` does not exist; GET /v1/models lists {model_name!r} and "
                                f"the adapters {have}", "model_not_found", "model")
        if body.adapters is not None:
            if unknown := [n for n in body.adapters if n not in have]:
                raise ApiError(400, f"adapters: no adapter named {unknown[0]!r}; the server has {have}",
                               "adapter_not_found", "adapters")
            return {n: float(w) for n, w in body.adapters.items() if w != 0}
        return {body.model: 1.0} if body.model in have else {}

    def requests_for(body: Sampling, ids: list[int], max_tokens: int | None) -> list[engine_mod.Request]:
        if not ids:
            raise ApiError(400, "the prompt is empty; give some text", "invalid_value", "prompt")
        if len(ids) >= engine.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {engine.context} tokens. "
                                "Shorten the prompt", "context_length_exceeded", "messages" if
                           isinstance(body, ChatBody) else "prompt")
        room = engine.context - len(ids)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        weights = adapter_set(body)
        return [engine_mod.Request(ids, weights, min(max_tokens or room, room), body.temperature, body.top_p,
                                   None if body.seed is None else body.seed + i, stop, body.ignore_eos)
                for i in range(body.n)]

    async def run(reqs: list[engine_mod.Request], stream: bool, chunk) -> Any:
        """Submit; then gather the texts, or stream them as server-sent events built by chunk(index, text, finish)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        for i, r in enumerate(reqs):
            r.on_event = lambda text, finish, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, text, finish))
        try:
            engine.submit(reqs)
        except engine_mod.QueueFull as e:
            raise ApiError(429, str(e), "queue_full") from None

        async def events():
            left = len(reqs)
            try:
                while left:
                    i, text, finish = await queue.get()
                    if finish and finish.startswith("error"):
                        raise ApiError(500, f"generation failed: {finish.removeprefix('error: ')}", "engine_error")
                    left -= bool(finish)
                    yield i, text, finish
            finally:
                engine.cancel([r for r in reqs if r.finish_reason is None])  # a client that left frees its rows

        if not stream:
            async for _ in events():
                pass
            return reqs

        async def sse():
            try:
                async for i, text, finish in events():
                    for c in chunk(i, text, finish):
                        yield f"data: {json.dumps(c)}\n\n"
            except ApiError as e:  # the status is sent already: the error goes in the stream
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error', 'code': e.code}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    def usage(reqs, n: int) -> dict:
        p, c = sum(len(r.ids) for r in reqs[::n]), sum(len(r.tokens) for r in reqs)  # each prompt counted once
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def finish_of(r) -> str:
        return "length" if r.finish_reason == "length" else "stop"

    @app.get("/v1/models")
    async def models():
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "lorakit", "root": model_name,
                "parent": None}
        return {"object": "list", "data": [base] + [
            {"id": n, "object": "model", "created": created, "owned_by": "lorakit", "root": paths.get(n, n),
             "parent": model_name} for n in paths]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionBody)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give at least one prompt", "invalid_value", "prompt")
        cid, n = f"cmpl-{uuid.uuid4().hex}", body.n
        reqs = [r for p in prompts for r in requests_for(body, tok(p)["input_ids"], body.max_tokens or 16)]
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(i, text, finish):
            base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": body.model}
            out = [{**base, "choices": [{"index": i, "text": text, "logprobs": None,
                                         "finish_reason": finish and finish_of(reqs[i])}]}]
            if include_usage and finish and all(r.finish_reason for r in reqs):
                out.append({**base, "choices": [], "usage": usage(reqs, n)})
            return out

        result = await run(reqs, body.stream, chunk)
        if body.stream:
            return result
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": body.model,
                "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": finish_of(r)}
                            for i, r in enumerate(reqs)],
                "usage": usage(reqs, n)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatBody)
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"the model {model_name!r} has no chat template; use /v1/completions",
                           "no_chat_template", "messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template's own complaint (roles out of order, ...)
            raise ApiError(400, f"messages: the chat template refused them: {e}", "invalid_value", "messages") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        reqs = requests_for(body, ids, body.max_completion_tokens or body.max_tokens)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        started = set()

        def chunk(i, text, finish):
            base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model}
            out = []
            if i not in started:
                started.add(i)
                out.append({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
            if text or finish:
                out.append({**base, "choices": [{"index": i, "delta": {"content": text} if text else {},
                                                 "finish_reason": finish and finish_of(reqs[i])}]})
            if include_usage and finish and all(r.finish_reason for r in reqs):
                out.append({**base, "choices": [], "usage": usage(reqs, body.n)})
            return out

        result = await run(reqs, body.stream, chunk)
        if body.stream:
            return result
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": body.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": finish_of(r)} for i, r in enumerate(reqs)],
                "usage": usage(reqs, body.n)}

    def runtime_loading():
        if not allow_runtime_loading:
            raise ApiError(403, "loading adapters at runtime is off; start the server with --allow-runtime-loading",
                           "runtime_loading_disabled")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        runtime_loading()
        body = await parse(request, LoadBody)
        if body.lora_name in (model_name, "base") or body.lora_name in paths:
            raise ApiError(400, f"lora_name: {body.lora_name!r} is taken; unload it first or pick another name",
                           "adapter_exists", "lora_name")
        if hub.parse(body.lora_path) is None and not Path(body.lora_path).exists():
            raise ApiError(400, f"lora_path: {body.lora_path}: no such file or folder", "invalid_value", "lora_path")

        def do():
            with engine.lock:
                try:
                    load(engine.model, body.lora_path, name=body.lora_name)
                finally:
                    set_weights(engine.model, {})
                    engine.changed()

        try:
            await asyncio.to_thread(do)
        except LoraError as e:
            raise ApiError(400, f"lora_path: {e}", "invalid_adapter", "lora_path") from None
        paths[body.lora_name] = body.lora_path
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        runtime_loading()
        body = await parse(request, UnloadBody)
        if body.lora_name not in paths:
            raise ApiError(404, f"lora_name: no adapter named {body.lora_name!r}", "adapter_not_found", "lora_name")
        if busy := engine.in_use(body.lora_name):
            raise ApiError(400, f"adapter {body.lora_name!r} is in use by {busy} requests; unload it when they are "
                                "done", "adapter_in_use", "lora_name")
        paths.pop(body.lora_name)  # no new request can name it from here on

        def do():
            with engine.lock:
                delete(engine.model, body.lora_name)
                engine.changed()

        await asyncio.to_thread(do)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(f"lorakit_requests_running {len(engine.running)}\n"
                                 f"lorakit_requests_waiting {len(engine.waiting)}\n"
                                 f"lorakit_engine_steps_total {engine.steps}\n")

    return app


def serve(model: str, adapters: dict[str, str], host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          max_queue: int = 64, allow_runtime_loading: bool = False, device=None, allow_pickle: bool = False):
    """Load the base and adapters, bind host:port (0: a free port), print the URL, serve until interrupted."""
    import socket

    import uvicorn

    from lorakit.llm import pretrained

    m, tokenizer, _ = pretrained.load(model)
    m = m.to(device) if device is not None else m
    for name, path in adapters.items():
        load(m, path, name=name, allow_pickle=allow_pickle)
    set_weights(m, {})
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise LoraError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None
    engine = engine_mod.Engine(m, tokenizer, max_batch, max_queue).start()
    app = create_app(engine, model, dict(adapters), allow_runtime_loading)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    print(f"lorakit: serving {model} with adapters {list(adapters) or 'none'} on "
          f"http://{host}:{sock.getsockname()[1]}/v1", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
