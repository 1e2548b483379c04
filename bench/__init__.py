"""Benchmarks: evllm side by side with `vllm serve` and `vllm run-batch` (issue 6). `python -m bench`."""
