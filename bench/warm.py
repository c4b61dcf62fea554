"""Warming through the real broker: N execution-start events, each naming 3 secrets out of a pool of M (one in
REGIONAL_EVERY of them a regional secret, `projects/P/locations/europe-west1/...`, fetched from its location's
endpoint: `regional_first_use_hit_ratio` is the first-use hit ratio of the executions whose first read names one).

Reports events/s, event -> rows-ready latency, Secret Manager calls per event, the first-use hit ratio when each
execution's first read comes FIRST_READ_AFTER_S after its event, and the worker's peak RSS; next to a Secret Manager
access measured in the same run (what each first read cost without warming).

Four bursts, each with a worker, schema and topics of its own, in the order A B B A so that a machine growing
busier or quieter weighs on both alike: A = events carrying the playbook inline (the baseline: keys without a
prefix), B = NoETL's own `playbook_started` records carrying only the catalog id and the workload, the playbook read
from a `catalog` table (keys `catalog_*`, and `catalog_vs_inline_events_per_s`). Each figure is the mean of its two
bursts.

Then the first-read curve: for each delay D in FIRST_READ_DELAYS_MS, a burst naming secrets nobody fetched yet,
each execution's first read (`get_or_fetch`, as a NoETL worker reads) D ms after its event was sent: the read's
p50/p99 (`first_read_D_ms_p50`, `first_read_D_ms_p99`) and the Secret Manager calls beyond one per secret
(`extra_sm_calls_D`: reads that raced the warm and called on their own). `ready_p99_minus_sm_p99_ms` is the warm's
own share of the event -> rows-ready p99.

Last, executions starting one at a time (`steady_*`): an event every STEADY_INTERVAL_MS, each naming secrets nobody
fetched yet, so that each pays one Secret Manager call; `steady_ready_p99_minus_sm_p99_ms` is the warm's own share
of the p99 when the worker is not busy (an event that queued behind the previous one's call shows here).

And the consumer's own cost (bench/warm_consumer.py): a burst of NoETL's step records, which the warmer reads and
ignores (`ignored_*`: the worker's events/s and CPU per record when a record needs no work), next to a plain aiokafka
consumer's floor on the same records in the same run (`aiokafka_floor_ms_per_record`, and the ratio); and an idle
worker's CPU per second, at the production fetch wait and at the local broker's (`idle_*`).

And the noetl target (`noetl_*`, bench/warm_noetl.py): NoETL's own keychain warmed for its unmodified server, Secret
Manager calls per execution against NoETL alone (one per alias field per execution), and the first-read hit ratio of
NoETL's server's read.

    python -m bench.warm [--quick]
"""

from __future__ import annotations

import asyncio
import time

import psutil
import yaml
from aiokafka import AIOKafkaProducer

from keychain import Keychain, SecretManagerSource
from keychain.refs import SecretRef
from devtools.stack import LocalStack
from devtools.noetl_samples import as_message, register, rust_playbook_started

from .common import arguments, consuming_worker, median_ms, ms, own_worker, percentile, report, worker_cpu_seconds
from .warm_consumer import consumer_cost
from .warm_noetl import noetl_burst

SECRETS_PER_EVENT = 3
POOL = 20
REGIONAL_EVERY = 4  # of the pool's secrets, one in this many is regional
REGION = "europe-west1"
FIRST_READ_AFTER_S = 1.0
FIRST_READ_DELAYS_MS = (0, 50, 100, 250, 500, 1000)
CURVE_POOL = 10  # fresh secrets per delay
STEADY_INTERVAL_MS = 100
CATALOG_ID = 42
# Three steps, each authenticating with a secret the workload names, written as NoETL writes templates (bare).
PLAYBOOK = """\
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: bench_warm, path: bench/warm}
workflow:
""" + "".join(f"""\
  - step: call_{k}
    tool:
      kind: http
      auth:
        api:
          type: bearer
          provider: secret_manager
          key: '{{{{ secret_{k} }}}}'
""" for k in range(SECRETS_PER_EVENT))

INLINE_PLAYBOOK = yaml.safe_load(PLAYBOOK)


