"""What scripts/mesh.py gives each process: secrets only to their readers, values that must agree.

Standard library only, like mesh.py.

Secrets: supervisord holds the launcher's environment; each program starts through
`env -u NAME ...` for every secret its service does not read, so inference (no Redis, no
RabbitMQ) never holds their passwords and nginx holds none. The table below says who
reads what; tests/unit/test_settings_scope.py checks it against the settings classes.

Agreement: the gateway's body limit and preprocess's are one value (either variable sets
both; both set and different is refused), and the gateway's read timeouts must outlast
the deadlines preprocess answers with, so a client gets the service's error event or 504
rather than a connection nginx cut. `up` stops with every problem named before anything
starts.
"""

from __future__ import annotations

import re

# A secret's environment variables -> the services that read it. Anything not listed for
# a service is unset in its process (and in nginx's: it reads none).
SECRET_READERS: dict[str, frozenset[str]] = {
    "RAGMESH_AMQP_URL": frozenset({"preprocess", "retrieval"}),
    "AMQP_URL": frozenset({"preprocess", "retrieval"}),
    "RAGMESH_REDIS_URL": frozenset({"preprocess", "retrieval", "postprocess"}),
    "REDIS_URL": frozenset({"preprocess", "retrieval", "postprocess"}),
    "RAGMESH_SERVICE_TOKEN": frozenset({"preprocess", "retrieval", "inference", "postprocess"}),
    "RAGMESH_PREPROCESS_ADMIN_KEY": frozenset({"preprocess"}),
    # The CLI's admin key and compose's passwords: no service reads them.
    "RAGMESH_ADMIN_KEY": frozenset(),
    "RAGMESH_REDIS_PASSWORD": frozenset(),
    "RAGMESH_RABBITMQ_PASSWORD": frozenset(),
}


def withheld(program: str) -> list[str]:
    """The secret variables `program` (a service, or "nginx") must start without."""
    return sorted(name for name, readers in SECRET_READERS.items() if program not in readers)


def without_secrets(program: str, command: str) -> str:
    """`command` run through env(1) with every secret `program` does not read unset."""
    unset = " ".join(f"-u {name}" for name in withheld(program))
    return f"/usr/bin/env {unset} {command}" if unset else command


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_TIME_UNITS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

DEFAULT_MAX_BODY = 32 * 1024 * 1024


def nginx_bytes(value: str) -> int:
    """An nginx size ("32m", "512k", "33554432") in bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not an nginx size (a number, optionally k, m or g)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def nginx_seconds(value: str) -> float:
    """An nginx time ("600s", "10m", "500ms", "600") in seconds (one unit only)."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d|)", value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not an nginx time (a number with ms, s, m, h or d)")
    return int(match.group(1)) * _TIME_UNITS[match.group(2)]


def nginx_size_text(size: int) -> str:
    """`size` bytes as nginx reads it, in the largest whole unit (the 413 message quotes it)."""
    for unit in ("g", "m", "k"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def agreed(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The values derived for the mesh (body limit for both sides) and the disagreements found.

    Returns (variables to set, problems); `up` refuses to start while there are problems.
    """
    problems: list[str] = []
    derived: dict[str, str] = {}
    gateway_body, service_body = env.get("RAGMESH_GATEWAY_MAX_BODY"), env.get("RAGMESH_PREPROCESS_MAX_BODY_BYTES")
    try:
        gateway = nginx_bytes(gateway_body) if gateway_body else None
        service = int(service_body) if service_body else None
    except ValueError as exc:
        return {}, [f"body limit: {exc}"]
    if gateway is not None and service is not None and gateway != service:
        problems.append(
            f"RAGMESH_GATEWAY_MAX_BODY ({gateway_body} = {gateway} bytes) and RAGMESH_PREPROCESS_MAX_BODY_BYTES "
            f"({service}) disagree: set one of them (the other follows)"
        )
    body = service if service is not None else gateway if gateway is not None else DEFAULT_MAX_BODY
    derived["RAGMESH_GATEWAY_MAX_BODY"] = nginx_size_text(body)
    derived["RAGMESH_PREPROCESS_MAX_BODY_BYTES"] = str(body)

    def seconds(name: str, default: str, nginx: bool) -> float | None:
        raw = env.get(name, default)
        try:
            return nginx_seconds(raw) if nginx else float(raw)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            return None

    chat = seconds("RAGMESH_GATEWAY_TIMEOUT", "600s", nginx=True)
    api = seconds("RAGMESH_GATEWAY_API_TIMEOUT", "120s", nginx=True)
    request = seconds("RAGMESH_PREPROCESS_REQUEST_TIMEOUT", "600", nginx=False)
    idle = seconds("RAGMESH_PREPROCESS_STREAM_IDLE_TIMEOUT", "120", nginx=False)
    calls = seconds("RAGMESH_PREPROCESS_RETRIEVAL_TIMEOUT", "30", nginx=False)
    # nginx's read timeout runs between two reads: a non-streamed answer sends nothing until
    # it is done, so the chat routes' must last the whole request; a stream that goes silent
    # must meet preprocess's idle timeout (its error event) before nginx's.
    if chat is not None and request is not None and chat < request:
        problems.append(
            f"RAGMESH_GATEWAY_TIMEOUT ({chat:g} s) is shorter than RAGMESH_PREPROCESS_REQUEST_TIMEOUT ({request:g} s): "
            "nginx would cut answers the service is still allowed to give"
        )
    if chat is not None and idle is not None and chat <= idle:
        problems.append(
            f"RAGMESH_GATEWAY_TIMEOUT ({chat:g} s) is not longer than RAGMESH_PREPROCESS_STREAM_IDLE_TIMEOUT "
            f"({idle:g} s): a silent stream would be cut before its error event"
        )
    if api is not None and calls is not None and api <= calls:
        problems.append(
            f"RAGMESH_GATEWAY_API_TIMEOUT ({api:g} s) is not longer than RAGMESH_PREPROCESS_RETRIEVAL_TIMEOUT "
            f"({calls:g} s): nginx would answer 504 before the service does"
        )
    return derived, problems
