"""Ollama's API: POST /api/chat and /api/generate (NDJSON streams by default, or one object), GET /api/tags,
/api/version and /api/ps, POST /api/show. Durations are nanoseconds, as Ollama's."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from edgellm import __version__
from edgellm.gguf_info import ModelInfo
from edgellm.model_defaults import resolve_defaults
from edgellm.runtime import grammar
from edgellm.server import jobs
from edgellm.server.catalog import Catalog, Entry
from edgellm.server.driver import Driver, Job, ServeError
from edgellm.server.limits import MAX_MESSAGES, MAX_STOPS, MAX_TOKENS
from edgellm.tools.declare import Tool, ToolError, read_tools
from edgellm.tools.parse import parse
from edgellm.tools.watch import CallWatch


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore")
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=100.0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_predict: int | None = Field(None, ge=-2, le=MAX_TOKENS)  # -1: until the context is full
    num_ctx: int | None = Field(None, ge=16, le=1 << 20)
    seed: int | None = None
    stop: list[str] | None = Field(None, max_length=MAX_STOPS)

    def settings(self) -> dict[str, Any]:
        seed = self.seed if self.seed is None or self.seed >= 0 else None  # Ollama's -1: a random seed
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repeat_penalty": self.repeat_penalty, "seed": seed,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty}


class OllamaFunction(BaseModel):
    name: str = Field(max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    function: OllamaFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[OllamaCall] | None = None
    tool_name: str | None = None  # a tool's result: the function it came from

    def as_template_message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": c.function.model_dump()} for c in self.tool_calls]
        if self.role == "tool" and self.tool_name:
            out["name"] = self.tool_name
        return out


class Base(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=512)
    stream: bool = True
    options: Options = Field(default_factory=Options)
    keep_alive: str | float | None = None
    format: str | dict | None = None

    def check(self) -> None:
        self.grammar()  # a bad schema: a 400 before the job is queued

    def grammar(self) -> str | None:
        """Structured output: "json" (any JSON object) or a JSON schema -> the GBNF the reply follows."""
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return grammar.json_object_gbnf()
        if isinstance(self.format, str):
            raise ServeError(f'format {self.format!r}: use "json" or a JSON schema object', 400)
        try:
            return grammar.schema_to_gbnf(self.format)
        except grammar.SchemaError as e:
            raise ServeError(f"format: {e}", 400) from e


class ChatBody(Base):
    messages: list[Message] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list[Any] | None = None

    @cached_property
    def declared(self) -> list[Tool]:
        """The tools, checked once per request; a bad definition is a 400 naming where."""
        try:
            return read_tools(self.tools)
        except ToolError as e:
            raise ServeError(str(e), 400) from None

    def check(self) -> None:
        _ = self.declared  # the tools checked here (a 400 if not), kept for the handler
        super().check()


class GenerateBody(Base):
    prompt: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[str] | None = None


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients


DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")


def keep_alive_seconds(value: str | float | None) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a duration ("5m", "1h", "0"); negative keeps it loaded."""
    if value is None:
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = DURATION.match(value.strip())
        if not m:
            raise ServeError(f"keep_alive {value!r}: use seconds or a duration such as 5m", 400)
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float("inf") if seconds < 0 else seconds


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def details(info: ModelInfo) -> dict[str, Any]:
    n = info.n_params
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    return {"parent_model": "", "format": "gguf", "family": info.arch, "families": [info.arch],
            "parameter_size": size, "quantization_level": info.file_type}


def router(driver: Driver, catalog: Catalog) -> APIRouter:
    r = APIRouter()

    @r.get("/api/version")
    async def version() -> dict:
        return {"version": __version__}

    @r.get("/api/tags")
    async def tags() -> dict:
        entries = await asyncio.to_thread(catalog.entries)
        return {"models": [tag(e) for e in entries]}

    @r.get("/api/ps")
    async def ps() -> dict:
        out = []
        for m in driver.loaded():
            plan = m["plan"]
            out.append({"name": m["name"], "model": m["name"], "size": plan.peak_bytes, "size_vram": plan.vram_bytes,
                        "digest": "", "details": details(plan.target.info), "context_length": m["n_ctx"],
                        "expires_at": datetime.fromtimestamp(min(m["expires_at"], 4e9), UTC).isoformat()})
        return {"models": out}

    @r.post("/api/show")
    async def show(body: ShowBody) -> dict:
        entry = await asyncio.to_thread(catalog.find, body.model or body.name or "")
        info = entry.info
        sampling = resolve_defaults(info).sampling
        params = "\n".join(f"{k} {v}" for k, v in (("temperature", sampling.temperature), ("top_k", sampling.top_k),
                                                  ("top_p", sampling.top_p), ("min_p", sampling.min_p),
                                                  ("repeat_penalty", sampling.repeat_penalty)))
        model_info = {"general.architecture": info.arch, "general.name": info.name,
                      "general.parameter_count": info.n_params, f"{info.arch}.context_length": info.n_ctx_train,
                      f"{info.arch}.block_count": info.n_layer, f"{info.arch}.embedding_length": info.n_embd}
        return {"modelfile": f"FROM {entry.name}\n", "parameters": params, "template": info.chat_template or "",
                "details": details(info), "model_info": model_info,
                "modified_at": datetime.fromtimestamp(entry.modified, UTC).isoformat(),
                "capabilities": ["completion", "tools"] if info.chat_template else ["completion"]}

    @r.post("/api/chat")
    async def chat(body: ChatBody, request: Request):
        body.check()
        entry = await asyncio.to_thread(catalog.find, body.model)
        messages = [m.as_template_message() for m in body.messages]
        if not messages:  # Ollama loads the model and answers at once
            return JSONResponse(await preload(driver, entry, body, {"message": {"role": "assistant", "content": ""}}))
        tools = body.declared
        job = make_job(entry, messages, None, body)
        job.tools = [t.as_template() for t in tools] or None
        return await respond(driver, job, body, chat_message, request, tools)

    @r.post("/api/generate")
    async def generate(body: GenerateBody, request: Request):
        body.check()
        if body.template:
            raise ServeError("template: a request cannot replace the model's chat template", 400)
        entry = await asyncio.to_thread(catalog.find, body.model)
        if not body.prompt:
            return JSONResponse(await preload(driver, entry, body, {"response": ""}))
        if body.raw:
            job = make_job(entry, None, body.prompt, body)
        else:
            system = [{"role": "system", "content": body.system}] if body.system else []
            job = make_job(entry, [*system, {"role": "user", "content": body.prompt}], None, body)
        return await respond(driver, job, body, lambda text, calls=(): {"response": text}, request)

    return r


