"""Tool calling on the embedded engine: the OpenAI fields llama.cpp reads, and the turn that makes a
call come at once.

llama.cpp (with Jinja chat templates on) renders the tools into the prompt,
learns the model's call format from its template, constrains the output with a
grammar built from the tools' schemas and parses the calls back into OpenAI's
`tool_calls`. What the mesh adds:

- a named function (`tool_choice: {"type": "function", ...}`) becomes that one tool, required
  (llama.cpp knows auto, none and required only);
- with a call required, the assistant turn starts with the template's call marker, so the
  model writes the call straight away instead of text that a small model may never end;
- legacy `functions` / `function_call` are read as the tools they were.
"""

from __future__ import annotations

from typing import Any

from ragmesh.errors import invalid_request


def _legacy(fields: dict[str, Any]) -> tuple[list[Any] | None, Any]:
    tools = fields.get("tools")
    choice = fields.get("tool_choice")
    if not tools and fields.get("functions"):
        tools = [{"type": "function", "function": f} for f in fields["functions"]]
        call = fields.get("function_call")
        choice = {"type": "function", "function": call} if isinstance(call, dict) else call
    return tools, choice


def tool_request(fields: dict[str, Any], call_start: str) -> tuple[dict[str, Any], str]:
    """The tool fields to send llama.cpp for the client's request fields, and the assistant prefill
    ("" for none)."""
    tools, choice = _legacy(fields)
    if not tools:
        return {}, ""
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools if isinstance(t, dict) and (t.get("function") or {}).get("name") == name]
        if not chosen:
            raise invalid_request(
                f"tool_choice names the function {name!r}, which is not among the tools.", param="tool_choice"
            )
        tools, choice = chosen, "required"
    out: dict[str, Any] = {"tools": tools, "tool_choice": choice}
    if fields.get("parallel_tool_calls") is not None:
        out["parallel_tool_calls"] = bool(fields["parallel_tool_calls"])
    return out, call_start if choice == "required" else ""


def message_extras(raw: Any) -> dict[str, Any]:
    """What a client's message carries for tool calling besides its text: an assistant's calls,
    a tool result's call id."""
    if not isinstance(raw, dict):
        return {}
    return {k: raw[k] for k in ("tool_calls", "tool_call_id") if raw.get(k)}
