"""`fucina serve`: the OpenAI-compatible API and the web chat page for one model (fucina.serve).

Binds 127.0.0.1 unless `--host` says otherwise; `--api-key` (or $FUCINA_API_KEY) makes every path but
/health and the web page require `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import os

from fucina.cli.generate import add_compile_argument
from fucina.errors import ConfigError

API_KEY_VARIABLE = "FUCINA_API_KEY"


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument("--model", required=True, help="run directory (uses best/) or model directory")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key", default=None, help=f"require this bearer key (default: ${API_KEY_VARIABLE})"
    )
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    serve.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for a row (default 64)"
    )
    serve.add_argument("--model-name", default=None, help="the name clients use (default: the directory's)")
    add_compile_argument(serve)
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fucina.serve.app import create_app

    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    app = create_app(
        args.model,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        compile=args.compile,
        model_name=args.model_name,
    )
    print(f"fucina: serving {app.state.model_name} at http://{args.host}:{args.port}/ (OpenAI API under /v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
