"""``chatd serve | check-config | token``."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys

import trio

from chatd.config import Config, ConfigError, encode_config, load_config, resolve_config


def main(argv: list[str] | None = None) -> int:
    from chatd import __version__

    parser = argparse.ArgumentParser(prog="chatd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="JSON config file (default: ./config.json if present, "
                                        "else the embedded default)")
    serve.add_argument("--host", help="override the config's host, as HOST:PORT")
    serve.add_argument("--store", help="override the config's store")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check-config", help="validate a config and print it in effect")
    check.add_argument("path")

    token = commands.add_parser("token", help="print a token for USER-ID")
    token.add_argument("user_id", metavar="USER-ID")
    token.add_argument("--ttl", type=float, default=86400.0,
                       help="seconds until the token expires (default: one day)")
    token.add_argument("--config")
    token.add_argument("--store", help="the server's store, if its config does not name it "
                                       "(as with `chatd serve --store`)")

    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            print(encode_config(load_config(args.path)).decode())
            return 0
        config, _ = resolve_config(args.config)
        if args.command == "token":
            if args.store:
                config.store = args.store
            return _token(config, args.user_id, args.ttl)
        if args.host:
            config.host = args.host
            config.bind  # validates
        if args.store:
            config.store = args.store
        if args.log_level:
            config.log_level = args.log_level
    except (ConfigError, ValueError) as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
    return serve_forever(config)


def _token(config: Config, user_id: str, ttl: float) -> int:
    from chatd.store import StoreError, read_setting
    from chatd.tokens import mint

    secret = config.jwt_secret
    if secret is None:
        # The secret the server generated and keeps in its store. Never make
        # a new one here: a token the server cannot verify helps nobody.
        if config.store == ":memory:":
            print("chatd: no jwt-secret configured and the store is :memory: name the "
                  "server's config (--config) or store (--store)", file=sys.stderr)
            return 1
        try:
            secret = read_setting(config.store, "jwt-secret")
        except StoreError as exc:
            print(f"chatd: no jwt-secret configured and {exc}: name the server's config "
                  "(--config) or store (--store)", file=sys.stderr)
            return 1
        if secret is None:
            print(f"chatd: {config.store} holds no generated jwt-secret: start the server "
                  "once, or set jwt-secret", file=sys.stderr)
            return 1
    print(mint(secret, user_id, ttl))
    return 0


def serve_forever(config: Config) -> int:
    _tune_gc()
    from chatd.logs import configure
    configure(config.log_level, config.log_format)
    try:
        trio.run(_serve_until_signal, config)
    except BaseExceptionGroup as group:
        # A port in use, a missing certificate, an unwritable store: one
        # clear line for the operator instead of a traceback.
        errors, rest = group.split((OSError, RuntimeError))
        if errors is None or rest is not None:
            raise
        while isinstance(errors, BaseExceptionGroup):
            errors = errors.exceptions[0]
        logging.getLogger("chatd").error("cannot start: %s", errors)
        return 1
    return 0


def _tune_gc() -> None:
    """Collect cycles less often. With thousands of connections alive,
    CPython's default (a young collection every 700 allocations, promoting
    into ever-larger old generations) took a quarter of a connect storm's
    CPU; with this, 1,200 connects/s took 70% of a core instead of 96%
    (docs/performance.md). ``freeze`` keeps start-up objects out of every
    collection."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def _serve_until_signal(config: Config) -> None:
    from chatd.server import Server

    server = Server(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    logging.getLogger("chatd").info("received %s", signal.Signals(signum).name)
                    server.shutdown()
                    return

            nursery.start_soon(watch)
            await server.run()  # returns once shut down
            nursery.cancel_scope.cancel()