def start_message(mode: str, execution_id: int, wanted: list[str]) -> tuple[bytes, bytes]:
    workload = {f"secret_{k}": ref for k, ref in enumerate(wanted)}
    if mode == "catalog":
        return as_message(rust_playbook_started(execution_id, CATALOG_ID, "bench/warm", workload))
    return as_message({"event_type": "playbook.initialized", "execution_id": execution_id, "workload": workload,
                       "playbook": INLINE_PLAYBOOK})


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)
        except psutil.Error:
            pass
        await asyncio.sleep(0.1)


async def run(stack: LocalStack, quick: bool) -> dict:
    server = stack.secret_manager
    refs = []
    for i in range(POOL):
        location = REGION if i % REGIONAL_EVERY == 0 else None
        server.create_secret(f"warm-{i}", location=location)
        server.add_version(f"warm-{i}", f"value-{i}-" + "x" * 40, location=location)
        where = f"/locations/{location}" if location else ""
        refs.append(f"projects/test-project{where}/secrets/warm-{i}/versions/latest")
    runs: dict[str, list[dict]] = {"inline": [], "catalog": []}
    for mode in ("inline", "catalog", "catalog", "inline"):
        runs[mode].append(await burst(stack, quick, mode, refs, len(runs[mode])))
    inline, catalog = (mean_of(runs[mode]) for mode in ("inline", "catalog"))
    curve = await first_read_curve(stack, quick)
    steady_figures = await steady(stack, quick)
    floor = await consumer_cost(stack, quick)
    noetl = await noetl_burst(stack, quick, FIRST_READ_AFTER_S)
    return {
        **inline,
        "ready_p99_minus_sm_p99_ms": round(inline["ready_p99_ms"] - inline["sm_p99_ms"], 3),
        **{f"catalog_{k}": v for k, v in catalog.items()
           if k not in ("events", "sm_p50_ms", "sm_p99_ms", "first_read_after_ms")},
        "catalog_vs_inline_events_per_s": round(catalog["events_per_s"] / inline["events_per_s"], 3),
        **curve,
        **steady_figures,
        **floor,
        **noetl,
    }


def mean_of(figures: list[dict]) -> dict:
    return {k: figures[0][k] if all(f[k] == figures[0][k] for f in figures)
            else round(sum(f[k] for f in figures) / len(figures), 4) for k in figures[0]}


async def sm_latencies(kc: Keychain, ref: str, count: int) -> list[float]:
    """Secret Manager accesses through the official client, measured in this run (what a first use costs unwarmed)."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await kc.source.access(SecretRef.parse(ref))
        samples.append(time.perf_counter() - started)
    return samples


async def warmed(kc: Keychain, first_id: int, events: int, timeout: float = 120) -> None:
    """Until the executions first_id ... first_id + events - 1 have all their rows ready."""
    deadline = time.monotonic() + timeout
    while await kc.pool.fetchval("SELECT count(*) FROM keychain WHERE state = 'ready' AND execution_id BETWEEN $1 AND "
                                 "$2", first_id, first_id + events - 1) < events * SECRETS_PER_EVENT:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not warm every event in time")
        await asyncio.sleep(0.05)


async def ready_moments(kc: Keychain, first_id: int, events: int) -> dict[int, float]:
    """When each execution's last row was written (epoch seconds), by execution id."""
    rows = await kc.pool.fetch("SELECT execution_id, extract(epoch FROM max(created_at))::float8 FROM keychain "
                               "WHERE execution_id BETWEEN $1 AND $2 GROUP BY 1", first_id, first_id + events - 1)
    return dict(rows)


