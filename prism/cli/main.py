"""``prism``'s entry point and its server commands, ``serve`` (and ``serve --check``) and
``reload``; the client commands come from one module per API: ``kv``, ``ts``, ``pubsub``
and ``ns``, and ``apply`` (a config file to a running server, through its admin port)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from prism.cli import apply, bench, kv, migrate, ns, plan, pubsub, ts
from prism.cli.client import EXIT_FAILURE, EXIT_USAGE
from prism.config import ServerConfig, config_path, load_config
from prism.errors import ConfigError
from prism.redact import redact

EXIT_INTERRUPTED = 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (``| head``) went away: stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="Prism data gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--listen", metavar="HOST:PORT", help="gRPC address to listen on")
    serve.add_argument("--data-dir", metavar="DIR", help="where local backends keep data")
    serve.add_argument("--config", metavar="FILE", help="TOML config file")
    serve.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    serve.add_argument(
        "--check",
        action="store_true",
        help="only check the config (and the files it names): exit 0 if it would serve, else 2",
    )
    serve.set_defaults(handler=_cmd_serve)

    reload = commands.add_parser("reload", help="make a running server re-read its config (SIGHUP)")
    reload.add_argument("--data-dir", metavar="DIR", help="the server's data dir (default: from config)")
    reload.add_argument("--config", metavar="FILE", help="TOML config file")
    reload.set_defaults(handler=_cmd_reload)

    kv.add_commands(commands)
    ts.add_commands(commands)
    pubsub.add_commands(commands)
    ns.add_commands(commands)
    plan.add_commands(commands)
    bench.add_commands(commands)
    apply.add_commands(commands)
    migrate.add_commands(commands)
    return parser


def _cmd_serve(args: argparse.Namespace) -> int:
    overrides = {"listen": args.listen, "data_dir": args.data_dir, "log_level": args.log_level}
    try:
        config = load_config(args.config, os.environ, overrides)
        if args.check:
            return _check(config, config_path(args.config, os.environ))

        def reload_config() -> ServerConfig:
            # SIGHUP: the same sources, read again.
            return load_config(args.config, os.environ, overrides)

        # Imported only now: a bad config must be reported before the server
        # module (and everything it pulls in) is loaded.
        from prism.server import serve

        file = config_path(args.config, os.environ)
        return serve(
            config, reload_config, config_file=os.path.abspath(file) if file else "", overrides=overrides
        )
    except ConfigError as exc:
        print(f"prism: config error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE


def _check(config: ServerConfig, file: str | None) -> int:
    """``serve --check``: what start-up checks before it binds anything (CPUs, the TLS, JWKS
    and token files, the routing table's size), and nothing else: no socket, no directory."""
    from prism.workers.preflight import check_deployable

    check_deployable(config)  # ConfigError: the caller prints it, exit 2
    cpus = len(os.sched_getaffinity(0))
    tenants = config.effective_tenants(cpus)
    print(
        f"config {file or '(defaults)'} is valid: {len(config.all_namespaces())} namespaces, "
        f"{len(tenants)} tenants, {sum(t.workers for t in tenants)} workers"
    )
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    """Send SIGHUP to the supervisor named in the runtime dir's pid file."""
    from prism.server import pid_file

    try:
        config = load_config(args.config, os.environ, {"data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"prism: config error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    path = pid_file(config)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except FileNotFoundError:
        print(f"prism: no running server: {path} does not exist", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError:
        print(f"prism: {path} does not hold a process id", file=sys.stderr)
        return EXIT_FAILURE
    except ProcessLookupError:
        print(f"prism: no running server: process {path.read_text().strip()} is gone", file=sys.stderr)
        return EXIT_FAILURE
    print(f"reload requested (pid {pid}); the server logs whether the new config was applied")
    return 0
