"""What ``/status`` shows to whom: the full state for ``admin``, a view without server paths or pids for others.

The gateway's guard sets the request parameter ``detail`` (``true`` only for an admin key, or for every caller of a
service without keys); an Executor asked without it (directly, not through the gateway) gives the view.
:func:`status_view` turns a status dict into that view: ``pid`` is left out, a path under the workspace becomes
relative to it, any other absolute path becomes ``"<server path>"``, and the workspace's path inside longer text
(an error message) becomes ``<workspace>``. Torch-free and jina-free.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

HIDDEN_KEYS = ("pid", "pids")
SERVER_PATH = "<server path>"
_ABSOLUTE = re.compile(r"^(/|[A-Za-z]:\\)")


def wants_detail(parameters: Optional[dict]) -> bool:
    """Whether a ``/status`` request asked for (and was allowed) the full state."""
    return bool(parameters) and parameters.get("detail") is True


def status_view(state: Any, workspace: Optional[Path]) -> Any:
    """``state`` without pids and server paths (see the module's docstring); a new object, ``state`` unchanged."""
    root = str(Path(workspace).resolve()) if workspace is not None else None
    return _view(state, root)


def _view(value: Any, root: Optional[str]) -> Any:
    if isinstance(value, dict):
        return {k: _view(v, root) for k, v in value.items() if k not in HIDDEN_KEYS}
    if isinstance(value, (list, tuple)):
        return [_view(v, root) for v in value]
    if not isinstance(value, str):
        return value
    if root and (value == root or value.startswith(root + "/")):
        return value[len(root) + 1 :] or "."
    if _ABSOLUTE.match(value) and " " not in value:
        return SERVER_PATH
    return value.replace(root, "<workspace>") if root else value
