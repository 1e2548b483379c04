"""The `evllm` command: serve, demo-model, render, send, batch."""

from __future__ import annotations

import argparse
import sys


def _demo_model(args: argparse.Namespace) -> int:
    from .demo_model import digest, write_demo_model

    path = write_demo_model(args.directory)
    print(f"{path} sha256={digest(path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import eventing.cli

    from . import render

    parser = argparse.ArgumentParser(prog="evllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="serve a model (all flags: `evllm serve --help`)",
        add_help=False,
    )
    demo = sub.add_parser("demo-model", help="write the deterministic tiny demo model to DIRECTORY")
    demo.add_argument("directory")
    demo.set_defaults(func=_demo_model)
    render.add_parser(sub)
    eventing.cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # Serve flags are KServe's plus every vLLM engine flag: parsed by the server itself.
        from .server import main as serve_main

        serve_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
