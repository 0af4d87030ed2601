"""qbert-serve: serve an export directory over the KServe v2 / Triton HTTP protocol, with dynamic batching."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from qbert_deploy.cli.common import run_cli


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _delay(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be between 0 and 10000 ms, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbert-serve", description=__doc__)
    parser.add_argument("export_dir", help="an export directory written by qbert-export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    parser.add_argument("--providers", default="cpu",
                        help="execution providers in order of preference, comma separated: cpu, cuda, tensorrt "
                             "(default cpu; a later one is a fallback)")
    parser.add_argument("--profile", default=None,
                        help="lowering profile to serve (default: the provider's fast one, cpu-w8a8 on the CPU): "
                             "model.<PROFILE>.onnx if the export has it, else model.onnx lowered at start; "
                             "'canonical' serves model.onnx as exported")
    parser.add_argument("--threads", type=_positive, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--shape-buckets", default=None, metavar="BATCHESxSEQUENCES",
                        help="run every batch padded to a fixed shape bucket, e.g. 1,8,32x32,64,128,256 (the "
                             "default with --cuda-graph); padding is invisible to clients, and a batch beyond the "
                             "largest bucket runs unpadded")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture one CUDA graph per shape bucket and replay it (needs --providers cuda)")
    parser.add_argument("--max-batch", type=_positive, default=32, help="most rows per model run (default 32)")
    parser.add_argument("--max-delay-ms", type=_delay, default=5.0,
                        help="longest wait for more requests to fill a batch (default 5)")
    parser.add_argument("--max-queue", type=_positive, default=256,
                        help="requests admitted and not yet answered; beyond that the server answers 503 with "
                             "Retry-After (default 256)")
    parser.add_argument("--max-body-bytes", type=_positive, default=8 << 20,
                        help="largest request body accepted, else 413 (default 8 MiB)")
    parser.add_argument("--max-request-tokens", type=_positive, default=None,
                        help="most tokens (rows x sequence length) one request may run, else 400 (default: "
                             "--max-batch x the model's maximum length); text is also cut to 64 characters per "
                             "token before it is tokenised")
    parser.add_argument("--max-connections", type=_positive, default=1000,
                        help="open connections served at once; past that, requests get 503 (default 1000)")
    parser.add_argument("--header-timeout-s", type=_seconds, default=10.0,
                        help="a connection whose request headers are not complete this long after it opened (or "
                             "after its last answer) is closed (default 10)")
    parser.add_argument("--body-timeout-s", type=_seconds, default=30.0,
                        help="a request body not received this long after its headers gets 408 (default 30)")
    parser.add_argument("--max-length", type=_positive, default=None,
                        help="most tokens per sequence; longer text is cut (or refused with --reject-long-text). "
                             "Default: the length the model was trained and calibrated at, as qbert-export recorded it")
    parser.add_argument("--model-name", default="qbert", help="the model's name in URLs (default qbert)")
    parser.add_argument("--reject-long-text", action="store_true",
                        help="answer 400 to text longer than the model maximum instead of truncating it")
    parser.add_argument("--graceful-timeout-s", type=_positive, default=30,
                        help="on SIGTERM or Ctrl-C, how long in-flight requests may take to finish; those still "
                             "unfinished then get 503 (default 30)")
    parser.add_argument("--no-verify", action="store_true",
                        help="serve the model file without checking it against the sha256 qbert-export recorded in "
                             "qbert_recipe.json (for a file placed by hand; a warning says so)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qbert_deploy.runtimes.buckets import ShapeBuckets
    from qbert_deploy.runtimes.export_dir import UnverifiedFileError
    from qbert_deploy.runtimes.serving.app import ServeConfig, create_app
    from qbert_deploy.runtimes.serving.http_server import GracefulServer, with_header_deadline
    from qbert_deploy.runtimes.serving.model import ServedModel

    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    buckets = ShapeBuckets.parse(args.shape_buckets) if args.shape_buckets else None
    try:
        model = ServedModel(args.export_dir, profile=args.profile, providers=providers, threads=args.threads,
                            shape_buckets=buckets, cuda_graph=args.cuda_graph, verify=not args.no_verify,
                            max_length=args.max_length)
    except UnverifiedFileError as err:
        raise UnverifiedFileError(f"{err} (--no-verify serves it unverified)") from None
    if args.no_verify:
        print(f"qbert-serve: warning: --no-verify: {model.path} is served without checking its sha256 against "
              "qbert_recipe.json", file=sys.stderr, flush=True)
    print(f"qbert-serve: {_length_note(model.max_length, model.trained_length, args.max_length is not None)}",
          file=sys.stderr, flush=True)
    config = ServeConfig(model_name=args.model_name, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                         max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                         reject_long_text=args.reject_long_text, body_timeout_s=args.body_timeout_s,
                         max_request_tokens=args.max_request_tokens)
    app = create_app(model, config)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    port = sock.getsockname()[1]
    where = f"http://[{args.host}]:{port}" if family == socket.AF_INET6 else f"http://{args.host}:{port}"

    def ready() -> None:  # printed once the socket accepts: a script may connect as soon as it reads the line
        print(f"qbert-serve: serving {model.served.describe()} as {config.model_name!r} on "
              f"{', '.join(model.providers)}; listening on {where}", flush=True)

    # limit_concurrency counts the connection asking too, so N + 1 lets N connections be served at once;
    # uvicorn's own graceful timeout is a backstop a second after ours (GracefulServer answers 503 at ours)
    uvicorn_config = uvicorn.Config(app, log_level=args.log_level, access_log=False,
                                    http=with_header_deadline(args.header_timeout_s),
                                    limit_concurrency=args.max_connections + 1,
                                    timeout_graceful_shutdown=args.graceful_timeout_s + 1)
    server = GracefulServer(uvicorn_config, app.state.server, args.graceful_timeout_s, on_ready=ready)
    server.run(sockets=[sock])
    if not server.started:
        raise RuntimeError("the server did not start (see the log above)")
    abandoned = app.state.server.abandoned
    print("qbert-serve: stopped" + (f" ({abandoned} requests unfinished at the {args.graceful_timeout_s} s graceful "
                                    "timeout got 503)" if abandoned else ""), flush=True)
    return 0


def _length_note(served: int, trained: int | None, asked: bool) -> str:
    """One line on the sequence length served, and where it differs from the trained one."""
    if trained is None:
        return (f"at most {served} tokens per sequence (the export records no trained length: exported before it "
                "was recorded)")
    if not asked:
        return f"at most {served} tokens per sequence, the length the model was trained at (--max-length overrides)"
    if served == trained:
        return f"at most {served} tokens per sequence, the length the model was trained at"
    effect = f"accuracy beyond {trained} tokens was not validated" if served > trained else "longer text is cut"
    return f"note: --max-length {served} overrides the trained length {trained}: {effect}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("qbert-serve", lambda: _serve(args))


if __name__ == "__main__":
    sys.exit(main())
