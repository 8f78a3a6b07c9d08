"""Routing a request to an engine: model registry, load balancing, retries, circuit breakers, fallback.

- A model served by several backends goes to the one with the fewest
  outstanding requests among those whose circuit is closed (or half-open for a
  trial request).
- A failure a retry may fix (connection error, 429, 5xx, timeout) is retried,
  on any backend of the model, with exponential backoff and jitter, sleeping
  at least what a Retry-After asked for. Once the first chunk went to the
  caller (and on to the client), nothing is retried: the error reaches the
  client as such.
- When every attempt failed, the model's fallback list is tried in order (say,
  an upstream first, the embedded model when it is down).
- A backend whose calls keep failing has its circuit opened for a while; then
  one trial request decides whether it closes again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter, Gauge

from inference.config import BackendsFile, EmbeddedBackend, UpstreamBackend
from inference.engine import LlamaCppEngine
from inference.upstream import UpstreamEngine, UpstreamError, guessed_capabilities
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2

log = logging.getLogger(__name__)

UPSTREAM_CALLS = Counter(
    "ragmesh_inference_backend_calls_total", "Engine calls by backend and outcome", ["backend", "outcome"]
)
# The embedded llama.cpp engine: text in, text out, tool calls (Jinja templates, see inference.tools).
EMBEDDED_CAPABILITIES = ("chat", "completion", "tools")
# The capability a content part needs; a type not listed needs a capability of its own name.
PART_CAPABILITIES = {"image_url": "vision", "input_audio": "audio", "video_url": "video"}
CIRCUIT_OPEN = Gauge(
    "ragmesh_inference_circuit_open", "1 while a backend's circuit is not closed (open or half-open)", ["backend"]
)


class Engine(Protocol):
    name: str

    def generate(
        self, request: inference_pb2.GenerateRequest, model: str
    ) -> AsyncGenerator[common_pb2.GenerationChunk, None]: ...


class EmbeddedAdapter:
    """The embedded engine behind the router's interface."""

    def __init__(self, name: str, engine: LlamaCppEngine) -> None:
        self.name = name
        self.engine = engine

    async def generate(
        self, request: inference_pb2.GenerateRequest, model: str
    ) -> AsyncGenerator[common_pb2.GenerationChunk, None]:
        if request.openai_json:
            asked = json.loads(request.openai_json)
            if asked.get("suffix"):
                raise RagmeshError(
                    ErrorKind.INVALID_REQUEST,
                    f"'suffix' is not supported by the model `{model}` (the embedded engine cannot fill in "
                    "the middle); leave it out, or use a model whose backend supports it.",
                    param="suffix",
                    code="unsupported_parameter",
                )
        routed = inference_pb2.GenerateRequest()
        routed.CopyFrom(request)
        routed.model = model
        stream = self.engine.generate(routed)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()


@dataclass
class Breaker:
    """Closed -> (failures in a row) -> open -> (reset_after) -> half-open: one trial -> closed or open.

    Only what says the backend is broken counts as a failure (`UpstreamError.backend_fault`):
    connection errors, timeouts, 5xx, answers that are not OpenAI's. A client's bad request
    (4xx), a rate limit, or a wait for one of the backend's connection slots does not. A trial
    that ends without a verdict (cancelled: the client went away, a stop sequence was hit)
    gives the trial back, so the next request is the trial."""

    failures_to_open: int
    reset_after: float
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    trial_running: bool = False

    def allows(self) -> bool:
        if self.opened_at is None:
            return True
        # Half-open: one request (this one) is the trial.
        return self.clock() - self.opened_at >= self.reset_after and not self.trial_running

    def started(self) -> bool:
        """A call begins; True when it is the half-open trial."""
        if self.opened_at is not None:
            self.trial_running = True
            return True
        return False

    def succeeded(self) -> None:
        self.failures, self.opened_at, self.trial_running = 0, None, False

    def failed(self) -> None:
        self.failures += 1
        self.trial_running = False
        if self.opened_at is not None or self.failures >= self.failures_to_open:
            self.opened_at = self.clock()

    def released(self, trial: bool) -> None:
        """A call ended with no verdict on the backend: a trial leaves the next request to be one."""
        if trial:
            self.trial_running = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.reset_after else "open"

    def open_value(self) -> float:
        """The circuit-open gauge: 1 unless closed (open, or half-open until a trial closes it)."""
        return 0.0 if self.opened_at is None else 1.0


