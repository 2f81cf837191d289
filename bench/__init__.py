"""The benchmark (`make bench`): bench/run.py, its HTTP client and the bare engine's driver."""
