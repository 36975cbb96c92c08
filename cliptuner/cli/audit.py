"""The ``cliptuner audit`` command: print the service's audit log (``<workspace>/audit/``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

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
    from cliptuner.serve.audit import LOG_NAME, tail
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
    follow(folder / LOG_NAME)


def follow(path: Path, every: float = 1.0, rounds: Optional[int] = None) -> None:
    """Print the lines appended to ``path`` from now on (``rounds`` looks, default: until Ctrl-C); after a
    rotation, the new file's lines from its start."""

    def identity() -> tuple[int, int]:
        try:
            st = path.stat()
            return st.st_ino, st.st_size
        except FileNotFoundError:
            return -1, 0

    inode, offset = identity()
    done = 0
    try:
        while rounds is None or done < rounds:
            done += 1
            time.sleep(every)
            now, size = identity()
            if now != inode or size < offset:  # rotated: the lines written since are in the new file
                inode, offset = now, 0
            if size == offset:
                continue
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read(size - offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next look
            offset += len(complete)
            for text in complete.decode("utf-8", errors="replace").splitlines():
                if text.strip():
                    print(text, flush=True)
    except KeyboardInterrupt:
        return
