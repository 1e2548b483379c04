"""Deploy tooling for evllm, not in the image: the kustomize manifests (``base/``, ``overlays/``,
``monitoring/``), ``evllm render`` (which builds its objects from those same files), offline validation
against the vendored CRDs (``crds/``).
"""
