"""The composition root: the `evllm` command, which assembles the predictor server with eventing.

Dependencies point one way: `predictors` (the KServe predictor around one vLLM engine) knows nothing of
events or batch; `eventing` builds on it; only this package imports both (`make lint` checks it).
"""
