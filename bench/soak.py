"""A fault soak with a checker (issue 33, first part): steady work while faults are injected, then a history checked
against invariants.

For `--seconds` (default 600; `--quick` 90): start events for executions holding 1-5 of 30 secrets (two projects
sharing ten ids, prod and staging, and ten regional secrets), each finished 15-30 s later; a rotation every 1.5 s on
average, through Secret Manager's notification on the real Pub/Sub emulator, bridged by the workers; readers in
processes of their own reading every live execution's secrets all the time and recording (time, execution,
reference, value or error); two workers on one consumer group. At random moments one fault, sometimes two at once:
a worker SIGKILLed (and started again), PostgreSQL restarted, Secret Manager answering UNAVAILABLE, Secret Manager
hanging. Not yet injected (issue 33 says what remains): the broker or the Pub/Sub emulator restarted (both keep
nothing across a restart here), Cloud KMS down, NoETL's API answering 503, the dead-letter topic refusing writes.

The checker proves, from the history, the table, a trigger's record of every row written and the topics:
- every start event ended with its rows written or its dead letter taken, none dead-lettered twice;
- no read returned a value older than a notice that had been applied (the notice acknowledged after it) before the
  read began;
- finished executions have no rows; every error a reader saw was one of `keychain.errors`;
- Secret Manager calls stayed within 1.2x of one per secret version per shared-fetch window.

It prints its figures as the last JSON line: faults injected by kind, events, reads, violations (must be 0), the
worst stale window, calls per version.

    python -m bench.soak [--seconds N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import tempfile
import time
from collections import Counter, defaultdict

import grpc

from devtools.local import WorkerProcess, consume, create_topics, finish_event, local_worker_env, produce, start_event
from devtools.stack import LocalStack, pubsub_unavailable_reason, rotation_subscription
from keychain import Keychain, errors

from .common import report, settings_for

PROD, STAGING = "soak-prod", "soak-staging"
NUMBERS = {PROD: "310000000001", STAGING: "310000000002"}
REGION = "europe-west1"
SHARED_WINDOW_SECONDS = 5.0
WARM_DEADLINE_SECONDS = 10.0
LIFETIME_SECONDS = (15.0, 30.0)  # longer than the warm deadline: a finish never fences a start still warming
# `keychain_applied_notice.applied_at` is its transaction's start; it commits (the notice acknowledged) a moment later.
APPLY_GRACE_SECONDS = 0.25
TYPED_ERRORS = {name for name in dir(errors) if isinstance(getattr(errors, name), type)}
# Every row the workers write, recorded by a trigger of the soak's own (the checker's evidence, beside the table).
RECORD_WRITES = """
CREATE TABLE IF NOT EXISTS soak_written (execution_id BIGINT, credential_name TEXT, at TIMESTAMPTZ DEFAULT now());
CREATE OR REPLACE FUNCTION soak_record_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'ready' AND NEW.execution_id IS NOT NULL THEN
        INSERT INTO soak_written (execution_id, credential_name) VALUES (NEW.execution_id, NEW.credential_name);
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS soak_record_write ON keychain;
CREATE TRIGGER soak_record_write AFTER INSERT OR UPDATE OF data ON keychain FOR EACH ROW
    EXECUTE FUNCTION soak_record_write();