@dataclass
class Target:
    backend: str
    engine: Engine
    model: str  # the id the backend knows the model by


@dataclass
class Registry:
    """One loaded backends file: engines, who serves what, breakers. Replaced whole on reload."""

    config: BackendsFile
    engines: dict[str, Engine]
    targets: dict[str, list[Target]]
    cards: list[common_pb2.ModelCard]
    breakers: dict[str, Breaker] = field(default_factory=dict)
    # Reranking models, by id: the upstreams that serve them.
    rerank_targets: dict[str, list[Target]] = field(default_factory=dict)


class Router:
    def __init__(self, embedded: LlamaCppEngine | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._embedded = embedded
        self._clock = clock
        self._registry: Registry | None = None
        self._outstanding: dict[str, int] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Keys set at run time, by backend; they outlive a reload, not a restart. Never logged.
        self._runtime_keys: dict[str, str] = {}
        # The last failure of each backend: (unix time, message), for the admin view.
        self._last_error: dict[str, tuple[float, str]] = {}

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "router not loaded"
        return self._registry

    async def load(self, config: BackendsFile) -> Registry:
        """Build engines and the model registry for `config`, then switch to it."""
        engines: dict[str, Engine] = {}
        targets: dict[str, list[Target]] = {}
        rerank_targets: dict[str, list[Target]] = {}
        cards: list[common_pb2.ModelCard] = []
        upstreams: list[UpstreamEngine] = []
        try:
            for backend in config.backends:
                if isinstance(backend, EmbeddedBackend):
                    if self._embedded is None:
                        raise RagmeshError(
                            ErrorKind.INVALID_REQUEST, f"backend {backend.name!r}: no embedded engine here"
                        )
                    engines[backend.name] = EmbeddedAdapter(backend.name, self._embedded)
                    card = self._embedded.model_card()
                    card.owned_by = backend.name
                    card.capabilities.extend(EMBEDDED_CAPABILITIES)
                    card.backend_type = "embedded"
                    models = [(card.id, card)]
                else:
                    upstream = UpstreamEngine(backend)
                    if backend.name in self._runtime_keys:
                        upstream.set_key(self._runtime_keys[backend.name])
                    upstreams.append(upstream)
                    engines[backend.name] = upstream
                    models = [(m, _upstream_card(backend, m, caps)) for m, caps in await _models_of(upstream, backend)]
                    for model_id in backend.rerank.models if backend.rerank else []:
                        rerank_targets.setdefault(model_id, []).append(Target(backend.name, upstream, model_id))
                        if all(c.id != model_id for c in cards):
                            cards.append(_upstream_card(backend, model_id, ["rerank"]))
                for model_id, card in models:
                    targets.setdefault(model_id, []).append(Target(backend.name, engines[backend.name], model_id))
                    if all(c.id != model_id for c in cards):
                        cards.append(card)
        except BaseException:
            for upstream in upstreams:
                await upstream.aclose()
            raise
        for model, route in config.routes.items():
            for table in (targets, rerank_targets):
                if route.backends and model in table:
                    table[model] = [t for t in table[model] if t.backend in route.backends]
        policy = config.circuit_breaker
        breakers = {name: Breaker(policy.failures, policy.reset_after, self._clock) for name in engines}
        old, self._registry = self._registry, Registry(config, engines, targets, cards, breakers, rerank_targets)
        for name in set() if old is None else set(old.breakers) - set(breakers):
            CIRCUIT_OPEN.remove(name)
        for name, breaker in breakers.items():
            # Read at every scrape: the gauge follows every transition, half-open included.
            CIRCUIT_OPEN.labels(name).set_function(breaker.open_value)
        if old is not None:
            task = asyncio.create_task(_close_later(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        log.info("backends loaded", extra={"backends": list(engines), "models": sorted(targets)})
        return self._registry

    async def aclose(self) -> None:
        if self._registry is not None:
            for engine in self._registry.engines.values():
                if isinstance(engine, UpstreamEngine):
                    await engine.aclose()

    def cards(self) -> list[common_pb2.ModelCard]:
        return list(self.registry.cards)

    def card(self, model: str) -> common_pb2.ModelCard | None:
        return next((c for c in self.registry.cards if c.id == model), None)

    def _pick(self, registry: Registry, targets: list[Target]) -> Target | None:
        open_ = [t for t in targets if registry.breakers[t.backend].allows()]
        if not open_:
            return None
        fewest = min(self._outstanding.get(t.backend, 0) for t in open_)
        return random.choice([t for t in open_ if self._outstanding.get(t.backend, 0) == fewest])

    @asynccontextmanager
    async def _calling(self, registry: Registry, target: Target) -> AsyncIterator[None]:
        """One call to a backend: counted in flight, and its breaker told what the call came to.
        Only a backend's own fault counts against it; a call that ends with no verdict on the
        backend (cancelled, the client's error, a wait for a slot) gives back a trial it held."""
        breaker = registry.breakers[target.backend]
        trial = breaker.started()
        self._outstanding[target.backend] = self._outstanding.get(target.backend, 0) + 1
        try:
            yield
        except UpstreamError as err:
            UPSTREAM_CALLS.labels(target.backend, err.kind.value).inc()
            self._last_error[target.backend] = (time.time(), err.message)
            if err.backend_fault:
                breaker.failed()
            else:
                breaker.released(trial)
            raise
        except BaseException:
            breaker.released(trial)
            raise
        else:
            breaker.succeeded()
            UPSTREAM_CALLS.labels(target.backend, "ok").inc()
        finally:
            self._outstanding[target.backend] -= 1

    async def generate(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncGenerator[common_pb2.GenerationChunk, None]:
        """Stream the answer from the first target that takes the request."""
        registry = self.registry
        route = registry.config.routes.get(request.model)
        chain = [request.model, *(route.fallback if route else [])]
        if not registry.targets.get(request.model) and not (route and route.fallback):
            raise RagmeshError(
                ErrorKind.NOT_FOUND,
                f"The model `{request.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        self._check_capabilities(registry, request)
        # A fallback that cannot take the request's parts (an image, say) is no fallback.
        chain = [request.model, *(m for m in chain[1:] if self._missing(registry, m, request) is None)]
        retry = registry.config.retry
        last: UpstreamError | None = None
        for model in chain:
            if last is not None and last.kind is ErrorKind.RATE_LIMITED:
                break  # "slow down" is no outage: it goes back to the client, not to a fallback
            targets = registry.targets.get(model, [])
            for attempt in range(retry.attempts):
                target = self._pick(registry, targets)
                if target is None:
                    break  # every backend of this model has its circuit open: next fallback
                sent = False
                try:
                    async with (
                        self._calling(registry, target),
                        aclosing(target.engine.generate(request, target.model)) as stream,
                    ):
                        async for chunk in stream:
                            sent = True
                            yield chunk
                    return
                except UpstreamError as err:
                    if sent or not err.retryable:
                        raise
                    last = err
                    log.warning("backend failed, retrying", extra={"backend": target.backend, "error": err.message})
                    await asyncio.sleep(
                        _backoff(attempt, retry.backoff_base, retry.backoff_max, err.retry_after_seconds)
                    )
        if last is not None:
            raise last
        raise RagmeshError(
            ErrorKind.UNAVAILABLE, f"Every backend of `{request.model}` is unavailable (circuit open).", retry_after=1
        )

    def _missing(
        self, registry: Registry, model: str, request: inference_pb2.GenerateRequest
    ) -> tuple[str, inference_pb2.ContentPart | None] | None:
        """What `model` lacks to take `request`: (capability, the part that needs it), or None."""
        card = next((c for c in registry.cards if c.id == model), None)
        if card is None:
            return None
        capabilities = set(card.capabilities)
        if not capabilities & {"chat", "completion"}:
            return "chat", None
        for part in request.content_parts:
            needed = PART_CAPABILITIES.get(part.type, part.type)
            if needed not in capabilities:
                return needed, part
        return None

    def _check_capabilities(self, registry: Registry, request: inference_pb2.GenerateRequest) -> None:
        """400 naming the model and the part it cannot take (an image to a text-only model, say)."""
        missing = self._missing(registry, request.model, request)
        if missing is None:
            return
        needed, part = missing
        if part is None:
            card = next(c for c in registry.cards if c.id == request.model)
            raise RagmeshError(
                ErrorKind.INVALID_REQUEST,
                f"The model `{request.model}` is not a chat or completion model "
                f"(it does: {', '.join(card.capabilities) or 'nothing listed'}).",
                param="model",
                code="model_not_supported",
            )
        raise RagmeshError(
            ErrorKind.INVALID_REQUEST,
            f"The model `{request.model}` does not accept content parts of type '{part.type}' "
            f"({part.param}): it has no `{needed}` capability. Send text, or use a model that has it.",
            param=part.param,
            code="unsupported_content_part",
        )

    # --- forwarding -------------------------------------------------------------------

    def forward_target(self, model: str, path: str) -> tuple[str, UpstreamEngine]:
        """The upstream owning `model` (when the body names one) or else `path`; NOT_FOUND when none does."""
        registry = self.registry
        if model:
            owning = registry.targets.get(model) or registry.rerank_targets.get(model, [])
            upstreams = [t for t in owning if isinstance(t.engine, UpstreamEngine)]
            if not upstreams:
                known = model in registry.targets
                raise RagmeshError(
                    ErrorKind.NOT_FOUND,
                    f"The model `{model}` is served in the mesh, which has no /v1{path}."
                    if known
                    else f"The model `{model}` does not exist.",
                    param="model",
                    code="unknown_url" if known else "model_not_found",
                )
            picked = self._pick(registry, upstreams) or upstreams[0]
            engine = picked.engine
            assert isinstance(engine, UpstreamEngine)
            return picked.model, engine
        owners = [
            e
            for e in registry.engines.values()
            if isinstance(e, UpstreamEngine) and e.config.takes_path(path) and registry.breakers[e.name].allows()
        ]
        if not owners:
            raise RagmeshError(
                ErrorKind.NOT_FOUND, f"Unknown request URL: /v1{path} (no backend serves it).", code="unknown_url"
            )
        fewest = min(self._outstanding.get(e.name, 0) for e in owners)
        return "", random.choice([e for e in owners if self._outstanding.get(e.name, 0) == fewest])

    async def forward(
        self, request: inference_pb2.ForwardRequest
    ) -> AsyncGenerator[tuple[int, dict[str, str], bytes], None]:
        """Pass the request to its owner; its breaker and in-flight count see it like any call
        (a 5xx answer counts as the backend's fault, though it goes back to the client as it is)."""
        registry = self.registry
        model, engine = self.forward_target(request.model, request.path)
        headers = {k: v for k, v in (("Content-Type", request.content_type), ("Accept", request.accept)) if v}
        try:
            async with self._calling(registry, Target(engine.name, engine, model)):
                status = 0
                async with aclosing(
                    engine.forward(request.method, request.path, request.query, request.body, headers)
                ) as stream:
                    async for status_now, passed, data in stream:
                        status = status_now or status
                        yield status_now, passed, data
                if status >= 500:
                    raise _AnsweredFailureError(
                        ErrorKind.BAD_GATEWAY,
                        f"forwarded /v1{request.path} answered {status}",
                        retryable=False,
                        backend_fault=True,
                    )
        except _AnsweredFailureError:
            pass  # counted against the backend; the client already has the upstream's own answer

    # --- the admin view -------------------------------------------------------------------

    def backends(self) -> list[inference_pb2.BackendInfo]:
        """Every backend with its circuit, requests in flight and last error; never a key."""
        registry = self.registry
        out = []
        for name, engine in registry.engines.items():
            at, error = self._last_error.get(name, (0.0, ""))
            info = inference_pb2.BackendInfo(
                name=name,
                circuit=registry.breakers[name].state,
                in_flight=self._outstanding.get(name, 0),
                last_error=error,
                last_error_at=int(at),
                models=sorted(
                    m
                    for served in (registry.targets, registry.rerank_targets)
                    for m, ts in served.items()
                    if any(t.backend == name for t in ts)
                ),
            )
            if isinstance(engine, UpstreamEngine):
                info.type, info.base_url, info.key_source = "openai", engine.config.base_url, engine.key_source
                info.paths.extend(engine.config.paths)
            else:
                info.type, info.key_source = "embedded", "none"
            out.append(info)
        return out

    def _upstream(self, backend: str) -> UpstreamEngine:
        engine = self.registry.engines.get(backend)
        if not isinstance(engine, UpstreamEngine):
            raise RagmeshError(
                ErrorKind.NOT_FOUND if engine is None else ErrorKind.INVALID_REQUEST,
                f"No upstream backend named {backend!r}." if engine is None else f"{backend!r} takes no key.",
                param="backend",
            )
        return engine

    def set_key(self, backend: str, key: str) -> inference_pb2.BackendInfo:
        """Use `key` for `backend` from its next request on (kept across reloads, never logged)."""
        if not key.strip():
            raise RagmeshError(ErrorKind.INVALID_REQUEST, "The key must not be empty.", param="api_key")
        self._upstream(backend).set_key(key.strip())
        self._runtime_keys[backend] = key.strip()
        return next(b for b in self.backends() if b.name == backend)

    def revert_key(self, backend: str) -> inference_pb2.BackendInfo:
        """Back to the key the backends file names."""
        self._upstream(backend).set_key(None)
        self._runtime_keys.pop(backend, None)
        return next(b for b in self.backends() if b.name == backend)

    async def rerank(self, request: common_pb2.RerankRequest) -> common_pb2.RerankResponse:
        """Scores from the first upstream of the model (or of its fallbacks) that answers.

        The same policy as generation: least outstanding first, retries with
        backoff for what may pass, breakers, then the route's fallback models.
        """
        registry = self.registry
        route = registry.config.routes.get(request.model)
        if not registry.rerank_targets.get(request.model):
            raise RagmeshError(
                ErrorKind.NOT_FOUND,
                f"The reranking model `{request.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        retry = registry.config.retry
        last: UpstreamError | None = None
        for model in [request.model, *(route.fallback if route else [])]:
            if last is not None and last.kind is ErrorKind.RATE_LIMITED:
                break
            targets = registry.rerank_targets.get(model, [])
            for attempt in range(retry.attempts):
                target = self._pick(registry, targets)
                if target is None:
                    break
                assert isinstance(target.engine, UpstreamEngine)
                try:
                    async with self._calling(registry, target):
                        return await target.engine.rerank(request, target.model)
                except UpstreamError as err:
                    if not err.retryable:
                        raise
                    last = err
                    log.warning("reranker failed, retrying", extra={"backend": target.backend, "error": err.message})
                    await asyncio.sleep(
                        _backoff(attempt, retry.backoff_base, retry.backoff_max, err.retry_after_seconds)
                    )
        if last is not None:
            raise last
        raise RagmeshError(
            ErrorKind.UNAVAILABLE, f"Every backend of `{request.model}` is unavailable (circuit open).", retry_after=1
        )


class _AnsweredFailureError(UpstreamError):
    """A forwarded call the upstream answered with a 5xx: its breaker counts it, the client has the answer."""


def _backoff(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, at least what Retry-After asked (within the cap)."""
    delay = random.uniform(0, min(cap, base * 2**attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


async def _models_of(upstream: UpstreamEngine, backend: UpstreamBackend) -> list[tuple[str, list[str]]]:
    """(id, capabilities) of every model: the file's word first, then the endpoint's, then the id's."""
    models = [(m, backend.listed_capabilities(m) or guessed_capabilities(m)) for m in backend.model_ids()]
    if backend.discover:
        try:
            listed = {m for m, _ in models}
            for model, stated in await upstream.discover():
                if model not in listed:
                    models.append((model, backend.listed_capabilities(model) or stated or guessed_capabilities(model)))
        except RagmeshError as err:
            # Listed models still route; discovery is tried again on the next reload.
            log.warning("model discovery failed", extra={"backend": backend.name, "error": err.message})
    return models


def _upstream_card(backend: UpstreamBackend, model: str, capabilities: list[str] | None = None) -> common_pb2.ModelCard:
    return common_pb2.ModelCard(
        id=model,
        owned_by=backend.name,
        created=int(time.time()),
        max_context=backend.context_length,
        backend=backend.name,
        capabilities=capabilities or [],
        backend_type="openai",
    )


async def _close_later(old: Registry, grace: float = 60.0) -> None:
    """Close a replaced configuration's upstream clients once its requests are likely done."""
    await asyncio.sleep(grace)
    for engine in old.engines.values():
        if isinstance(engine, UpstreamEngine):
            await engine.aclose()
