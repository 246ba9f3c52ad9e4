"""The command line: ``chatd serve``, ``chatd check-config``, ``chatd token``,
``chatd admin`` (``chatd.admin_cli``).

Every mistake an operator can make on the command line or in the config
ends in one line on stderr that names the thing (``chatd: ...``) and a
non-zero exit, never a traceback: exit 2 for a bad argument (argparse's
convention), 1 for a config or a state that cannot be used.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import resource
import signal
import sys

import trio

from chatd.config import (
    Config, ConfigError, config_warnings, encode_config, preflight, resolve_config,
)

DESCRIPTION = "chatd: one WebSocket chat daemon for five JSON chat protocols."
EPILOG = ("Run 'chatd COMMAND --help' for a command's options. With no --config, "
          "chatd reads ./config.json if it exists, else runs on the embedded default "
          "(all five protocols on 127.0.0.1:8765).")
#: The longest --ttl ``chatd token`` mints: ten years, in seconds.
MAX_TTL = 10 * 365 * 86400


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line: what is wrong, and where
    help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def main(argv: list[str] | None = None) -> int:
    from chatd import __version__

    parser = _Parser(prog="chatd", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the server until SIGINT or SIGTERM",
        description="Run the server until SIGINT or SIGTERM.")
    serve.add_argument("--config", metavar="PATH",
                       help="JSON config file (default: ./config.json if present, "
                            "else the embedded default)")
    serve.add_argument("--host", metavar="HOST:PORT", help="override the config's host")
    serve.add_argument("--store", metavar="PATH", help="override the config's store")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser(
        "check-config", help="check a config without starting; print it as chatd runs it",
        description="Check a config as 'chatd serve' would (values, JWT_SECRET, the wss "
                    "files, the store's directory, the cluster extras, the listen address) "
                    "without starting, and print it as chatd runs it, every default "
                    "filled in. Exit 1 with one line naming the problem.")
    check.add_argument("path", nargs="?", metavar="PATH",
                       help="the config file (default: as 'chatd serve': ./config.json if "
                            "present, else the embedded default)")
    check.add_argument("--show-secrets", action="store_true",
                       help="print secret-key and jwt-secret instead of ********")

    token = commands.add_parser(
        "token", help="print a GradAgenda/wschat token (JWT) for USER-ID",
        description="Print a JWT (HS256) for USER-ID, signed with the configured jwt-secret, "
                    "else the one the server generated in its store.")
    token.add_argument("user_id", metavar="USER-ID", type=_user_id,
                       help="1 to 256 characters without control characters")
    token.add_argument("--ttl", metavar="SECONDS", type=_ttl, default=86400,
                       help=f"seconds until the token expires, 1 to {MAX_TTL} "
                            "(default: 86400, one day)")
    token.add_argument("--config", metavar="PATH", help="the server's config file")
    token.add_argument("--store", metavar="PATH",
                       help="the server's store, if its config does not name it "
                            "(as with 'chatd serve --store')")

    from chatd import admin_cli  # the server API's command (issue 22)
    admin_cli.add_parser(commands)

    args = parser.parse_args(argv)
    try:
        config, path = resolve_config(args.path if args.command == "check-config" else args.config)
        if args.command == "check-config":
            return _check(config, path, show_secrets=args.show_secrets)
        if getattr(args, "store", None) is not None:
            if not args.store.strip():
                # An unset $STORE in a script would otherwise mean ./chatd.db.
                raise ValueError("--store is empty: give a SQLite file path or a "
                                 "postgresql:// URL")
            config.store = args.store
        if args.command == "token":
            return _token(config, args.user_id, args.ttl)
        if args.command == "admin":
            return admin_cli.run(config, args.method, args.fields)
        if args.host:
            config.host = args.host
            config.bind  # validates
        if args.log_level:
            config.log_level = args.log_level
        preflight(config, path)  # before anything starts: what check-config refuses
    except (ConfigError, ValueError) as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
    return serve_forever(config)


def _user_id(text: str) -> str:
    """A user id the server accepts (chatd.names.refusal: GradAgenda's rule)."""
    from chatd.names import refusal

    why = refusal(text)
    if why is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a user id the server accepts: it {why}")
    return text


def _ttl(text: str) -> int:
    """Whole seconds, 1 to MAX_TTL: a token must not be born expired, and
    its ``exp`` must stay a number every JWT library reads."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or not 1 <= seconds <= MAX_TTL:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a token's lifetime must be 1 to {MAX_TTL} seconds (ten years)")
    return int(seconds)


def _check(config: Config, path: str | None, *, show_secrets: bool) -> int:
    """``chatd check-config``: what ``serve`` would refuse (``preflight``,
    the same call ``serve`` makes), then the effective config on stdout and
    warnings on stderr."""
    preflight(config, path)
    for warning in config_warnings(config):
        print(f"chatd: warning: {warning}", file=sys.stderr)
    print(encode_config(config, show_secrets=show_secrets).decode())
    return 0


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
    for warning in config_warnings(config):
        logging.getLogger("chatd").warning("%s", warning)
    _raise_open_file_limit()
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


def _raise_open_file_limit() -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one, as Go's runtime
    does at start: systemd's default soft limit, 1,024, would keep the
    1,000th client waiting. Each connection holds one descriptor; the
    server warns once listening if even the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. macOS caps below RLIM_INFINITY
            logging.getLogger("chatd").debug("could not raise the open-file limit to %s: %s",
                                             hard, exc)


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
