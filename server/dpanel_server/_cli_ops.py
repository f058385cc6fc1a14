"""``dpanel`` commands for operators: user, whoami, login, context and completion.

Kept apart from cli.py (which only registers them) so that the CLI stays one small
stdlib import; every command here imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from .client import ApiClient, client_for, when

__all__ = ["add_commands"]

Adder = Callable[[Any, str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


_api = client_for


# ---------------------------------------------------------------------------- users


def cmd_user_add(args: argparse.Namespace) -> int:
    from .authz import parse_selector

    for sel in args.scope:
        parse_selector(sel, "--scope")
    out = _api(args).call("POST", "/v1/users", {"name": args.name, "role": args.role,
                                                 "scope": args.scope})
    if args.print_token:
        print(out["token"])
        return 0
    scope = ", ".join(out["user"]["scope"]) or "every device"
    print(f"added {args.name} ({args.role}; scope: {scope}). Their token (shown once; it is "
          f"a secret):\n\n{out['token']}\n\nOn their machine: dpanel login URL --token TOKEN")
    return 0


_when = when


def cmd_user_list(args: argparse.Namespace) -> int:
    users = _api(args).call("GET", "/v1/users")
    if args.json:
        print(json.dumps(users, indent=2, sort_keys=True))
        return 0
    print(f"{'USER':<24} {'ROLE':<9} {'CREATED':<20} {'REVOKED':<20} SCOPE")
    for u in users:
        print(f"{u['name']:<24} {u['role']:<9} {_when(u['created_at']):<20} "
              f"{_when(u['revoked_at']):<20} {', '.join(u['scope']) or '*'}")
    return 0


def cmd_user_revoke(args: argparse.Namespace) -> int:
    _api(args).call("DELETE", f"/v1/users/{_quoted(args.name)}")
    print(f"revoked {args.name}: their token is refused from now on")
    return 0


def _quoted(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def cmd_whoami(args: argparse.Namespace) -> int:
    api = _api(args)
    me = api.call("GET", "/v1/whoami")
    if args.json:
        print(json.dumps(me, indent=2, sort_keys=True))
    else:
        print(f"{me['name']} ({me['role']}; scope: {', '.join(me['scope']) or 'every device'}) "
              f"at {api.url}")
    return 0


# ---------------------------------------------------------------------------- login


def _ask(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_login(args: argparse.Namespace) -> int:
    from .login import (
        Context,
        LoginError,
        ca_context,
        fetch_fingerprint,
        format_fingerprint,
        load_file,
        parse_fingerprint,
        parse_url,
        save_file,
    )

    scheme, host, port = parse_url(args.url)
    if not args.token or any(c.isspace() for c in args.token):
        raise LoginError("--token: give the operator token (dpanel user add prints it)")
    if args.ca_file and args.fingerprint:
        raise LoginError("--ca-file and --fingerprint: give one")
    ca = fingerprint = None
    if scheme == "https":
        if args.ca_file:
            try:
                with open(args.ca_file) as f:
                    ca = f.read()
            except OSError as exc:
                raise LoginError(f"--ca-file {args.ca_file}: {exc.strerror}") from None
            ca_context(ca, f"--ca-file {args.ca_file}")
        elif args.fingerprint:
            fingerprint = parse_fingerprint(args.fingerprint)
        else:
            seen = fetch_fingerprint(host, port)
            shown = format_fingerprint(seen)
            if not (sys.stdin and sys.stdin.isatty()):
                raise LoginError(
                    f"{args.url} presents a certificate with fingerprint {shown}; with no "
                    "terminal to confirm it, pass --ca-file FILE (the manager's CA) or "
                    f"--fingerprint {seen} after checking it out of band")
            print(f"The server at {args.url} presents a certificate with SHA-256 "
                  f"fingerprint\n  {shown}\nCheck it against the server's (e.g. `openssl "
                  "x509 -noout -fingerprint -sha256 -in server.crt`).", file=sys.stderr)
            if not _ask("Trust it and log in? [y/N] "):
                print("dpanel: not logged in; nothing was written", file=sys.stderr)
                return 1
            fingerprint = seen
    name = getattr(args, "context", None) or host
    ctx = Context(name, f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}",
                  args.token, ca, fingerprint)
    me = ApiClient(context=ctx, timeout=30).call("GET", "/v1/whoami")  # nothing saved yet
    data = load_file()
    contexts = dict(data.get("contexts", {}))
    entry = {"server": ctx.server, "token": ctx.token, "user": str(me.get("name", ""))}
    if ca is not None:
        entry["ca"] = ca
    if fingerprint is not None:
        entry["fingerprint"] = fingerprint
    contexts[name] = entry
    data["contexts"] = contexts
    data["current-context"] = name
    path = save_file(data)
    print(f"logged in to {ctx.server} as {me['name']} ({me['role']}); context {name} "
          f"is current ({path})")
    return 0


def cmd_context_list(args: argparse.Namespace) -> int:
    from .login import load_file

    data = load_file()
    current = data.get("current-context")
    print(f"  {'CONTEXT':<24} {'USER':<16} SERVER")
    for name, c in sorted(data.get("contexts", {}).items()):
        mark = "*" if name == current else " "
        print(f"{mark} {name:<24} {c.get('user', '') or '-':<16} {c.get('server', '')}")
    return 0


def cmd_context_use(args: argparse.Namespace) -> int:
    from .login import LoginError, config_path, load_file, save_file

    data = load_file()
    if args.name not in data.get("contexts", {}):
        raise LoginError(f"context {args.name!r} is not in {config_path()} (dpanel context "
                         "list)")
    data["current-context"] = args.name
    save_file(data)
    print(f"context {args.name} is current")
    return 0


# ---------------------------------------------------------------------------- completion


#: commands whose positional argument is a device name
_DEVICE_COMMANDS = ("exec", "ssh", "proxy", "device show", "device revoke", "device delete",
                    "device reset-hostkey", "tunnel open", "tunnel close")


def _walk(parser: argparse.ArgumentParser, path: str,
          subs: dict[str, list[str]], flags: dict[str, list[str]]) -> None:
    flags[path] = sorted({o for a in parser._actions for o in a.option_strings
                          if a.help is not argparse.SUPPRESS or o == "--config"})
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subs[path] = sorted(action.choices)
            for name, child in action.choices.items():
                _walk(child, f"{path} {name}".strip(), subs, flags)


def completion_script(shell: str) -> str:
    from .cli import _parser

    subs: dict[str, list[str]] = {}
    flags: dict[str, list[str]] = {}
    _walk(_parser(), "", subs, flags)

    def table(name: str, d: dict[str, list[str]]) -> str:
        rows = " ".join(f"[{json.dumps('_' + (' ' + k if k else ''))}]={json.dumps(' '.join(v))}"
                        for k, v in sorted(d.items()))
        return f"typeset -A {name}\n{name}=({rows})"

    devices = "|" + "|".join(f"_ {c}" for c in _DEVICE_COMMANDS) + "|"
    body = f"""\
