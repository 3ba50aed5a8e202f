"""Benchmark harness: max trainable length and throughput per technique set and hardware profile."""