async def burst(stack: LocalStack, quick: bool, mode: str, refs: list[str], index: int) -> dict:
    events = 300 if quick else 2000
    settings, env = await own_worker(stack, f"bench-warm-{mode}-{index}")
    server = stack.secret_manager
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    async with Keychain(settings, source=SecretManagerSource(settings)) as kc:
        await kc.migrate()
        if mode == "catalog":
            async with kc.pool.acquire() as conn:
                await register(conn, settings.schema_name, CATALOG_ID, "bench/warm", PLAYBOOK)
        sm_samples = await sm_latencies(kc, refs[0], 4 if quick else 10)
        calls_before = server.access_count()
        async with consuming_worker(kc, bootstrap, settings, env) as worker:
            peak, stop = [0.0], asyncio.Event()
            sampler = asyncio.create_task(sample_rss(worker.pid, peak, stop))
            first_id = 10_000_000
            sent_at: dict[int, float] = {}
            first_reads: list[tuple[bool, float, bool]] = []

            async def first_read(execution_id: int, ref: str) -> None:
                await asyncio.sleep(FIRST_READ_AFTER_S)
                started = time.perf_counter()
                lookup = await kc.get(ref, execution_id=execution_id)
                first_reads.append((bool(lookup), time.perf_counter() - started, "/locations/" in ref))

            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
            await producer.start()
            readers = []
            cpu_before = worker_cpu_seconds(worker.pid)
            for n in range(events):
                execution_id = first_id + n
                wanted = [refs[(n * 7 + k) % POOL] for k in range(SECRETS_PER_EVENT)]
                key, value = start_message(mode, execution_id, wanted)
                await producer.send(settings.events_topic, value, key=key)
                sent_at[execution_id] = time.time()
                readers.append(asyncio.create_task(first_read(execution_id, wanted[0])))
            await producer.flush()
            await producer.stop()
            await warmed(kc, first_id, events, timeout=300)
            worker_cpu = worker_cpu_seconds(worker.pid) - cpu_before
            await asyncio.gather(*readers)
            stop.set()
            await sampler
            ready = await ready_moments(kc, first_id, events)
    latencies = [moment - sent_at[execution_id] for execution_id, moment in ready.items()]
    span = max(ready.values()) - min(sent_at.values())
    hits = [hit for hit, _, _ in first_reads if hit]
    regional = [hit for hit, _, is_regional in first_reads if is_regional]
    return {
        "events": events,
        "events_per_s": round(events / span, 1),
        "ready_p50_ms": ms(percentile(latencies, 50)),
        "ready_p99_ms": ms(percentile(latencies, 99)),
        "sm_calls_per_event": round((server.access_count() - calls_before) / events, 4),
        "first_use_hit_ratio": round(len(hits) / len(first_reads), 4),
        "regional_first_use_hit_ratio": round(sum(regional) / len(regional), 4) if regional else None,
        "first_read_after_ms": FIRST_READ_AFTER_S * 1000,
        "sm_p50_ms": median_ms(sm_samples),
        "sm_p99_ms": ms(percentile(sm_samples, 99)),
        "worker_rss_mb": round(peak[0], 1),
        # The worker's CPU time (every thread) over the burst, per event, and as a share of the burst's span: near 1,
        # one core busy the whole time (the GIL's bound for one process; replicas on their own cores add throughput).
        "worker_cpu_ms_per_event": round(worker_cpu / events * 1000, 3),
        "worker_cpu_share_of_span": round(worker_cpu / span, 3),
    }


