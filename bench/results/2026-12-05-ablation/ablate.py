"""`evllm serve` (argv: its flags) with parts switched off, for an ablation; ABLATE is a comma list of:

- `grpc`: no gRPC server (otherwise on, as the benchmark runs it);
- `ext`: no eventing extension (the predictor alone);
- `mw`: none of evllm's middleware; `mw:<Class>`: not that one (e.g. `mw:Observe`);
- `metrics`: AsyncLLM.generate not wrapped by `metrics.instrument_generate`;
- `log`: no access line; `logfmt`: the access line built and formatted, but not written;
  `logbuf`: access lines written through a 64 KiB buffer instead of one write each.

OBS=<comma list> (possibly empty) replaces `middleware.Observe` with `obs_variant.Observe`, which can
leave out its parts (see there). Run with the repository on PYTHONPATH (multi.py does).
"""

import logging
import os
import sys

if __name__ == "__main__":
    from predictors import logs, metrics, server
    from predictors import middleware as mw

    ablate = set(filter(None, os.environ.get("ABLATE", "").split(",")))
    skip = {x[3:] for x in ablate if x.startswith("mw:")}
    if "mw" in ablate or skip:
        from fastapi import FastAPI

        add_middleware = FastAPI.add_middleware

        def add(self, cls, *args, **kwargs):
            if cls.__module__ == "predictors.middleware" and ("mw" in ablate or cls.__name__ in skip):
                return None
            return add_middleware(self, cls, *args, **kwargs)

        FastAPI.add_middleware = add  # type: ignore[method-assign]
    if os.environ.get("OBS") is not None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import obs_variant

        mw.Observe = obs_variant.Observe  # type: ignore[misc]
    if "metrics" in ablate:
        metrics.instrument_generate = lambda generate, check=None: generate  # type: ignore[assignment]
    if "logbuf" in ablate:  # access lines written through a 64 KiB buffer instead of flushed one by one
        configure = logs.configure

        def buffered_configure(*args, **kwargs):
            configure(*args, **kwargs)
            root = logging.getLogger().handlers[0]
            handler = logging.StreamHandler(open(2, "w", buffering=65536, closefd=False))  # noqa: SIM115
            handler.flush = lambda: None  # type: ignore[method-assign]
            handler.setFormatter(root.formatter)
            for f in root.filters:
                handler.addFilter(f)
            logs.access_logger.addHandler(handler)
            logs.access_logger.propagate = False

        logs.configure = buffered_configure  # type: ignore[assignment]
    if "logfmt" in ablate:  # the access line's record built and formatted, never handled (written)
        fmt = logs.JSONFormatter()
        ctx_filter = logs.ContextFilter()

        def access(msg, args, fields):
            record = logs.access_logger.makeRecord(
                logs.access_logger.name, logging.INFO, __file__, 0, msg, args, None, "access", fields
            )
            ctx_filter.filter(record)
            fmt.format(record)

        logs.access = access  # type: ignore[assignment]
    elif "log" in ablate:
        logging.getLogger("evllm.access").disabled = True
        logs.access = lambda *args, **kwargs: None  # type: ignore[assignment]
    argv = sys.argv[1:]
    if "grpc" not in ablate:
        from tests.server import free_port

        argv += ["--enable_grpc", "true", "--grpc_port", str(free_port())]
    if "ext" in ablate:
        server.main(argv)
    else:
        from evllm.cli import serve

        server.setup_environment()
        serve(argv)
