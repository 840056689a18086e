"""Confinement of the paths that flow parameters name to the facility's data roots.

The Prefect UI (and its API) lets anyone who can start a flow run type any path into the
``scan``, ``poni``, ``pipeline``, ``out`` or ``root`` parameters, and the worker runs with the
facility's file-system rights. ``XRDCT_DATA_ROOTS`` (directories separated by
``os.pathsep``, set in the workers' environment: ``infra/compose.yaml``) confines every such
path: it is resolved with its symlinks followed and must lie inside one root. A ``..``
component is rejected outright, and a symlink inside a root that points outside resolves
outside and is rejected. Unset (the local CLI and ``xrdct demo``): no confinement.

The shipped pipeline specs and phases (``pipelines/``) are always readable.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "XRDCT_DATA_ROOTS"


class PathNotAllowedError(ValueError):
    """A path from a flow parameter outside the configured data roots; the message names the
    parameter, the path (and what it resolves to) and the roots."""


def data_roots() -> list[Path] | None:
    """The configured data roots, resolved; None when ``XRDCT_DATA_ROOTS`` is unset or empty."""
    raw = os.environ.get(ENV, "")
    roots = [Path(r).expanduser().resolve() for r in raw.split(os.pathsep) if r.strip()]
    return roots or None


def confine(path: str | os.PathLike, param: str, *, extra_roots=(), strict: bool = False) -> Path:
    """Resolve ``path`` (symlinks followed) and check it lies inside a data root.

    Parameters
    ----------
    path : str or path-like
        What the parameter says.
    param : str
        Parameter name for the message (``scan``, ``poni``, ``pipeline``, ``out``, ``root``,
        ``calibration.mask``, ...).
    extra_roots : sequence of Path
        Further allowed directories (the shipped ``pipelines/``).
    strict : bool
        Require the path to exist (``Path.resolve(strict=True)``).

    Returns
    -------
    Path
        The resolved path (use it from here on, not the original: a symlink swapped after
        this check cannot redirect it). Without data roots: the path resolved, unchecked.

    Raises
    ------
    PathNotAllowedError
        A ``..`` component, or a resolved path outside every root.
    FileNotFoundError
        ``strict`` and the path does not exist.
    """
    raw = Path(path).expanduser()
    roots = data_roots()
    if roots is None:
        return raw.resolve(strict=strict)
    allowed = roots + [Path(r).resolve() for r in extra_roots]
    shown = os.pathsep.join(str(r) for r in roots)
    if ".." in raw.parts:
        raise PathNotAllowedError(f"{param}: path {str(path)!r} contains '..'; paths from flow "
                                  f"parameters must name a place inside the data roots {shown} "
                                  f"({ENV}) without '..'")
    try:
        resolved = raw.resolve(strict=strict)
    except FileNotFoundError:
        raise FileNotFoundError(f"{param}: {path}: not found") from None
    if not any(resolved == r or resolved.is_relative_to(r) for r in allowed):
        via = f" (resolves to {str(resolved)!r} through a symlink)" if str(resolved) != str(raw.absolute()) else ""
        raise PathNotAllowedError(f"{param}: path {str(path)!r}{via} is outside the data roots "
                                  f"{shown} ({ENV}); expected a path inside one of them")
    return resolved


def confine_pipeline(pipeline):
    """The ``pipeline`` parameter confined: a shipped spec name passes (as the shipped file),
    a YAML path must lie in a data root (or be a shipped spec); None and spec objects pass."""
    from pipelines.spec import PIPELINES_DIR  # noqa: PLC0415

    if pipeline is None or data_roots() is None or not isinstance(pipeline, (str, os.PathLike)):
        return pipeline
    s = str(pipeline)
    shipped = PIPELINES_DIR / f"{s}.yaml"
    if "/" not in s and os.sep not in s and not Path(s).exists() and shipped.is_file():
        return shipped
    return confine(s, "pipeline", extra_roots=[PIPELINES_DIR])


def confine_table_files(table: Path) -> None:
    """Check, before any is opened, that every image a scan table lists (column ``file``,
    relative to the table's folder or absolute) lies inside the data roots."""
    if data_roots() is None:
        return
    from tasks.ingest import _read_table  # noqa: PLC0415

    header, rows = _read_table(Path(table))
    if "file" not in header:
        return  # open_scan says what is wrong with the table
    col = header.index("file")
    for line, row in enumerate(rows, start=2):
        if len(row) > col:
            f = Path(row[col])
            confine(f if f.is_absolute() else Path(table).parent / f,
                    f"scan table {table}: line {line}: column 'file'")
