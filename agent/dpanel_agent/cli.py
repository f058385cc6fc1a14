"""Command line of ``dpanel-tunnel``: ``dpanel-tunnel TOKEN`` or ``--config FILE``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from dpanel_proto.token import parse_token
from dpanel_proto.wire import DecodeError

from . import __version__
from .config import AgentConfig, ConfigError, load_config
from .errors import AgentError
from .tokensrc import TokenError, check_pins, read_token_text, resolve_token

__all__ = ["main"]

EXIT_USAGE = 2  # bad config or token: fix the input, retrying will not help
EXIT_RUNTIME = 1

_DESCRIPTION = """\
Keep this device reachable through dPanel: announce presence on MQTT and, on a signed
request from the manager, open an SSH reverse tunnel to the public tunnel server.
"""

_EPILOG = """\
where the token comes from (first match wins):
  TOKEN argument       dpanel-tunnel dpt1.... (visible to every local user in `ps`!)
  -                    read it from stdin:   dpanel-tunnel - < token.txt
  --token-file FILE    read it from a file (keep it mode 0600)
  DPANEL_TOKEN         environment variable (e.g. systemd EnvironmentFile=)
  --config FILE        token_file / import_token_from keys of the TOML config
  <state_dir>/token    the default token_file

exit status: 0 stopped by a signal, 2 bad token or config, 1 other fatal error.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpanel-tunnel", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("token", nargs="?", metavar="TOKEN",
                   help="device token, or '-' to read it from stdin")
    p.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from FILE")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="where the host key (and default token file) live "
                        "(default: /var/lib/dpanel-tunnel as root, else "
                        "~/.local/state/dpanel-tunnel)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"dpanel-tunnel {__version__}")
    return p


def _fail(code: int, message: str) -> int:
    print(f"dpanel-tunnel: {message}", file=sys.stderr)
    return code


def _setup_logging(level: str) -> None:
    # journald adds its own timestamps, but people also run this by hand
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "debug":
        logging.getLogger("asyncssh").setLevel(logging.WARNING)


def _build_config(args: argparse.Namespace) -> AgentConfig:
    cfg = load_config(args.config) if args.config else AgentConfig(source="command line")
    cfg = cfg.with_overrides(state_dir=args.state_dir, log_level=args.log_level,
                             token_file=args.token_file)
    env_token = os.environ.pop("DPANEL_TOKEN", None)  # never inherited by shell sessions
    raw: Optional[str] = None
    where = ""
    if args.token == "-":
        raw, where = read_token_text(sys.stdin.read()), "stdin"
    elif args.token:
        raw, where = args.token, "argument"
    elif args.token_file is None and env_token:
        raw, where = env_token, "DPANEL_TOKEN"
    if raw is not None:
        if not raw:
            raise TokenError(f"no token on {where}")
        try:
            token = parse_token(raw)
        except DecodeError as exc:
            raise TokenError(f"{where}: {exc}") from None
        try:
            check_pins(token, cfg.pins_dir)
        except TokenError as exc:
            raise TokenError(f"{where}: {exc}") from None
        return replace(cfg, token=token)
    return replace(cfg, token=resolve_token(cfg))


async def _run(cfg: AgentConfig) -> None:
    from .agent import Agent

    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _build_config(args)
    except ConfigError as exc:
        return _fail(EXIT_USAGE, f"config: {exc}")
    except TokenError as exc:
        return _fail(EXIT_USAGE, f"token: {exc}")
    _setup_logging(cfg.log_level)
    try:
        asyncio.run(_run(cfg))
    except (ConfigError, TokenError, DecodeError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    except AgentError as exc:
        return _fail(EXIT_RUNTIME, str(exc))
    except KeyboardInterrupt:
        pass
    return 0
