"""/openapi.json as clients see the API: request bodies, response models, OpenAI-shaped errors.

Request bodies are read and validated by ragmesh itself (so a bad body is a
400 naming the parameter, a 413 or a 415, never FastAPI's 422); routes
declare their body with `request_body(Model)`, and `install_openapi` puts
those models into the document's components (`DocumentedApp`). FastAPI's 422 responses are
replaced by the errors the API really answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from preprocess.serving.schemas import ErrorResponse

_REF = "#/components/schemas/{model}"
_BODY_MODELS: dict[str, type[BaseModel]] = {}

ERROR_DESCRIPTIONS = {
    400: "Invalid request (the parameter is named in error.param)",
    401: "Missing or invalid API key",
    403: "The key may see the object but not do this (a collection shared read-only)",
    404: "Unknown model, object or URL",
    405: "Method not allowed",
    409: "Conflict with the object's state (exists already, cannot be cancelled)",
    413: "Request body too large",
    415: "Unsupported Content-Type",
    429: "Rate limited (Retry-After)",
    502: "An upstream answered something unusable",
    503: "A dependency is unavailable or overloaded",
    504: "Deadline exceeded",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for these error statuses, each an OpenAI error body."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


def request_body(model: type[BaseModel], media_type: str = "application/json") -> dict[str, Any]:
    """`openapi_extra=` declaring a route's request body as `model` (the route reads it itself)."""
    _BODY_MODELS[model.__name__] = model
    return {
        "requestBody": {
            "required": True,
            "content": {media_type: {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
    }


def event_stream(description: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` adding a text/event-stream answer to a route's 200."""
    return {200: {"content": {"text/event-stream": {"schema": {"type": "string", "description": description}}}}}


def _component_schemas(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF, mode="validation")
    found: dict[str, Any] = {**schema.pop("$defs", {}), model.__name__: schema}
    return found


class DocumentedApp(FastAPI):
    """FastAPI whose /openapi.json carries the request bodies and error responses described above."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return dict(self.openapi_schema)
        document = get_openapi(
            title=self.title,
            version=self.version,
            description=self.description,
            routes=self.routes,
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        models: list[type[BaseModel]] = [*_BODY_MODELS.values(), ErrorResponse]
        for model in models:
            for name, schema in _component_schemas(model).items():
                schemas.setdefault(name, schema)
        for path in document.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {
                        "description": ERROR_DESCRIPTIONS[400],
                        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}},
                    }
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        self.openapi_schema = document
        return document
