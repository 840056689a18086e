"""The plain script a scientist would write for one XRD-CT slice: the peer of
``xrdct process`` in ``benchmarks/bench_e2e.py``.

Per frame pyFAI ``AzimuthalIntegrator.sigma_clip_ng`` (no split, CSR, cython; the same
settings as the pipeline spec: unit, bins, threshold, iterations, Poisson error model,
polarisation 0.99, solid angle, the detector mask plus the scan's mask file, monitor
normalisation), then a sinogram per radial bin with the outer ``air_columns`` translation
columns subtracted as air, a centre of rotation picked by scanning candidate centres and
keeping the sharpest total-intensity reconstruction, skimage ``iradon`` per radial bin,
and scipy ``nnls`` per voxel against the phase patterns plus a constant and a linear
background column.

The phase patterns are computed with the project's own ``tasks.rietveld.load_phase`` +
``reference_patterns`` on the integration grid, with the spec's profile: the same
patterns the pipeline fits (a scientist would take them from their Rietveld program).

Run::

    python benchmarks/plain_script.py SCAN.nxs SCAN.poni SPEC.yaml OUT.npz

Writes ``OUT.npz`` with ``scale`` (phase, y, x), ``phase``, ``center_px`` and the stage
seconds; prints one line of stage times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    scan, poni, spec_path, out = argv
    t0 = time.perf_counter()
    import fabio
    import h5py
    import hdf5plugin  # noqa: F401 - registers bitshuffle-LZ4
    import pyFAI
    import yaml
    from scipy.optimize import nnls
    from skimage.transform import iradon

    spec = yaml.safe_load(Path(spec_path).read_text())
    ispec, mspec = spec["integration"], spec["mapping"]
    npt, unit = int(ispec["npt"]), ispec.get("unit", "q_nm^-1")
    thres = float(ispec.get("sigma_clip_threshold", 4.0))
    max_iter = int(ispec.get("sigma_clip_max_iter", 5))
    air = int(spec.get("sinogram", {}).get("air_columns", 2))

    ai = pyFAI.load(poni)
    mask = ai.detector.mask
    mfile = Path(scan).with_name(Path(scan).stem + "_mask.edf")
    if mfile.exists():
        m2 = fabio.open(str(mfile)).data.astype(bool)
        mask = m2 if mask is None else (mask.astype(bool) | m2)
    times = {"setup": time.perf_counter() - t0}

    # ---- integrate frame by frame
    t = time.perf_counter()
    with h5py.File(scan, "r") as h:
        d = h["entry/data/data"]
        ang = h["entry/data/rotation_angle"][()]
        tr = h["entry/data/translation"][()]
        mon = h["entry/monitor/data"][()] if "entry/monitor/data" in h else np.ones(len(ang))
        n = d.shape[0]
        dummy, delta = ai.detector.get_dummies(d.dtype)
        I = None
        step = 64
        for s in range(0, n, step):
            block = d[s:s + step]
            for k in range(block.shape[0]):
                r = ai.sigma_clip_ng(block[k], npt, unit=unit, mask=mask, dummy=dummy,
                                     delta_dummy=delta, polarization_factor=0.99,
                                     correctSolidAngle=True, error_model="poisson",
                                     method=("no", "csr", "cython"), thres=thres,
                                     max_iter=max_iter, normalization_factor=float(mon[s + k]))
                if I is None:
                    I = np.empty((n, npt))
                    radial = r.radial
                I[s + k] = r.intensity
    times["integrate"] = time.perf_counter() - t

    # ---- sinograms (angle, translation, bin), air removed
    t = time.perf_counter()
    angles = np.unique(np.round(ang, 6))
    trans = np.unique(np.round(tr, 6))
    ia = np.searchsorted(angles, np.round(ang, 6))
    it = np.searchsorted(trans, np.round(tr, 6))
    sino = np.zeros((len(angles), len(trans), npt))
    sino[ia, it] = I
    if air:
        a = np.concatenate([sino[:, :air], sino[:, -air:]], axis=1).mean(axis=1, keepdims=True)
        sino = sino - a
    # centre of rotation: sharpest FBP of the total-intensity sinogram over candidates
    tot = sino.sum(axis=2)  # (angle, translation)
    nt = len(trans)
    best = (-np.inf, 0.0)
    from scipy.ndimage import shift as nd_shift

    for c in np.arange(-4.0, 4.01, 0.25):
        rec = iradon(nd_shift(tot, (0, -c), order=1, mode="nearest").T, theta=angles,
                     filter_name="ramp", circle=True)
        score = -np.sum(np.abs(rec[rec < 0]))  # fewest negative artefacts
        if score > best[0]:
            best = (score, c)
    cshift = best[1]
    sino = nd_shift(sino, (0, -cshift, 0), order=1, mode="nearest")
    times["sinogram+cor"] = time.perf_counter() - t

    # ---- FBP, one radial bin at a time
    t = time.perf_counter()
    vol = np.empty((nt, nt, npt))
    for b in range(npt):
        vol[:, :, b] = iradon(sino[:, :, b].T, theta=angles, filter_name="ramp", circle=True)
    times["fbp"] = time.perf_counter() - t

    # ---- per-voxel NNLS against the phase patterns
    t = time.perf_counter()
    from pipelines.spec import ProfileSpec
    from tasks.rietveld import load_phase, reference_patterns

    base = Path(spec_path).parent
    phases = []
    for p in mspec["phases"]:
        cif = Path(p["cif"])
        cif = cif if cif.is_absolute() else base / cif
        phases.append(load_phase(p["name"], cif))
    prof = ProfileSpec(**mspec.get("profile", {}))
    refs = np.asarray(reference_patterns(phases, radial, unit, ai.wavelength, prof))
    x = (radial - radial.min()) / np.ptp(radial)
    A = np.column_stack([refs.T, np.ones_like(x), x])
    scale = np.zeros((len(phases), nt, nt))
    for i in range(nt):
        for j in range(nt):
            coef, _ = nnls(A, vol[i, j])
            scale[:, i, j] = coef[:len(phases)]
    times["nnls"] = time.perf_counter() - t
    np.savez(out, scale=scale, phase=np.array([p.name for p in phases]), center_shift_px=cshift,
             **{f"t_{k}": v for k, v in times.items()})
    print(" ".join(f"{k} {v:.2f} s" for k, v in times.items()), f"(centre shift {cshift:+.2f} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