# dpanel {shell} completion: eval "$(dpanel completion {shell})"
{table("_dpanel_subs", subs)}
{table("_dpanel_flags", flags)}
_dpanel_device_cmds={json.dumps(devices)}

_dpanel_context() {{
    # the context the command being completed would use, resolved as the CLI does
    # (--context, --config, $DPANEL_CONTEXT, $DPANEL_CONFIG, the login file's
    # current-context, server.toml), read without starting Python
    local i w conf
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case $w in
            --context) echo "ctx:${{COMP_WORDS[i+1]}}"; return ;;
            --context=*) echo "ctx:${{w#*=}}"; return ;;
            --config) echo "cfg:${{COMP_WORDS[i+1]}}"; return ;;
            --config=*) echo "cfg:${{w#*=}}"; return ;;
        esac
    done
    [[ -n $DPANEL_CONTEXT ]] && {{ echo "ctx:$DPANEL_CONTEXT"; return; }}
    [[ -n $DPANEL_CONFIG ]] && {{ echo "cfg:$DPANEL_CONFIG"; return; }}
    conf="${{XDG_CONFIG_HOME:-$HOME/.config}}/dpanel/config.toml"
    w=$(sed -n 's/^current-context *= *["'"'"']\\(.*\\)["'"'"'] *$/\\1/p' "$conf" 2>/dev/null)
    [[ -n $w ]] && {{ echo "ctx:$w"; return; }}
    echo "server"
}}