async def first_read_curve(stack: LocalStack, quick: bool) -> dict:
    """One worker; per delay, a burst on fresh secrets and each execution's first read that long after its event."""
    events = 60 if quick else 200
    settings, env = await own_worker(stack, "bench-warm-curve")
    server = stack.secret_manager
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    figures: dict[str, float] = {}
    # The reader stands for a NoETL worker that has been running: its pool is open and its statements prepared.
    reader_settings = settings.model_copy(update={"pool_min_size": settings.pool_max_size})
    async with Keychain(reader_settings, source=SecretManagerSource(reader_settings)) as kc:
        await kc.migrate()
        server.create_secret("curve-warm-up")
        server.add_version("curve-warm-up", "warm-up")
        warm_up = "projects/test-project/secrets/curve-warm-up/versions/latest"
        for round_ in range(20):
            await asyncio.gather(*(kc.get_or_fetch(warm_up, warm_up, execution_id=1_000 + round_ * 100 + i)
                                   for i in range(settings.pool_max_size)))
        async with consuming_worker(kc, bootstrap, settings, env):
            for d, delay_ms in enumerate(FIRST_READ_DELAYS_MS):
                refs = []
                for i in range(CURVE_POOL):
                    secret_id = f"curve-{delay_ms}-{i}"
                    server.create_secret(secret_id)
                    server.add_version(secret_id, f"value-{secret_id}-" + "x" * 40)
                    refs.append(f"projects/test-project/secrets/{secret_id}/versions/latest")
                calls_before = server.access_count()
                first_id = 20_000_000 + d * 100_000
                reads: list[float] = []

                async def first_read(sent: float, execution_id: int, ref: str) -> None:
                    await asyncio.sleep(max(0.0, sent + delay_ms / 1000 - time.perf_counter()))
                    started = time.perf_counter()
                    lookup = await kc.get_or_fetch(ref, ref, execution_id=execution_id)
                    reads.append(time.perf_counter() - started)
                    assert lookup.value is not None

                producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
                await producer.start()
                readers = []
                for n in range(events):
                    wanted = [refs[(n * 7 + k) % CURVE_POOL] for k in range(SECRETS_PER_EVENT)]
                    key, value = start_message("inline", first_id + n, wanted)
                    await producer.send(settings.events_topic, value, key=key)
                    readers.append(asyncio.create_task(first_read(time.perf_counter(), first_id + n, wanted[0])))
                await producer.flush()
                await producer.stop()
                await asyncio.gather(*readers)
                await warmed(kc, first_id, events)
                figures[f"first_read_{delay_ms}_ms_p50"] = ms(percentile(reads, 50))
                figures[f"first_read_{delay_ms}_ms_p99"] = ms(percentile(reads, 99))
                figures[f"extra_sm_calls_{delay_ms}"] = server.access_count() - calls_before - CURVE_POOL
    return figures


async def steady(stack: LocalStack, quick: bool) -> dict:
    """Executions starting one at a time, STEADY_INTERVAL_MS apart (less than a Secret Manager call), each naming
    secrets nobody fetched yet: every event pays one call, so event -> rows ready minus that call is the warm's own
    share when the worker is not busy, and shows an event waiting behind the previous one's call."""
    events = 20 if quick else 60
    settings, env = await own_worker(stack, "bench-warm-steady")
    server = stack.secret_manager
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    first_id = 40_000_000
    server.create_secret("steady-sample")
    server.add_version("steady-sample", "sample")
    async with Keychain(settings, source=SecretManagerSource(settings)) as kc:
        await kc.migrate()
        sm_samples = await sm_latencies(kc, "projects/test-project/secrets/steady-sample/versions/latest", 10)
        async with consuming_worker(kc, bootstrap, settings, env):
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
            await producer.start()
            sent_at: dict[int, float] = {}
            try:
                for n in range(events):
                    wanted = []
                    for k in range(SECRETS_PER_EVENT):
                        secret_id = f"steady-{n}-{k}"
                        server.create_secret(secret_id)
                        server.add_version(secret_id, f"value-{secret_id}")
                        wanted.append(f"projects/test-project/secrets/{secret_id}/versions/latest")
                    key, value = start_message("inline", first_id + n, wanted)
                    await producer.send_and_wait(settings.events_topic, value, key=key)
                    sent_at[first_id + n] = time.time()
                    await asyncio.sleep(STEADY_INTERVAL_MS / 1000)
            finally:
                await producer.stop()
            await warmed(kc, first_id, events)
            ready = await ready_moments(kc, first_id, events)
    latencies = [moment - sent_at[execution_id] for execution_id, moment in ready.items()]
    return {
        "steady_events": events,
        "steady_interval_ms": STEADY_INTERVAL_MS,
        "steady_ready_p50_ms": ms(percentile(latencies, 50)),
        "steady_ready_p99_ms": ms(percentile(latencies, 99)),
        "steady_ready_p99_minus_sm_p99_ms": round(ms(percentile(latencies, 99)) - ms(percentile(sm_samples, 99)), 3),
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    with LocalStack(secret_manager_delay_seconds=args.sm_delay_ms / 1000, pubsub=False) as stack:
        report(asyncio.run(run(stack, args.quick)))


if __name__ == "__main__":
    main()
