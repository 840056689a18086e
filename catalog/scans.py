"""Registering raw scans in the catalog: one file, or every scan in a directory."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

#: Files never tried as scans when a directory is walked (the catalog itself, its WAL files).
_SKIP_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm")


def describe_scan(path: str | Path) -> tuple[str, str, dict, dict]:
    """Open a scan and return what the catalog records about it.

    The checksum is the one :func:`flows.process._register` records for a processed
    scan, so registering a scan and later processing it give one scan row: the file's
    SHA-256, or for a scan table the SHA-256 of the JSON of the table's and its images'
    checksums.

    Parameters
    ----------
    path : str or Path
        NeXus/HDF5 frames, HDF5 sinogram cube, or scan table (CSV/TSV).

    Returns
    -------
    (str, str, dict, dict)
        Checksum, kind (``"frames"``, ``"map"``, ``"sinogram"``), geometry (source, frame
        count, detector shape and dtype, grid sizes (z, angle, translation); or the
        sinogram shape), metadata (proposal, sample, start time, title where the file has
        them: :func:`tasks.ingest.nexus_metadata`).

    Raises
    ------
    tasks.ingest.IngestError
        The file does not open as a scan (the message says why).
    """
    from tasks.ingest import file_checksum, open_scan

    p = Path(path).expanduser().resolve()
    scan = open_scan(p)
    geometry: dict = {"kind": scan.kind, "source": str(p)}
    if scan.frames is not None:
        g = scan.grid()
        geometry.update(n_frames=int(scan.frames.shape[0]),
                        frame_shape=[int(s) for s in scan.frames.shape[1:]],
                        frame_dtype=str(scan.frames.dtype),
                        grid=[len(g.z), len(g.angle), len(g.translation)])
    elif scan.sinogram is not None:
        geometry.update(sinogram_shape=[int(s) for s in scan.sinogram.shape])
    inputs = {p.name: file_checksum(p)}
    for f in scan.files:
        f = Path(f).resolve()
        if f != p:
            inputs[os.path.relpath(f, p.parent)] = file_checksum(f)
    checksum = (next(iter(inputs.values())) if len(inputs) == 1 else
                hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest())
    return checksum, scan.kind, geometry, dict(scan.metadata)


@dataclass
class AddReport:
    """Outcome of :func:`add_scans`.

    Attributes
    ----------
    added : list of (int, str)
        Scan row id and path of each newly registered scan.
    known : list of (int, str)
        Scans already in the catalog (same checksum).
    skipped : list of (str, str)
        Path and reason of each file that did not open as a scan.
    """

    added: list = field(default_factory=list)
    known: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


def _candidates(path: Path, recursive: bool) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = path.rglob("*") if recursive else path.iterdir()
    return sorted(f for f in files if f.is_file() and not f.name.startswith(".")
                  and not f.name.endswith(_SKIP_SUFFIXES)
                  and not any(part.startswith(".") for part in f.relative_to(path).parts))


def add_scans(catalog, paths, recursive: bool = False, proposal: str | None = None,
              sample: str | None = None) -> AddReport:
    """Register scans: files, or every file of a directory that opens as a scan.

    Parameters
    ----------
    catalog : catalog.db.Catalog
    paths : str, Path or list of them
        Scan files or directories.
    recursive : bool
        Walk sub-directories too.
    proposal, sample : str, optional
        File the scans under this proposal / sample; replaces what the files say (for
        formats without that metadata, such as image series).

    Returns
    -------
    AddReport
        Files that do not open as scans are skipped and reported with the reason, never
        raised.

    Raises
    ------
    FileNotFoundError
        A path does not exist.
    """
    from tasks.ingest import IngestError

    if isinstance(paths, (str, Path)):
        paths = [paths]
    report = AddReport()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        for f in _candidates(path, recursive):
            try:
                checksum, kind, geometry, metadata = describe_scan(f)
            except (IngestError, OSError, ValueError) as err:
                why = str(err) or type(err).__name__
                for prefix in (f"{f}: ", f"{f.resolve()}: "):
                    why = why[len(prefix):] if why.startswith(prefix) else why
                report.skipped.append((str(f), why))
                continue
            if proposal:
                metadata["proposal"] = proposal
            if sample:
                metadata["sample"] = sample
            sid, new = catalog.register_scan(path=str(f.resolve()), checksum=checksum, kind=kind,
                                             geometry=geometry, metadata=metadata)
            (report.added if new else report.known).append((sid, str(f.resolve())))
    return report
