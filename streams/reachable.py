"""Whether the broker answers: the worker's start-up check (streams/__main__.py) and its /readyz (streams/web.py)
ask the same question. No faust here."""

from __future__ import annotations

import asyncio


async def broker_answer(bootstrap_servers: str, timeout: float) -> str | None:
    """None when a broker of KAFKA_BOOTSTRAP_SERVERS accepts a connection within `timeout`; else why the first one
    did not (its error, never more)."""
    first_error = None
    for server in (s.strip() for s in bootstrap_servers.split(",") if s.strip()):
        host, _, port = server.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]") or "localhost", int(port)),
                                               timeout)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            first_error = first_error or why(exc)
            continue
        writer.close()
        return None
    return first_error or "no broker named"


def why(exc: BaseException) -> str:
    """An error in a few words: the system's reason, else its class."""
    return getattr(exc, "strerror", None) or type(exc).__name__