_dpanel_devices() {{
    # device names, cached for a minute per resolved context (only ever run while
    # completing): after `dpanel context use` the other context's names never show
    local key cache
    key=$(_dpanel_context)
    cache="${{XDG_CACHE_HOME:-$HOME/.cache}}/dpanel/devices-${{key//[^A-Za-z0-9._-]/_}}"
    if [[ ! -s $cache || -n $(find "$cache" -mmin +1 2>/dev/null) ]]; then
        mkdir -p "${{cache%/*}}" 2>/dev/null
        local -a pass=()
        case $key in
            ctx:*) pass=(--context "${{key#ctx:}}") ;;
            cfg:*) pass=(--config "${{key#cfg:}}") ;;
        esac
        if dpanel "${{pass[@]}}" device list --names >"$cache.$$" 2>/dev/null; then
            mv -f "$cache.$$" "$cache"
        else
            rm -f "$cache.$$"
        fi
    fi
    cat "$cache" 2>/dev/null
}}

_dpanel() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="_" w i
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ $w == -* ]] && continue
        [[ " ${{_dpanel_subs[$path]}} " == *" $w "* ]] && path="$path $w"
    done
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${{_dpanel_flags[$path]}}" -- "$cur"))
    elif [[ -n ${{_dpanel_subs[$path]}} ]]; then
        COMPREPLY=($(compgen -W "${{_dpanel_subs[$path]}}" -- "$cur"))
    elif [[ $_dpanel_device_cmds == *"|$path|"* ]]; then
        COMPREPLY=($(compgen -W "$(_dpanel_devices)" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _dpanel dpanel
"""
    if shell == "zsh":
        # zsh runs the bash function through bashcompinit (COMP_WORDS, compgen, complete)
        return ("#compdef dpanel\nautoload -U +X bashcompinit && bashcompinit\n"
                "setopt localoptions ksharrays 2>/dev/null\n" + body)
    return body


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(args.shell))
    return 0


# ---------------------------------------------------------------------------- parser


def add_commands(sub: Any, add: Adder) -> None:
    """Register these commands on ``dpanel``'s subparsers (``add`` is cli.py's helper)."""
    from .authz import ROLES

    users = sub.add_parser("user", help="operator accounts: add, list, revoke (admin)"
                           ).add_subparsers(dest="sub", required=True)
    a = add(users, "add", cmd_user_add, "add an operator and print their token (once)")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=ROLES)
    a.add_argument("--scope", action="append", default=[], metavar="KEY=VALUE",
                   help="devices with this label (repeatable: any of them); none: every "
                   "device")
    a.add_argument("--print-token", action="store_true", help="print only the token")
    add(users, "list", cmd_user_list, "list operators").add_argument("--json",
                                                                    action="store_true")
    add(users, "revoke", cmd_user_revoke, "revoke an operator: their token fails at once"
        ).add_argument("name")
    add(sub, "whoami", cmd_whoami, "who the API takes this CLI for").add_argument(
        "--json", action="store_true")

    a = add(sub, "login", cmd_login, "log in to a manager: store its URL, an operator "
            "token and the pinned certificate in ~/.config/dpanel/config.toml")
    a.add_argument("url", help="https://HOST[:PORT]")
    a.add_argument("--token", required=True, help="the operator token (dpo1....)")
    a.add_argument("--ca-file", metavar="FILE", help="pin this CA certificate (PEM), e.g. "
                   "the stack's DIR/ca.pem")
    a.add_argument("--fingerprint", metavar="SHA256", help="pin the server certificate by "
                   "its SHA-256 fingerprint (for scripts: no question asked)")

    ctx = sub.add_parser("context", help="the managers logged in to (kubectl-style)"
                         ).add_subparsers(dest="sub", required=True)
    add(ctx, "list", cmd_context_list, "list contexts (* = current)")
    add(ctx, "use", cmd_context_use, "make a context current").add_argument("name")

    add(sub, "completion", cmd_completion, "print a shell completion script: eval \"$(dpanel "
        "completion bash)\"").add_argument("shell", choices=("bash", "zsh"))
