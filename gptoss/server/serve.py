"""`gptoss serve`: the command that loads a checkpoint and serves it with uvicorn."""

from __future__ import annotations

import os
import socket
import sys

import uvicorn

from gptoss.errors import GptOssError
from gptoss.server.app import create_app


def _served_model_name(folder: str) -> str:
    """The checkpoint folder's name ("gpt-oss-20b" also for gpt-oss-20b/original)."""
    path = os.path.normpath(os.path.abspath(folder))
    if os.path.basename(path) == "original":
        path = os.path.dirname(path)
    return os.path.basename(path) or "gpt-oss"


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a busy port fails at once, with one line."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise GptOssError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def cmd_serve(args) -> int:
    """`gptoss serve`: load the checkpoint, start the engine and serve the OpenAI-compatible API with uvicorn. Under
    torchrun rank 0 serves and schedules; the other ranks' engines follow its steps over their shards."""
    # Imported here: torch is slow to import and the server's request models do not need it.
    from gptoss.cli import _checkpoint_or_demo, _default_device, load_model_from_args
    from gptoss.engine import Engine
    from gptoss.parallel import joined, local_device

    with joined(local_device(args.device or _default_device())) as shard:
        sock = _listening_socket(args.host, args.port) if shard.rank == 0 else None
        folder = _checkpoint_or_demo(args.checkpoint, announce=shard.rank == 0)
        model, _ = load_model_from_args(args, folder, shard=shard)
        engine = Engine(model, max_batch_size=args.max_batch_size, context_length=args.context or 8192,
                        max_prefill_tokens=args.max_prefill_tokens)
        engine.warm_up(progress=sys.stderr.isatty() and shard.rank == 0)
        if sock is None:
            engine.follow()
            return 0
        _serve(args, engine, sock, args.model_name or _served_model_name(folder))
    return 0


def _serve(args, engine, sock: socket.socket, name: str) -> None:
    api_key = args.api_key or os.environ.get("GPTOSS_API_KEY") or None
    app = create_app(engine, name, api_key=api_key)
    engine.start()
    print(f"gptoss: serving {name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info" if args.verbose else "warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises the signal again: a normal stop
        pass
    finally:
        engine.stop()
        sock.close()
