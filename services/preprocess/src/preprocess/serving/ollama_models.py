"""Ollama's model endpoints (/api/tags, /api/show, /api/ps) from the mesh's model cards.

The mesh pulls nothing: every model it serves is "installed", and the embedded
ones are "running". Names are the mesh's model ids (an Ollama client may add
`:latest`, which `serving.ollama.model_name` takes off again).
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

from preprocess.keys import ApiKey, check_model_allowed
from preprocess.serving.models import ModelsServing
from ragmesh.errors import ErrorKind, RagmeshError

# Far in the future: the mesh never unloads a model (keep_alive is accepted and has no effect).
_NEVER = "2318-11-30T00:00:00Z"


def _digest(model: str) -> str:
    return hashlib.sha256(model.encode()).hexdigest()


def _modified(card: dict[str, Any]) -> str:
    return datetime.datetime.fromtimestamp(int(card.get("created") or 0), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _details(card: dict[str, Any]) -> dict[str, Any]:
    embedded = card.get("backend_type", "embedded") == "embedded"
    return {
        "parent_model": card.get("root") or "",
        "format": "gguf" if embedded else "",
        "family": "llama" if embedded else "",
        "families": ["llama"] if embedded else None,
        "parameter_size": "",
        "quantization_level": "",
    }


def _capabilities(card: dict[str, Any]) -> list[str]:
    """Ollama's capability names: completion (chat), tools, vision, embedding."""
    have = set(card.get("capabilities") or ())
    out = []
    if have & {"chat", "completion"} or not have:
        out.append("completion")
    out += [c for c in ("tools", "vision", "embedding") if c in have]
    return out


def _listed(card: dict[str, Any]) -> bool:
    """What an Ollama client may run: chat, completion and embedding models (not rerankers)."""
    have = set(card.get("capabilities") or ())
    return not have or bool(have & {"chat", "completion", "embedding"})


def _entry(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": card["id"],
        "model": card["id"],
        "modified_at": _modified(card),
        "size": 0,
        "digest": _digest(card["id"]),
        "details": _details(card),
    }


class OllamaModels:
    """/api/tags, /api/show and /api/ps over the same model list as GET /v1/models."""

    def __init__(self, models: ModelsServing) -> None:
        self._models = models

    async def cards(self, key: ApiKey | None) -> list[dict[str, Any]]:
        page = await self._models.page(key)
        return [card for card in page["data"] if _listed(card)]

    async def names(self, key: ApiKey | None) -> set[str]:
        return {card["id"] for card in await self.cards(key)}

    async def tags(self, key: ApiKey | None) -> dict[str, Any]:
        return {"models": [_entry(card) for card in await self.cards(key)]}

    async def running(self, key: ApiKey | None) -> dict[str, Any]:
        """The embedded models: loaded for as long as the mesh runs."""
        running = []
        for card in await self.cards(key):
            if card.get("backend_type", "embedded") != "embedded" or "embedding" in (card.get("capabilities") or ()):
                continue
            running.append(
                {
                    **_entry(card),
                    "expires_at": _NEVER,
                    "size_vram": 0,
                    "context_length": card.get("max_model_len") or 0,
                }
            )
        return {"models": running}

    async def show(self, model: str, key: ApiKey | None) -> dict[str, Any]:
        """One model's card as Ollama shows it (404 in Ollama's words when unknown)."""
        check_model_allowed(key, model)
        for card in await self.cards(key):
            if card["id"] == model:
                context = card.get("max_model_len") or 0
                info: dict[str, Any] = {"general.architecture": "llama", "general.basename": card["id"]}
                if context:
                    info["llama.context_length"] = context
                return {
                    "modelfile": f"FROM {card['id']}\n",
                    "parameters": "",
                    "template": "",
                    "details": _details(card),
                    "model_info": info,
                    "capabilities": _capabilities(card),
                    "modified_at": _modified(card),
                }
        raise RagmeshError(ErrorKind.NOT_FOUND, f"model '{model}' not found", param="model", code="model_not_found")
