"""The ``cliptuner keys`` command: make, list and revoke the service's API keys (:mod:`cliptuner.serve.keys`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from cliptuner.serve.keys import ROLES

KEYS_EPILOG = """\
examples:
  cliptuner keys create --role admin --name ci --keys-file keys.json   prints the key once; the file keeps its hash
  cliptuner keys create --role search --rate 50/s --keys-file keys.json
  cliptuner keys list --keys-file keys.json --workspace ./ws   ids, names, roles, created, last used (never a key)
  cliptuner keys revoke 3f0c9a1b2d4e --keys-file keys.json     refused from the service's next request on

roles: search (/encode, /search, /status without server paths) < write (+ /index, /delete, /feedback)
< admin (+ /train, /train/cancel, /models*, the full /status). A running service reads the file again when it
changes. Call it with the header 'authorization: Bearer <key>' (docs/security.md).
"""


def _keys_file(value: Optional[str]) -> Path:
    from cliptuner.settings import ServiceEnvironment

    path = Path(value) if value else ServiceEnvironment.get("keys_file")
    if path is None:
        raise ValueError("no keys file: pass --keys-file FILE or set CLIPTUNER_KEYS_FILE")
    return Path(path)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner keys`` and its actions (create, list, revoke)."""
    p = subparsers.add_parser(
        "keys",
        help="make, list and revoke API keys (roles search, write, admin)",
        description="Manage the API keys of a service (its --keys-file).",
        epilog=KEYS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--keys-file", default=None, help="the keys file (default: $CLIPTUNER_KEYS_FILE)")
    actions = p.add_subparsers(dest="keys_command", required=True, metavar="{create,list,revoke}")
    q = actions.add_parser("create", parents=[where], help="make a key and print it (once)")
    q.add_argument("--role", required=True, choices=ROLES, help="what the key may call")
    q.add_argument("--name", default=None, help="who holds it, e.g. ci or search-page (default: role-id)")
    q.add_argument("--rate", default=None, help="a rate limit, calls per s, m or h: 50/s, 600/m (default: none)")
    q = actions.add_parser("list", parents=[where], help="ids, names, roles, created, last used: never a key")
    q.add_argument("--workspace", default=None, help="the service's workspace, for 'last used' (its audit/)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q = actions.add_parser("revoke", parents=[where], help="revoke a key by its id")
    q.add_argument("key_id", help="the key's id (cliptuner keys list)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """``cliptuner keys create|list|revoke``."""
    from cliptuner.serve.audit import read_usage
    from cliptuner.serve.keys import create_key, describe, read_keys_file, revoke_key
    from cliptuner.settings import ServiceEnvironment

    path = _keys_file(args.keys_file)
    if args.keys_command == "create":
        key, record = create_key(path, args.role, name=args.name, rate=args.rate)
        print(key)
        print(
            f"key {record.id} ({record.name}, role {record.role}) added to {path}; this is the only time the key "
            "is shown: store it now",
            file=sys.stderr,
        )
    elif args.keys_command == "revoke":
        try:
            record = revoke_key(path, args.key_id)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        print(f"key {record.id} ({record.name}) revoked at {record.revoked}")
    else:
        workspace = Path(args.workspace) if args.workspace else ServiceEnvironment.get("workspace")
        used = read_usage(Path(workspace) / "audit") if workspace is not None else {}
        rows = describe(read_keys_file(path), used)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        columns = ("id", "name", "role", "rate", "created", "last_used", "revoked")
        widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
        print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
        for row in rows:
            print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
