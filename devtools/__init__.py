"""Development and demo tooling, apart from what runs in production (not installed with the package): the local
service stack, the demo, the worker as a local process, samples in NoETL's shapes, and compose helpers. The demo,
the tests and the benchmarks use it. The Secret Manager test server is the library's test kit
(`keychain.testing`), for other projects' tests too."""
