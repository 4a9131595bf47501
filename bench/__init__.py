"""Benchmarks and load generators: the servers they measure, and the replayed client traffic
the demo and the canary tests send. Not part of the production packages."""
