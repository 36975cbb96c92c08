"""The ``cliptuner audit`` command: print the service's audit log (``<workspace>/audit/``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

AUDIT_EPILOG = """\
examples:
  cliptuner audit tail --workspace ./ws            the last 20 changes and refusals, one JSON object a line
  cliptuner audit tail -n 100 --follow             then print new lines as they come (Ctrl-C to stop)

Every /index, /delete, /train, /train/cancel and /models* request (with its result) and every refused call is
one line: time, key id and name, endpoint, docs, parameters without content, result or error.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner audit tail``."""
    p = subparsers.add_parser(
        "audit",
        help="print the audit log: who changed what, and every refused call",
        description="Read the audit log of a service's workspace.",
        epilog=AUDIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="audit_command", required=True, metavar="{tail}")
    q = actions.add_parser("tail", help="the last lines of the audit log")
    q.add_argument("--workspace", default=None, help="the service's workspace (default: $CLIPTUNER_WORKSPACE)")
    q.add_argument("-n", "--lines", type=int, default=20, help="how many lines (default 20)")
    q.add_argument("--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """``cliptuner audit tail``."""
    from cliptuner.serve.audit import tail
    from cliptuner.settings import ServiceEnvironment

    workspace = Path(args.workspace) if args.workspace else ServiceEnvironment.get("workspace")
    if workspace is None:
        raise ValueError("no workspace: pass --workspace DIR or set CLIPTUNER_WORKSPACE")
    if args.lines < 0:
        raise ValueError(f"--lines must be 0 or more, got {args.lines}")
    folder = Path(workspace) / "audit"
    if not folder.is_dir():
        raise ValueError(f"no audit log under {str(workspace)!r} (the service writes it to <workspace>/audit/)")
    shown = tail(folder, args.lines)
    for entry in shown:
        print(json.dumps(entry, ensure_ascii=False), flush=True)
    if not args.follow:
        return
    seen = len(tail(folder, 10**9))
    try:
        while True:
            time.sleep(1.0)
            entries = tail(folder, 10**9)
            if len(entries) < seen:  # rotated meanwhile: start from the new file's lines
                seen = 0
            for entry in entries[seen:]:
                print(json.dumps(entry, ensure_ascii=False), flush=True)
            seen = len(entries)
    except KeyboardInterrupt:
        return