def tag(e: Entry) -> dict[str, Any]:
    return {"name": e.name, "model": e.name, "modified_at": datetime.fromtimestamp(e.modified, UTC).isoformat(),
            "size": e.info.size_bytes, "digest": "", "details": details(e.info)}


def make_job(entry: Entry, messages: list[dict] | None, prompt: str | None, body: Base) -> Job:
    o = body.options
    n = o.num_predict
    max_tokens = None if n is None or n < 0 else max(n, 1)
    return Job(entry, messages, prompt, {**o.settings(), "grammar": body.grammar()}, max_tokens, list(o.stop or []),
               asyncio.get_running_loop(), n_ctx=o.num_ctx, keep_alive_s=keep_alive_seconds(body.keep_alive))


async def preload(driver: Driver, entry: Entry, body: Base, empty: dict) -> dict:
    """A request with nothing to answer loads the model (Ollama's way to warm one up)."""
    job = make_job(entry, None, " ", body)
    job.max_tokens = 1
    await jobs.start(driver, job)
    await jobs.collect(driver, job)
    return {"model": body.model, "created_at": now_iso(), **empty, "done": True, "done_reason": "load"}


def final(body: Base, started: jobs.Started, out_stats, finish: str | None, total_s: float) -> dict[str, Any]:
    s = out_stats
    return {"done": True, "done_reason": jobs.public_finish(finish), "total_duration": int(total_s * 1e9),
            "load_duration": int(started.load_s * 1e9), "prompt_eval_count": started.prompt_tokens,
            "prompt_eval_duration": int(s.prefill_s * 1e9), "eval_count": s.generated_tokens,
            "eval_duration": int(s.decode_s * 1e9), "x_edgellm": jobs.extension(s, finish)}


def chat_message(text: str, calls: tuple | list = ()) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [c.ollama() for c in calls]
    return {"message": message}


async def respond(driver: Driver, job: Job, body: Base, content, request: Request, tools: list[Tool] | None = None):
    """`content(text, calls)`: the fields that carry a piece of the reply; with `tools`, the calls are read
    out of the reply (and held back from the stream until it ends)."""
    t0 = asyncio.get_running_loop().time()
    started = await jobs.start(driver, job)
    if not body.stream:
        out = await jobs.collect(driver, job, request)
        if out.finish_reason == "error":
            raise ServeError(out.last.event if out.last and out.last.event else "generation failed", 500)
        elapsed = asyncio.get_running_loop().time() - t0
        parsed = parse(out.text, tools or [])
        text = parsed.content.strip() if parsed.calls else out.text
        return JSONResponse({"model": body.model, "created_at": now_iso(), **content(text, parsed.calls),
                             **final(body, started, out.stats, out.finish_reason, elapsed)})

    watch = CallWatch(tools) if tools else None

    async def lines() -> AsyncIterator[str]:
        try:
            async for record in jobs.records(driver, job):
                text = watch.feed(record.text) if watch is not None else record.text
                if record.finish_reason is None:
                    if record.event:  # a worker gone: a note beside the text
                        yield json.dumps({"model": body.model, "created_at": now_iso(), **content(""), "done": False,
                                          "x_edgellm": {"event": record.event}}) + "\n"
                    if text:
                        yield json.dumps({"model": body.model, "created_at": now_iso(), **content(text),
                                          "done": False}, ensure_ascii=False) + "\n"
                    continue
                if record.finish_reason == "error":
                    yield json.dumps({"error": record.event or "generation failed"}) + "\n"
                    return
                elapsed = asyncio.get_running_loop().time() - t0
                calls: list = []
                if watch is not None:
                    rest, parsed = watch.finish()
                    text += rest
                    calls = parsed.calls
                if text or calls:
                    yield json.dumps({"model": body.model, "created_at": now_iso(), **content(text, calls),
                                      "done": False}, ensure_ascii=False) + "\n"
                yield json.dumps({"model": body.model, "created_at": now_iso(), **content(""),
                                  **final(body, started, record.stats, record.finish_reason, elapsed)}) + "\n"
        except ServeError as e:
            yield json.dumps({"error": str(e)}) + "\n"

    return jobs.JobStream(lines(), driver, job, media_type="application/x-ndjson")
