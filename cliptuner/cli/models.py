"""The ``cliptuner models`` command: list, publish, promote, roll back and prune the versions of a registry.

The registry's on-disk rules are in :mod:`cliptuner.model.registry`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cliptuner.model.gate import gate_status
from cliptuner.model.manifest import ModelManifest

MODELS_EPILOG = """\
examples:
  cliptuner models list --workspace ./ws            every version: CURRENT, parent, before -> after R@5
  cliptuner models list --workspace ./ws --json     the same as JSON (one object per version)
  cliptuner models publish out/model --workspace ./ws   a model from cliptuner train --out becomes CURRENT
                                                    (a candidate, listed but not served, when its gate refused it)
  cliptuner models promote v3 --workspace ./ws      serve v3 (its manifest and files are checked first)
  cliptuner models rollback --workspace ./ws        serve the version CURRENT was tuned from
  cliptuner models prune --keep 5 --workspace ./ws  delete all but the 5 newest versions (never CURRENT)

A running service follows CURRENT by itself: the encoder from its next request, the indexer re-embeds its
collection with the new version in the background (searches use the old one until the swap).
rollback: CURRENT's parent_version while it is still published, else the version before CURRENT in natural
order (v9 before v10).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cliptuner models`` and its actions (list, publish, promote, rollback, prune)."""
    p = subparsers.add_parser(
        "models",
        help="list, promote, roll back and prune model versions of a registry",
        description="Operate on the model versions of a registry (<workspace>/models).",
        epilog=MODELS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument(
        "--workspace",
        default=None,
        help="the service's workspace; the registry is its models/ (default: $CLIPTUNER_WORKSPACE)",
    )
    group.add_argument("--models-dir", default=None, help="the registry itself, instead of --workspace")
    actions = p.add_subparsers(dest="models_command", required=True, metavar="{list,publish,promote,rollback,prune}")
    q = actions.add_parser(
        "list",
        parents=[where],
        help="every version: CURRENT, created, parent, arch, the report's before -> after recall",
    )
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q = actions.add_parser(
        "publish",
        parents=[where],
        help="publish an exported model directory (cliptuner train --out, cliptuner export) as "
        "the next version and make it CURRENT; creates the registry if needed",
    )
    q.add_argument("model_dir", help="the model directory (model.json and its ONNX files)")
    q.add_argument("--model-version", dest="version", default=None, help="its name (default: the next of v1, v2, ...)")
    q.add_argument("--no-current", action="store_true", help="publish without making it CURRENT (promote later)")
    q = actions.add_parser("promote", parents=[where], help="make a published version CURRENT")
    q.add_argument("version", help="the version to serve, e.g. v3")
    actions.add_parser(
        "rollback",
        parents=[where],
        help="make the version before CURRENT CURRENT: its parent while "
        "published, else the previous one in natural order",
    )
    q = actions.add_parser("prune", parents=[where], help="delete all but the newest K versions (never CURRENT)")
    q.add_argument("--keep", type=int, required=True, metavar="K", help="how many of the newest versions to keep")
    p.set_defaults(func=run)


def _registry_of(args: argparse.Namespace, create: bool = False) -> Any:
    """The registry ``--models-dir`` or ``--workspace``/models names; it must exist unless ``create`` (publish)."""
    from cliptuner.model.registry import Registry
    from cliptuner.settings import ServiceEnvironment

    workspace = args.workspace or ServiceEnvironment.get("workspace")
    if args.models_dir:
        root = Path(args.models_dir)
    elif workspace:
        root = Path(workspace) / "models"
    else:
        raise ValueError(
            "no registry: pass --workspace DIR (its models/ folder), --models-dir DIR, or set CLIPTUNER_WORKSPACE"
        )
    root = root.expanduser()
    if not root.is_dir() and not create:
        raise ValueError(f"no model registry at {str(root)!r}")
    return Registry(root)


def _percent(metrics: Any, key: str) -> str:
    value = metrics.get(key) if isinstance(metrics, dict) else None
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}"


def format_models_table(summaries: list[dict[str, Any]]) -> str:
    """:meth:`Registry.summaries <cliptuner.model.registry.Registry.summaries>` as a table, one row per version.

    Recall columns read ``before -> after`` in percent; ``*`` marks CURRENT; STATUS is ``current``, ``candidate``
    (the evaluation gate refused it: its reason follows under its row) or ``published``; a version that cannot be
    read shows its error under its row.
    """
    header = (
        "",
        "VERSION",
        "STATUS",
        "CREATED",
        "PARENT",
        "ARCH",
        "EPOCHS",
        "T2I R@5 %",
        "I2T R@5 %",
        "MEAN RECALL %",
    )
    rows, notes = [], {}
    for entry in summaries:
        report = entry.get("report") or {}
        recall = [
            "-" if not report else f"{_percent(report.get('before'), k)} -> {_percent(report.get('after'), k)}"
            for k in ("t2i_r5", "i2t_r5", "mean_recall")
        ]
        created = entry.get("created_at") or "-"
        rows.append(
            (
                "*" if entry.get("current") else "",
                entry["version"],
                entry.get("status") or "-",
                created[:19].replace("T", " "),
                entry.get("parent_version") or "-",
                entry.get("arch") or "?",
                str(report.get("epochs")) if report.get("epochs") is not None else "-",
                *recall,
            )
        )
        gate = report.get("gate") or {}
        if entry.get("error"):
            notes[len(rows) - 1] = f"    error: {entry['error']}"
        elif entry.get("status") == "candidate" and gate.get("reason"):
            notes[len(rows) - 1] = f"    gate: {gate['reason']}"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if i in notes:
            lines.append(notes[i])
    if not rows:
        lines.append("(no versions)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Any:
    """``cliptuner models list|publish|promote|rollback|prune``: operate on the model versions of a registry."""
    registry = _registry_of(args, create=args.models_command == "publish")
    if args.models_command == "publish":
        gate = gate_status(ModelManifest.read(Path(args.model_dir)).report)
        refused = gate is not None and not gate["promoted"]
        version = registry.publish(args.model_dir, args.version, make_current=not (args.no_current or refused))
        if refused:
            print(
                f"published {version} as a candidate ({gate['reason']}); CURRENT is still {registry.current()}. "
                f"Serve it anyway: cliptuner models promote {version}"
            )
        else:
            print(f"published {version}" + ("" if args.no_current else f"; CURRENT is now {version}"))
        return version
    if args.models_command == "list":
        summaries = registry.summaries()
        print(json.dumps(summaries, indent=2) if args.json else format_models_table(summaries))
        return summaries
    if args.models_command == "promote":
        change = registry.promote(args.version)
        print(f"CURRENT is now {change.version}" + (f" (was {change.previous})" if change.changed else " (unchanged)"))
        gate = gate_status(registry.manifest(change.version).report)
        if gate is not None and not gate["promoted"]:
            print(f"note: the evaluation gate had refused it ({gate['reason']})")
        return change
    if args.models_command == "rollback":
        change = registry.rollback()
        print(f"rolled back: CURRENT is now {change.version} (was {change.previous})")
        return change
    deleted = registry.prune(args.keep)
    print(
        f"deleted {', '.join(deleted)}; kept {', '.join(registry.versions())}"
        if deleted
        else f"nothing to delete; kept {', '.join(registry.versions())}"
    )
    return deleted
