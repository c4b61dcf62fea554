"""faust's aiokafka transport, with the consumer's fetch wait taken from KEYCHAIN_CONSUMER_FETCH_MAX_WAIT_MS.

faust-streaming 0.15 hard-codes `fetch_max_wait_ms=1500`. Apache Kafka answers a fetch as soon as a record arrives, so
there the wait costs nothing; the local tansu broker holds a multi-partition fetch until the wait ends, which would
add up to 1.5 s to every event on the local stack (measured: 555 ms per record at 1500 ms, with 4 partitions).
Registered as the faust transport `keychain-kafka` (entry point `faust.transports` in pyproject.toml).
"""

from __future__ import annotations

from faust.transport.drivers import aiokafka as driver

from .settings import worker_settings_from_env


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # aiokafka hands this to its fetcher when the consumer starts; faust offers no setting for it.
        consumer._fetch_max_wait_ms = worker_settings_from_env().consumer_fetch_max_wait_ms
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer
