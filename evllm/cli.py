"""The `evllm` command: serve, demo-model, render, send, batch."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence


def _demo_model(args: argparse.Namespace) -> int:
    from predictors.demo_model import digest, write_demo_model

    path = write_demo_model(args.directory)
    print(f"{path} sha256={digest(path)}")
    return 0


def _add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`evllm render` is deploy tooling (package `inferenceservices`): present in a source checkout,
    left out of the serving image."""
    if importlib.util.find_spec("inferenceservices") is None:
        return
    from inferenceservices import render

    render.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    import eventing.cli

    parser = argparse.ArgumentParser(prog="evllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve a model (all flags: `evllm serve --help`)", add_help=False)
    sub.add_parser(
        "prepare",
        help="build what a start reuses (compile cache, demo model, downloads) into --cache_dir and exit; "
        "same flags as serve",
        add_help=False,
    )
    demo = sub.add_parser("demo-model", help="write the deterministic tiny demo model to DIRECTORY")
    demo.add_argument("directory")
    demo.set_defaults(func=_demo_model)
    _add_render(sub)
    eventing.cli.add_parsers(sub)
    return parser


def serve(argv: Sequence[str]) -> None:
    """The predictor server with eventing on it: the only place the two packages meet."""
    from eventing.extension import Eventing
    from predictors.server import main as serve_main

    serve_main(argv, extensions=[Eventing()])


def prepare(argv: Sequence[str]) -> None:
    """`evllm prepare` takes serve's flags (eventing's included), so one command line fits both."""
    from eventing.extension import Eventing
    from predictors.prepare import prepare as prepare_main
    from predictors.server import setup_environment

    setup_environment()
    prepare_main(argv, extensions=[Eventing()])


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # Serve flags are KServe's, evllm's, eventing's and every vLLM engine flag: parsed by the server.
        serve(argv[1:])
        return
    if argv[:1] == ["prepare"]:
        prepare(argv[1:])
        return
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