CREATE TABLE IF NOT EXISTS soak_live (execution_id BIGINT PRIMARY KEY, refs TEXT[] NOT NULL);
"""


def secrets() -> list[tuple[str, str | None, str]]:
    """(project id, location, secret id) of the 30 secrets."""
    shared = [(project, None, f"db-{i}") for project in (PROD, STAGING) for i in range(10)]
    return shared + [(PROD, REGION, f"eu-{i}") for i in range(10)]


def ref_of(secret: tuple[str, str | None, str]) -> str:
    project, location, secret_id = secret
    where = f"/locations/{location}" if location else ""
    return f"projects/{project}{where}/secrets/{secret_id}/versions/latest"


def value_of(secret: tuple[str, str | None, str], version: int) -> str:
    return f"{ref_of(secret)}#{version}"


# --- readers: processes of their own ------------------------------------------------------------------------------
def reader_main(env: dict[str, str], history: str, until: float) -> None:
    os.environ.update(env)
    asyncio.run(_read_all_the_time(history, until))


async def _read_all_the_time(history: str, until: float) -> None:
    from keychain.settings import Settings

    settings = Settings()
    with open(history, "a", buffering=1) as out:
        kc = None
        while time.time() < until:
            try:
                if kc is None:
                    kc = await Keychain(settings).open()
                live = await kc.pool.fetch("SELECT execution_id, refs FROM soak_live")
            except Exception:
                kc = None
                await asyncio.sleep(0.2)
                continue
            for row in live:
                for ref in row["refs"]:
                    started = time.time()
                    try:
                        lookup = await kc.get(ref, execution_id=row["execution_id"])
                        entry = {"outcome": lookup.outcome, "value": lookup.value if lookup else None}
                    except Exception as exc:
                        entry = {"outcome": "error", "error": type(exc).__name__}
                    out.write(json.dumps({"t0": started, "t1": time.time(), "execution": row["execution_id"],
                                          "ref": ref, **entry}) + "\n")
            await asyncio.sleep(0.01)
        if kc is not None:
            await kc.close()


# --- the run --------------------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, stack: LocalStack, seconds: float):
        self.stack, self.seconds = stack, seconds
        self.sm = stack.secret_manager
        self.settings = settings_for(stack, "soak", events_topic="soak-events", dlq_topic="soak-dlq",
                                     rotations_topic="soak-rotations")
        self.bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
        self.faults: Counter[str] = Counter()
        self.started: dict[int, list[str]] = {}
        self.finished: set[int] = set()
        self.versions = {secret: 1 for secret in secrets()}
        self.workers: list[WorkerProcess] = []

    async def run(self) -> dict:
        for project, number in NUMBERS.items():
            self.sm.add_project(project, number)
        subscription = rotation_subscription(self.stack)
        for secret in secrets():
            project, location, secret_id = secret
            self.sm.create_secret(secret_id, project=project, location=location)
            self.sm.add_version(secret_id, value_of(secret, 1), project=project, location=location)
        await create_topics(self.bootstrap, self.settings.events_topic, self.settings.dlq_topic,
                            self.settings.rotations_topic, partitions=8)
        def worker_env() -> dict[str, str]:  # each its own HTTP port and scratch directory, one consumer group
            return local_worker_env(
                {**os.environ, **self.stack.env}, "soak", KEYCHAIN_SCHEMA=self.settings.schema_name,
                KEYCHAIN_TOPIC_PARTITIONS="8", KEYCHAIN_EVENTS_TOPIC=self.settings.events_topic,
                KEYCHAIN_DLQ_TOPIC=self.settings.dlq_topic, KEYCHAIN_ROTATIONS_TOPIC=self.settings.rotations_topic,
                KEYCHAIN_SHARED_FETCH_SECONDS=str(SHARED_WINDOW_SECONDS), KEYCHAIN_RECONCILE_INTERVAL_SECONDS="5",
                KEYCHAIN_SWEEP_INTERVAL_SECONDS="5", KEYCHAIN_WARM_DEADLINE_SECONDS=str(WARM_DEADLINE_SECONDS),
                **subscription)

        async with Keychain(self.settings) as kc:
            await kc.migrate()
            await kc.pool.execute(RECORD_WRITES)
        self.workers = [WorkerProcess(worker_env()).start(timeout=120) for _ in range(2)]
        history = tempfile.mktemp(prefix="soak-history-", suffix=".jsonl")
        until = time.time() + self.seconds
        reader_env = {**self.stack.env, "KEYCHAIN_SCHEMA": self.settings.schema_name}
        context = multiprocessing.get_context("spawn")
        readers = [context.Process(target=reader_main, args=(reader_env, history, until + 10)) for _ in range(2)]
        for reader in readers:
            reader.start()
        try:
            await asyncio.gather(self._executions(until), self._rotations(until), self._faults(until))
            await self._settle()
        finally:
            for reader in readers:
                reader.join(timeout=30)
                if reader.is_alive():
                    reader.kill()
            for worker in self.workers:  # one at a time
                worker.stop()
        return await self._check(history)

    async def _executions(self, until: float) -> None:
        execution = 1_000_000
        finishing: list[tuple[float, int]] = []
        async with Keychain(self.settings) as kc:
            while time.time() < until:
                execution += 1
                refs = [ref_of(s) for s in random.sample(secrets(), random.randint(1, 5))]
                self.started[execution] = refs
                await self._keep_trying(kc.pool.execute, "INSERT INTO soak_live VALUES ($1, $2)", execution, refs)
                await self._keep_trying(produce, self.bootstrap, self.settings.events_topic,
                                        [start_event(execution, refs)])
                finishing.append((time.time() + random.uniform(*LIFETIME_SECONDS), execution))
                for due, done in [f for f in finishing if f[0] <= time.time()]:
                    finishing.remove((due, done))
                    await self._keep_trying(kc.pool.execute, "DELETE FROM soak_live WHERE execution_id = $1", done)
                    await self._keep_trying(produce, self.bootstrap, self.settings.events_topic,
                                            [finish_event(done)])
                    self.finished.add(done)
                await asyncio.sleep(0.1)

    async def _rotations(self, until: float) -> None:
        while time.time() < until:
            await asyncio.sleep(random.expovariate(1 / 1.5))
            secret = random.choice(secrets())
            project, location, secret_id = secret
            self.versions[secret] += 1
            await asyncio.to_thread(self.sm.add_version, secret_id, value_of(secret, self.versions[secret]),
                                    project=project, location=location)

    async def _faults(self, until: float) -> None:
        kinds = ["worker_killed", "postgres_restarted", "secret_manager_unavailable", "secret_manager_hanging"]
        while time.time() + 15 < until:
            await asyncio.sleep(random.uniform(5, 15))
            chosen = random.sample(kinds, 2 if random.random() < 0.2 else 1)
            await asyncio.gather(*(self._inject(kind) for kind in chosen))

    async def _inject(self, kind: str) -> None:
        self.faults[kind] += 1
        if kind == "worker_killed":
            worker = random.choice(self.workers)
            worker.kill()
            await asyncio.sleep(3)
            await asyncio.to_thread(worker.start, 120)
        elif kind == "postgres_restarted":
            await asyncio.to_thread(self.stack.postgres.restart)
        elif kind == "secret_manager_unavailable":
            fault = self.sm.inject(grpc.StatusCode.UNAVAILABLE)
            await asyncio.sleep(random.uniform(1, 4))
            with self.sm._lock:
                self.sm.faults.remove(fault)
        else:
            for secret in secrets():
                self.sm.hold(secret[2] if not secret[1] else f"{secret[1]}/{secret[2]}")
            await asyncio.sleep(random.uniform(1, 4))
            for secret in secrets():
                self.sm.release(secret[2] if not secret[1] else f"{secret[1]}/{secret[2]}")

    @staticmethod
    async def _keep_trying(call, *args) -> None:
        """The driver's own writes through a fault (PostgreSQL restarting): tried until they are taken."""
        for _ in range(600):
            try:
                await call(*args)
                return
            except Exception:
                await asyncio.sleep(0.1)
        raise RuntimeError("the soak's driver could not write for a minute")

    async def _settle(self) -> None:
        """Every live execution finished, and time for the workers to catch up (warm deadline, refreshes)."""
        async with Keychain(self.settings) as kc:
            for execution in [e for e in self.started if e not in self.finished]:
                await kc.pool.execute("DELETE FROM soak_live WHERE execution_id = $1", execution)
                await produce(self.bootstrap, self.settings.events_topic, [finish_event(execution)])
                self.finished.add(execution)
            deadline = time.time() + 60
            while time.time() < deadline:
                lag = await kc.pool.fetchval(
                    "SELECT count(*) FROM keychain WHERE execution_id = ANY($1::bigint[])", list(self.finished))
                if not lag:
                    break
                await asyncio.sleep(0.5)

    async def _check(self, history: str) -> dict:
        violations: Counter[str] = Counter()
        async with Keychain(self.settings) as kc:
            written = defaultdict(set)
            for row in await kc.pool.fetch("SELECT execution_id, credential_name FROM soak_written"):
                written[row["execution_id"]].add(row["credential_name"])
            left = await kc.pool.fetchval("SELECT count(*) FROM keychain WHERE execution_id = ANY($1::bigint[])",
                                          list(self.finished))
            applied = {r["notice_id"]: r["applied_at"].timestamp()
                       for r in await kc.pool.fetch("SELECT notice_id, applied_at FROM keychain_applied_notice")}
        dead = Counter()
        for record in await _all_records(self.bootstrap, self.settings.dlq_topic):
            if record.key and record.key.isdigit():
                dead[int(record.key)] += 1
        for execution, refs in self.started.items():
            if dead[execution] > 1:
                violations["dead_lettered_twice"] += 1
            if not dead[execution] and set(refs) - written[execution]:
                violations["start_lost"] += 1
        if left:
            violations["finished_with_rows"] += left
        # notices applied: (identity of the secret, the version it added, when applied)
        added: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for record in await _all_records(self.bootstrap, self.settings.rotations_topic):
            notice = json.loads(record.value)
            if notice["event_type"] == "SECRET_VERSION_ADD" and notice["notice_id"] in applied:
                name, _, number = notice["version"].rpartition("/versions/")
                added[name].append((int(number), applied[notice["notice_id"]]))
        reads, hits_checked, worst_stale = 0, 0, 0.0
        errors_seen: Counter[str] = Counter()
        with open(history) as lines:
            for line in lines:
                read = json.loads(line)
                reads += 1
                if read["outcome"] == "error":
                    errors_seen[read["error"]] += 1
                    if read["error"] not in TYPED_ERRORS:
                        violations["untyped_error"] += 1
                    continue
                if read["outcome"] != "hit" or not isinstance(read["value"], str):
                    continue
                ref, _, version = read["value"].rpartition("#")
                answered = _answered_name(ref)
                hits_checked += 1
                for newer, at in added.get(answered, []):
                    if newer > int(version) and at + APPLY_GRACE_SECONDS < read["t0"]:
                        violations["stale_read"] += 1
                        worst_stale = max(worst_stale, read["t0"] - at)
                        break
        # One call per secret version per shared-fetch window is the ideal (a window's executions share one fetch,
        # across both workers); a version added in a window is a second one. Calls made while a fault ran (retries
        # after UNAVAILABLE, PostgreSQL gone so nothing shared) count too.
        with self.sm._lock:
            log = list(zip(self.sm.log, self.sm.log_times))
        ok = [(name, at) for (method, name, outcome), at in log if method == "AccessSecretVersion" and outcome == "OK"]
        windows = {(name, int(at // SHARED_WINDOW_SECONDS)) for name, at in ok}
        rotations_in_run = sum(self.versions.values()) - len(self.versions)
        per_version = round(len(ok) / max(1, len(windows) + rotations_in_run), 3)
        if per_version > 1.2:
            violations["secret_manager_calls_over_1.2x"] += 1
        os.unlink(history)
        return {"seconds": self.seconds, "faults": dict(self.faults), "events": len(self.started) + len(self.finished),
                "executions": len(self.started), "dead_letters": sum(dead.values()), "reads": reads,
                "reader_errors": dict(errors_seen), "violations": sum(violations.values()),
                "violations_by_kind": dict(violations), "worst_stale_window_s": round(worst_stale, 3),
                "hits_checked": hits_checked, "notices_checked": sum(len(v) for v in added.values()),
                "rotations": rotations_in_run, "sm_ok_calls": len(ok), "secret_windows": len(windows),
                "sm_calls_per_version_window": per_version}


def _answered_name(ref: str) -> str:
    """projects/ID[/locations/L]/secrets/S/versions/latest -> Secret Manager's name of the secret (by number)."""
    parts = ref.split("/")
    parts[1] = NUMBERS.get(parts[1], parts[1])
    return "/".join(parts[:-2])


async def _all_records(bootstrap: str, topic: str) -> list:
    """Every record of a topic (read for 10 s: to its end)."""
    return await consume(bootstrap, topic, 10**9, timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="90 s")
    args = parser.parse_args()
    reason = pubsub_unavailable_reason()
    if reason:
        report({"skipped": reason})
        return
    with LocalStack(secret_manager_delay_seconds=0.05) as stack:
        report(asyncio.run(Soak(stack, 90.0 if args.quick else args.seconds).run()))


if __name__ == "__main__":
    main()
