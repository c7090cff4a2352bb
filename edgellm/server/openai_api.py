"""OpenAI's API: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events or not),
GET /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import cached_property
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from edgellm.runtime import grammar
from edgellm.server import jobs
from edgellm.server.catalog import Catalog
from edgellm.server.driver import Driver, Job, ServeError
from edgellm.server.limits import MAX_MESSAGES, MAX_STOPS, MAX_TOKENS
from edgellm.tools.declare import Choice, Tool, ToolError, read_choice, read_tools
from edgellm.tools.force import call_gbnf
from edgellm.tools.parse import parse
from edgellm.tools.watch import CallWatch

UNSUPPORTED = ("functions", "function_call", "logprobs", "top_logprobs", "logit_bias")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(max_length=64)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field("", max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back in an agent loop
    tool_call_id: str | None = None  # a tool's result: the call it answers

    def as_template_message(self, names: dict[str, str]) -> dict[str, Any]:
        """The message as chat templates take it: calls' arguments as objects (templates `tojson` them), a
        tool result with its function's name (`names`: the calls so far, by id)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    arguments = json.loads(c.function.arguments or "{}")
                except ValueError:
                    raise ServeError(f"tool_calls: the arguments of {c.function.name!r} are not JSON", 400) from None
                names[c.id] = c.function.name
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": arguments}})
            out["tool_calls"] = calls
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id or ""
            out["name"] = self.name or names.get(self.tool_call_id or "", "")
        return out


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | StrictBool | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the reply always follows the schema, strict or not


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> str | None:
        """The GBNF a reply must follow (None: free text); a schema the grammar cannot express is a 400."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return grammar.json_object_gbnf()
        if self.json_schema is None:
            raise ServeError('response_format: type json_schema needs "json_schema": {"name": ..., "schema": {...}}', 400)
        if self.json_schema.schema_ is None:
            return grammar.json_object_gbnf()
        try:
            return grammar.schema_to_gbnf(self.json_schema.schema_)
        except grammar.SchemaError as e:
            raise ServeError(f"response_format.json_schema.schema: {e}", 400) from e


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int | None = Field(None, ge=1)
    user: str | None = None
    # llama.cpp's samplers beyond OpenAI's (llama-server takes them too)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=100.0)
    response_format: ResponseFormat | None = None  # structured output: a grammar (runtime/grammar.py)
    ignore_eos: bool = False  # llama-server's: go on past end-of-generation to max_tokens (benchmarks)

    def check(self) -> None:
        if self.n is not None and self.n > 1:
            raise ServeError("n > 1 is not supported: send one request per completion", 400)
        extra = self.model_extra or {}
        asked = [k for k in UNSUPPORTED if extra.get(k) not in (None, [], {})]
        if asked:
            raise ServeError(f"{', '.join(asked)}: not supported by this server yet", 400)
        if len(self.stops()) > MAX_STOPS:
            raise ServeError(f"at most {MAX_STOPS} stop strings", 400)
        self.grammar()  # a bad schema: a 400 before the job is queued

    def grammar(self) -> str | None:
        return self.response_format.grammar() if self.response_format is not None else None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repeat_penalty": self.repeat_penalty, "seed": self.seed,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "grammar": self.grammar(), "ignore_eos": self.ignore_eos}


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @cached_property
    def declared(self) -> tuple[list[Tool], Choice]:
        """The tools and the choice, checked once per request (check, grammar, settings and the handler all
        ask); a bad definition is a 400 naming where."""
        try:
            tools = read_tools(self.tools)
            return tools, read_choice(self.tool_choice, tools)
        except ToolError as e:
            raise ServeError(str(e), 400) from None

    def check(self) -> None:
        _, choice = self.declared
        if choice.forced and self.grammar_from_format():
            raise ServeError("tool_choice forces a call: response_format cannot shape the reply too", 400)
        super().check()  # the grammar too: the forcing one included

    def grammar(self) -> str | None:
        tools, choice = self.declared
        if not choice.forced and (choice.mode == "auto" or self.grammar_from_format()):
            return super().grammar()
        try:
            return call_gbnf(tools, choice)
        except ToolError as e:
            raise ServeError(str(e), 400) from None

    def grammar_from_format(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    def template_messages(self) -> list[dict[str, Any]]:
        names: dict[str, str] = {}
        return [m.as_template_message(names) for m in self.messages]


class CompletionRequest(Sampling):
    prompt: str | list[str]


def router(driver: Driver, catalog: Catalog) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def models() -> dict:
        entries = await asyncio.to_thread(catalog.entries)
        return {"object": "list", "data": [{"id": e.name, "object": "model", "created": int(e.modified),
                                            "owned_by": "edgellm"} for e in entries]}

    @r.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        body.check()
        entry = await asyncio.to_thread(catalog.find, body.model)
        tools, choice = body.declared
        offered = tools if choice.mode != "none" else []  # "none": the model is not shown the tools
        job = Job(entry, body.template_messages(), None, body.settings(),
                  body.max_completion_tokens or body.max_tokens, body.stops(), asyncio.get_running_loop(),
                  tools=[t.as_template() for t in offered] or None)
        return await respond(driver, job, body, "chat.completion", request, offered, choice)

    @r.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ServeError("send one prompt per request", 400)
        entry = await asyncio.to_thread(catalog.find, body.model)
        job = Job(entry, None, prompts[0], body.settings(), body.max_tokens, body.stops(), asyncio.get_running_loop())
        return await respond(driver, job, body, "text_completion", request, [], Choice("none"))

    return r


async def respond(driver: Driver, job: Job, body: Sampling, kind: str, request: Request, tools: list[Tool],
                  tool_choice: Choice):
    started = await jobs.start(driver, job)
    rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        watch = CallWatch(tools, hold_all=tool_choice.forced) if tools else None
        return jobs.JobStream(events(driver, job, body.model, rid, created, kind, started.prompt_tokens,
                                     include_usage, watch), driver, job, media_type="text/event-stream")
    out = await jobs.collect(driver, job, request)
    if out.finish_reason == "error":
        raise ServeError(out.last.event if out.last and out.last.event else "generation failed", 500)
    usage = usage_of(started.prompt_tokens, out.stats.generated_tokens)
    if kind == "chat.completion":
        parsed = parse(out.text, tools)
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        finish = jobs.public_finish(out.finish_reason)
        if parsed.calls:
            message = {"role": "assistant", "content": parsed.content.strip() or None,
                       "tool_calls": [c.openai() for c in parsed.calls]}
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": jobs.public_finish(out.finish_reason)}
    return JSONResponse({"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice],
                         "usage": usage, "x_edgellm": jobs.extension(out.stats, out.finish_reason)})


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def events(driver: Driver, job: Job, model: str, rid: str, created: int, kind: str, prompt_tokens: int,
                 include_usage: bool, watch: CallWatch | None = None) -> AsyncIterator[str]:
    """The reply as server-sent events; with tools, `watch` holds back what may be a call, and the calls go
    out as tool_calls deltas (each whole, with its index) before the finish."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False, calls: list | None = None,
              **extra: Any) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": i, **c.openai()} for i, c in enumerate(calls)]
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    if chat:
        yield chunk(None, None, first=True)
    last = None
    try:
        async for record in jobs.records(driver, job):
            last = record
            text = watch.feed(record.text) if watch is not None else record.text
            if record.finish_reason is None and record.event:  # a worker gone: a note beside the text
                yield chunk(None, None, x_edgellm={"event": record.event})
            if record.finish_reason is None and text:
                yield chunk(text, None)
            elif record.finish_reason is not None:
                if record.finish_reason == "error":
                    err = {"message": record.event or "generation failed", "type": "server_error", "code": 500}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    return
                finish = jobs.public_finish(record.finish_reason)
                if watch is not None:
                    rest, parsed = watch.finish()
                    text += rest
                    if parsed.calls:
                        if text:
                            yield chunk(text, None)
                        text = ""
                        yield chunk(None, None, calls=parsed.calls)
                        finish = "tool_calls"
                if text:
                    yield chunk(text, None)
                yield chunk(None, finish, x_edgellm=jobs.extension(record.stats, record.finish_reason))
    except ServeError as e:
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'code': e.status}})}\n\n"
        return
    if include_usage and last is not None:
        usage = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                 "usage": usage_of(prompt_tokens, last.stats.generated_tokens)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"
