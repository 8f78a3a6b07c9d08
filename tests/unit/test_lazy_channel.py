"""LazyChannel: a channel refused while the connection reconnects is a transient failure."""

from __future__ import annotations

from typing import Any

import pytest

from ragmesh import amqp_client
from ragmesh.amqp import TRANSIENT_ERRORS
from ragmesh.amqp_client import LazyChannel


class ReconnectingConnection:
    """A robust connection the broker closed: aiormq refuses channels with a bare RuntimeError."""

    async def channel(self, **_: Any) -> None:
        raise RuntimeError('<Connection: "amqp://guest:******@127.0.0.1:5672/"> closed')


async def test_a_channel_refused_while_reconnecting_is_a_transient_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def connect(url: str, name: str) -> ReconnectingConnection:
        return ReconnectingConnection()

    monkeypatch.setattr(amqp_client, "connect", connect)
    lazy = LazyChannel("amqp://unused/", name="test")
    with pytest.raises(TRANSIENT_ERRORS) as caught:
        await lazy.get()
    # The batch worker requeues TRANSIENT_ERRORS; anything else would dead-letter the line.
    assert isinstance(caught.value, ConnectionError)
