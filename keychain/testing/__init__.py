"""Local stand-ins and services for tests, benchmarks and the demo (not imported by production code)."""
