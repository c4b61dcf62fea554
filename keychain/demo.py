"""The keychain core on embedded defaults: NoETL's `test_cache_simple` read path against real local services.

Starts PostgreSQL and the Secret Manager test server (250 ms access latency, the seed's figure), then runs two
executions whose two steps read the same secret through the keychain. Without the warmer (the streams), each
execution's first read is a miss that pays Secret Manager's latency and its second read is a hit; the last line is
a JSON summary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from .logs import configure_logging
from .settings import Settings
from .sources import SecretManagerSource
from .store import Keychain
from .testing.stack import LocalStack

SECRET_ID = "openai-api-key"


def say(text: str) -> None:
    print(text, flush=True)


async def play(stack: LocalStack) -> dict:
    settings = Settings(
        dsn=stack.env["KEYCHAIN_DSN"],
        keys=stack.env["KEYCHAIN_KEYS"],
        secret_manager_endpoint=stack.env["SECRET_MANAGER_ENDPOINT"],
    )
    server = stack.secret_manager
    version = server.add_version(server.create_secret(SECRET_ID).rsplit("/", 1)[1], "sk-demo-" + os.urandom(8).hex())
    say(f"secret ready: {version}")
    ref = f"projects/{server.project_number}/secrets/{SECRET_ID}/versions/1"
    figures = {"first_use_hits": 0, "first_use_reads": 0, "later_hits": 0, "later_reads": 0}
    timings: dict[str, list[float]] = {"miss": [], "hit": []}
    async with Keychain(settings, source=SecretManagerSource(settings)) as keychain:
        say(f"migrated: {await keychain.migrate()}")
        executions = [507861119290048685 + i for i in range(2)]
        for execution_id in executions:
            for step, prefix in (("first_openai_call", "first_use"), ("second_openai_call", "later")):
                started = time.perf_counter()
                before = server.access_count()
                lookup = await keychain.get_or_fetch(ref, ref, execution_id=execution_id)
                elapsed = (time.perf_counter() - started) * 1000
                outcome = "miss" if server.access_count() > before else "hit"
                timings[outcome].append(elapsed)
                figures[f"{prefix}_reads"] += 1
                figures[f"{prefix}_hits"] += outcome == "hit"
                say(f"execution {execution_id} step {step:<19} {outcome:<4} {elapsed:7.2f} ms "
                    f"(value {'present' if lookup.value else 'absent'})")
        rows_before = sum(r["rows"] for r in await keychain.stats())
        purged = sum([await keychain.purge_execution(e) for e in executions[:1]])
        await keychain.pool.execute("UPDATE keychain SET expires_at = now() WHERE execution_id = $1", executions[1])
        swept = await keychain.sweep()
        rows_after = sum(r["rows"] for r in await keychain.stats())
    say(f"rows: {rows_before} before, {purged} purged on finish, {swept} swept after expiry, {rows_after} left")
    return {
        **figures,
        "sm_calls": server.access_count(),
        "miss_ms": round(max(timings["miss"], default=0), 2),
        "hit_ms": round(max(timings["hit"], default=0), 2),
        "purged_rows": purged,
        "swept_rows": swept,
    }


def main() -> None:
    configure_logging(Settings(log_level="WARNING"))
    say("starting PostgreSQL and the Secret Manager test server ...")
    with LocalStack(kafka=False, pubsub=False, secret_manager_delay_seconds=0.25) as stack:
        summary = asyncio.run(play(stack))
    logging.shutdown()
    say(json.dumps(summary))


if __name__ == "__main__":
    main()
