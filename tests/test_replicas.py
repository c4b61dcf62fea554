"""Several replicas on one consumer group: one Secret Manager call per secret across all of them, one sweeper, and
a killed member's partitions taken over with nothing lost or doubled."""

import asyncio

from .streams_harness import Worker, create_topics, produce, start_event, wait_for, worker_env

REF = "projects/test-project/secrets/{}/versions/latest"


async def test_two_replicas_share_fetches_one_sweeps_and_a_killed_leader_is_replaced(
        stack, settings, key_spec, unique, keychain, sm, execution_id):
    secret_ids = [f"rep{i}-{unique}" for i in range(10)]
    for secret_id in secret_ids:
        sm.create_secret(secret_id)
        sm.add_version(secret_id, f"value-{secret_id}")
    sm.delay_seconds = 0.25  # fetches of both replicas overlap
    await create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", f"dlq-{unique}", partitions=8)
    # one consumer group of its own (the local broker wedges a group when two members leave at once)
    extra = {"KEYCHAIN_TOPIC_PARTITIONS": "8", "KEYCHAIN_SWEEP_INTERVAL_SECONDS": "0.5",
             "KEYCHAIN_SHARED_FETCH_SECONDS": "60"}
    workers = [Worker(worker_env(stack, settings, key_spec, unique, **extra)).start() for _ in range(2)]

    async def rows():
        return await keychain.pool.fetchval("SELECT count(*) FROM keychain")

    def events(first, count):
        return [start_event(first + i, [REF.format(secret_ids[(i * 3 + k) % 10]) for k in range(3)])
                for i in range(count)]

    try:
        # a burst through both replicas: each secret fetched once in all
        await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", events(execution_id, 100))
        await wait_for(lambda: _is(rows(), 300), 90, "the first burst warmed")
        assert [sm.access_count(s) for s in secret_ids] == [1] * 10
        assert all("rows written" in w.output and _wrote_rows(w.output) for w in workers), "both replicas took part"
        # exactly one sweeper
        await asyncio.sleep(2)
        sweepers = [w for w in workers if "sweep:" in w.output]
        assert len(sweepers) == 1
        assert all(f"events topic events-{unique}: 8 partitions" in w.output for w in workers)
        leader, other = sweepers[0], next(w for w in workers if w is not sweepers[0])
        swept_by_other = other.output.count("sweep:")
        # a second burst; the leader is SIGKILLed in the middle of it
        await produce(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", events(execution_id + 1000, 200))
        await wait_for(lambda: _more_than(rows(), 320), 60, "progress in the second burst")
        leader.kill()
        await wait_for(lambda: _is(rows(), 900), 120, "every event warmed after the kill")
        duplicates = await keychain.pool.fetchval(
            "SELECT count(*) FROM (SELECT credential_name, execution_id FROM keychain GROUP BY 1, 2 "
            "HAVING count(*) > 1) d")
        assert duplicates == 0

        async def survivor_sweeps():
            return other.output.count("sweep:") > swept_by_other

        await wait_for(survivor_sweeps, 60, "the surviving replica sweeping")
    finally:
        for worker in workers:  # one at a time
            worker.stop()


def _wrote_rows(output: str) -> bool:
    return any(" 0 rows written" not in line for line in output.splitlines() if "rows written" in line)


async def _is(coroutine, expected):
    return await coroutine == expected


async def _more_than(coroutine, threshold):
    return await coroutine > threshold


async def test_the_worker_reports_the_events_topics_partitions_and_warns_when_too_few(stack, settings, key_spec,
                                                                                     unique):
    await create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"events-{unique}", f"dlq-{unique}", partitions=4)
    worker = Worker(worker_env(stack, settings, key_spec, unique, KEYCHAIN_TOPIC_PARTITIONS="8")).start()
    try:
        async def reported():
            return "partitions" in worker.output

        await wait_for(reported, 30, "the partition report")
    finally:
        worker.stop()
    assert f"events topic events-{unique} has 4 partitions, fewer than KEYCHAIN_TOPIC_PARTITIONS=8" in worker.output
