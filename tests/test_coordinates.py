"""One coordinate convention from the sample to the product, and sinogram input that is
checked rather than trusted (issue 14, items 1 and 3).

Convention: ``x``, ``y`` in mm in the sample frame, the rotation axis at ``(0, 0)``; a point
at ``(x, y)`` is measured at angle ``theta`` on the translation ``t = x cos(theta) + y
sin(theta)`` (relative to the axis), as in :func:`tasks.reconstruct.radon`, astra's linear
projector, skimage and the simulator. The tests below write sinograms of a disc by hand (the
chord length of a circle, averaged over a one-step-wide beam), run the real pipeline on them
and find the disc's centroid in the product's ``x``, ``y`` coordinates.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from flows.process import run_pipeline
from pipelines.spec import parse_spec
from tasks import store
from tasks.ingest import IngestError, open_scan

STEP = 0.02     # mm per translation step
NT = 48         # translations
R = 0.09        # disc radius, mm


def disc_sinogram(angles_deg, t_mm, x0, y0, r=R, beam=STEP, sub=16):
    """``(angle, translation)`` projections of a uniform disc of radius ``r`` centred at
    ``(x0, y0)`` (mm, sample frame, rotation axis at the origin) on translations ``t_mm``
    measured from the axis: the chord length at ``t - (x0 cos + y0 sin)``, averaged over a
    beam ``beam`` wide (``sub`` sub-rays)."""
    th = np.radians(np.asarray(angles_deg, float))[:, None, None]
    off = (np.arange(sub) + 0.5) / sub - 0.5
    t = np.asarray(t_mm, float)[None, :, None] + beam * off[None, None, :]
    u = t - (x0 * np.cos(th) + y0 * np.sin(th))
    return (2 * np.sqrt(np.clip(r * r - u * u, 0, None))).mean(axis=-1)


def write_sinogram(path, sino, *, angles=None, translation=None, radial=None, radial_name="q",
                   radial_units: str | None = "1/nm", nexus=True, axes=("angle", "translation", "radial")):
    """A hand-made integrated-sinogram HDF5 file: ``/entry/data/sinogram`` and, beside it,
    the angle / translation / radial datasets given (an NXdata group with ``@axes`` when
    ``nexus``)."""
    with h5py.File(path, "w") as h:
        e = h.create_group("entry")
        g = e.create_group("data")
        if nexus:
            e.attrs["NX_class"] = "NXentry"
            g.attrs["NX_class"] = "NXdata"
            g.attrs["signal"] = "sinogram"
            g.attrs["axes"] = [{"radial": radial_name}.get(a, a) for a in axes]
        g.create_dataset("sinogram", data=np.asarray(sino, np.float32))
        if angles is not None:
            g.create_dataset("angle", data=angles).attrs["units"] = "deg"
        if translation is not None:
            g.create_dataset("translation", data=translation).attrs["units"] = "mm"
        if radial is not None:
            d = g.create_dataset(radial_name, data=radial)
            if radial_units is not None:
                d.attrs["units"] = radial_units
    return Path(path)


def _run(tmp_path, scan, sinogram=None, **input_):
    spec = parse_spec({"schema_version": 1, "name": "coords",
                       "input": {"kind": "sinogram", **input_},
                       "sinogram": {"scale_per_angle": False, "air_columns": 2,
                                    **({"center": sinogram} if sinogram is not None else {})},
                       "reconstruction": {"filter": "ramp"},
                       "mapping": {"enabled": False},
                       "output": {"overview_png": False}})
    return store.open_product(run_pipeline(str(scan), pipeline=spec, out=tmp_path / "out"))


def centroid(img, y, x, frac=0.3):
    """Centroid (x, y) of the pixels above ``frac`` of the maximum, in the coordinates given."""
    w = np.where(img > frac * img.max(), img, 0.0)
    return float((w * x[None, :]).sum() / w.sum()), float((w * y[:, None]).sum() / w.sum())


# (angle range, number of angles, translations descending, axis offset in steps, centre
# given in the spec rather than found)
CASES = [(180, 60, False, 0.0, False), (360, 120, False, 0.0, False), (180, 60, True, 0.0, False),
         (180, 60, False, 3.3, False), (360, 120, True, -2.6, False), (180, 60, True, 3.3, True)]


@pytest.mark.parametrize("arange_, na, descending, axis_px, given", CASES,
                         ids=[f"{a}deg-{'desc' if d else 'asc'}-axis{o:+g}{'-given' if g else ''}"
                              for a, _, d, o, g in CASES])
def test_disc_reconstructs_at_its_position(tmp_path, arange_, na, descending, axis_px, given):
    x0, y0 = 0.13, 0.07
    angles = np.linspace(0, arange_, na, endpoint=False)
    motor = (np.arange(NT) - (NT - 1) / 2) * STEP + 1.5          # translation motor positions, mm
    axis_mm = 1.5 + axis_px * STEP                                 # motor position of the axis
    sino = disc_sinogram(angles, motor - axis_mm, x0, y0)
    if descending:
        motor, sino = motor[::-1], sino[:, ::-1]
    cube = np.stack([sino, 0.5 * sino], axis=-1)                   # two radial bins
    f = write_sinogram(tmp_path / "disc.h5", cube, angles=angles, translation=motor,
                       radial=np.array([10.0, 20.0]))
    # the axis in measured columns (0 = first column as stored)
    col = (NT - 1) / 2 + (-axis_px if descending else axis_px)
    ds = _run(tmp_path, f, sinogram=col if given else None)
    assert abs(float(ds["center_of_rotation"].values[0]) - col) < 0.1
    img = ds["volume"].isel(z=0, radial=0).values
    x, y = ds["x"].values, ds["y"].values
    assert ds["x"].attrs["units"] == "mm" and ds["y"].attrs["units"] == "mm"
    cx, cy = centroid(img, y, x)
    # within a fifth of a pixel of the true position, in product coordinates
    assert abs(cx - x0) < 0.2 * STEP and abs(cy - y0) < 0.2 * STEP, (cx, cy)
    # by label: the product's pixel nearest (x0, y0) is inside the disc, its mirror in y is not
    assert ds["volume"].sel(x=x0, y=y0, method="nearest").isel(z=0, radial=0) > 0.5 * img.max()
    assert ds["volume"].sel(x=x0, y=-y0, method="nearest").isel(z=0, radial=0) < 0.2 * img.max()
    conv = ds.attrs["xrdct"]["coordinate_convention"]
    assert "t = x cos(theta) + y sin(theta)" in conv
    assert ds["y"].attrs["coordinate_convention"] == conv == ds["x"].attrs["coordinate_convention"]
    # the super-resolution grid of these coordinates: same field, same orientation, the
    # coarse pixel centres at the means of their fine sub-pixels
    from flows.process import _fine_coords

    for c in (x, y):
        fc = _fine_coords(c, 2)
        assert np.allclose(fc.reshape(-1, 2).mean(axis=1), c)
        assert np.allclose(np.diff(fc), (c[1] - c[0]) / 2)


def test_simulated_truth_and_product_share_coordinates(tmp_path):
    """An asymmetric phantom (the simulator's shapes) through the pipeline: the product's
    total-intensity image, compared with the truth by coordinate (x and y values, not
    array positions), correlates > 0.95."""
    import xarray as xr

    from tasks.simulate import SimConfig, simulate_sinogram_cube

    cfg = SimConfig(n_translations=32, n_angles=48, counts=5e4, seed=3, cor_offset_px=0.0)
    sim = simulate_sinogram_cube(tmp_path / "sino.h5", cfg, unit="q_nm^-1", npt=16)
    ds = _run(tmp_path, sim.path, sinogram=float((cfg.n_translations - 1) / 2))
    with h5py.File(tmp_path / "sino.h5", "r") as h:
        g = h["/entry/ground_truth"]
        ty, tx = g["y"][()], g["x"][()]
    mass = np.asarray(sim.mass)
    mass = mass[:, 0] if mass.ndim == 4 else mass                # (phase, y, x)
    # noise-free reconstructed intensity summed over bins: K * mass @ patterns per mass
    total = sim.intensity_scale * np.tensordot(sim.patterns_per_mass.sum(axis=1), mass, 1)
    truth = xr.DataArray(total, dims=("y", "x"), coords={"y": ty, "x": tx})
    img = ds["volume"].isel(z=0).sum("radial")
    tol = 0.01 * cfg.translation_step_mm
    a = img.reindex(y=truth["y"], x=truth["x"], method="nearest", tolerance=tol)  # by coordinate
    assert np.isfinite(a.values).all()
    r = np.corrcoef(a.values.ravel(), truth.values.ravel())[0, 1]
    assert r > 0.95, r   # 0.70 on 564e3f7 (y labelled ascending)


# ------------------------------------------------------------------ item 3: input checks


def _disc_cube(n_angle=NT, arange_=180.0):
    angles = np.linspace(0, arange_, n_angle, endpoint=False)
    t = (np.arange(NT) - (NT - 1) / 2) * STEP
    sino = disc_sinogram(angles, t, 0.13, 0.07)
    return angles, t, np.stack([sino, 0.5 * sino], axis=-1)


def test_transposed_sinogram_is_refused(tmp_path):
    """nDTomo's (translation, angle, radial) cube with as many angles as translations,
    read under the default axis order: refused, naming the file, the dataset and the fix."""
    _angles, _t, cube = _disc_cube()
    f = write_sinogram(tmp_path / "tr.h5", cube.transpose(1, 0, 2), nexus=False,
                       radial=np.array([10.0, 20.0]))
    with pytest.raises(IngestError) as e:
        open_scan(f, parse_spec({"schema_version": 1, "input": {"angle_range_deg": 180,
                                                                "radial_unit": "q_nm^-1"}}).input)
    msg = str(e.value)
    assert str(f) in msg and "/entry/data/sinogram" in msg and "input.sinogram_axes" in msg
    assert "translation,angle,radial" in msg
    # the same file with the axis order given is read, and the correct order is not refused
    s = open_scan(f, parse_spec({"schema_version": 1, "input": {
        "angle_range_deg": 180, "sinogram_axes": "translation,angle,radial", "radial_unit": "q_nm^-1"}}).input)
    assert s.sinogram.shape == (NT, NT, 2)
    assert np.allclose(np.asarray(s.sinogram), cube, atol=1e-6)
    # an order given in the spec is trusted (the way past a false alarm)
    s = open_scan(f, parse_spec({"schema_version": 1, "input": {
        "angle_range_deg": 180, "sinogram_axes": "angle,translation,radial", "radial_unit": "q_nm^-1"}}).input)
    assert s.sinogram.shape == (NT, NT, 2)
    g = write_sinogram(tmp_path / "ok.h5", cube, nexus=False, radial=np.array([10.0, 20.0]))
    s = open_scan(g, parse_spec({"schema_version": 1, "input": {"angle_range_deg": 180,
                                                                "radial_unit": "q_nm^-1"}}).input)
    assert np.allclose(np.asarray(s.sinogram), cube, atol=1e-6)


def test_transposed_sinogram_through_the_pipeline_publishes_nothing(tmp_path):
    _angles, _t, cube = _disc_cube()
    f = write_sinogram(tmp_path / "tr.h5", cube.transpose(1, 0, 2), nexus=False,
                       radial=np.array([1.0, 2.0]), radial_units="1/A")
    with pytest.raises(IngestError, match="input.sinogram_axes"):
        _run(tmp_path, f, angle_range_deg=180)
    assert not list((tmp_path / "out").glob("*.zarr"))


@pytest.mark.parametrize("units, name, expected", [
    ("1/nm", "q", "q_nm^-1"), ("nm^-1", "q", "q_nm^-1"), ("1/A", "q", "q_A^-1"),
    ("Å^-1", "q", "q_A^-1"), ("1/angstrom", "q", "q_A^-1"), ("deg", "2th", "2th_deg"),
    ("degrees", "tth", "2th_deg"), (None, "2th_deg", "2th_deg"), (None, "q_A^-1", "q_A^-1")])
def test_radial_unit_read_from_the_file(tmp_path, units, name, expected):
    angles, t, cube = _disc_cube(n_angle=30)
    f = write_sinogram(tmp_path / "u.h5", cube, angles=angles, translation=t,
                       radial=np.array([1.0, 2.0]), radial_name=name, radial_units=units)
    s = open_scan(f, parse_spec({"schema_version": 1}).input)
    assert s.radial_unit == expected
    assert np.allclose(s.radial, [1.0, 2.0])


def test_radial_unit_conflict_and_missing_are_errors(tmp_path):
    angles, t, cube = _disc_cube(n_angle=30)
    f = write_sinogram(tmp_path / "q.h5", cube, angles=angles, translation=t,
                       radial=np.array([1.0, 2.0]), radial_name="q", radial_units=None)
    with pytest.raises(IngestError) as e:
        open_scan(f, parse_spec({"schema_version": 1}).input)
    assert str(f) in str(e.value) and "/entry/data/q" in str(e.value) and "input.radial_unit" in str(e.value)
    # given in the spec, the unit is used
    s = open_scan(f, parse_spec({"schema_version": 1, "input": {"radial_unit": "q_A^-1"}}).input)
    assert s.radial_unit == "q_A^-1"
    g = write_sinogram(tmp_path / "q2.h5", cube, angles=angles, translation=t,
                       radial=np.array([1.0, 2.0]), radial_name="q", radial_units="1/A")
    with pytest.raises(IngestError, match="q_nm\\^-1"):
        open_scan(g, parse_spec({"schema_version": 1, "input": {"radial_unit": "q_nm^-1"}}).input)
    # a unit that is not a radial unit, a unit contradicting the name, d-spacing
    for i, (rn, units, words) in enumerate([("radial", "furlong", "has units 'furlong'"),
                                            ("q", "deg", "named for q but has units 'deg'"),
                                            ("d", "A", "d-spacing")]):
        h = write_sinogram(tmp_path / f"bad{i}.h5", cube, angles=angles, translation=t,
                           radial=np.array([1.0, 2.0]), radial_name=rn, radial_units=units)
        with pytest.raises(IngestError, match=words) as e:
            open_scan(h, parse_spec({"schema_version": 1}).input)
        assert str(h) in str(e.value) and f"/entry/data/{rn}" in str(e.value)


def test_q_input_labelled_q_through_the_pipeline(tmp_path):
    """A q dataset with units 1/A, radial_unit unset: the product's radial axis says q_A^-1
    (on main it said 2th_deg)."""
    angles, t, cube = _disc_cube(n_angle=30)
    f = write_sinogram(tmp_path / "q.h5", cube, angles=angles, translation=t,
                       radial=np.array([1.0, 2.0]), radial_name="q", radial_units="1/A")
    ds = _run(tmp_path, f)
    assert ds["radial"].attrs["unit"] == "q_A^-1"
    assert np.allclose(ds["radial"].values, [1.0, 2.0])


def test_no_translation_dataset_gives_pixel_coordinates(tmp_path):
    angles, _t, cube = _disc_cube(n_angle=30)
    f = write_sinogram(tmp_path / "px.h5", cube, angles=angles, radial=np.array([1.0, 2.0]))
    ds = _run(tmp_path, f)
    for c in ("translation", "translation_c", "x", "y"):
        assert ds[c].attrs["units"] == "px", c
    assert np.allclose(np.diff(ds["translation"].values), 1.0)
    assert np.isclose(abs(ds["x"].values[1] - ds["x"].values[0]), 1.0)
    # the disc is at (0.13, 0.07) mm = (6.5, 3.5) steps from the axis
    cx, cy = centroid(ds["volume"].isel(z=0, radial=0).values, ds["y"].values, ds["x"].values)
    assert abs(cx - 6.5) < 0.2 and abs(cy - 3.5) < 0.2, (cx, cy)
    # an explicit step gives mm
    ds2 = _run(tmp_path / "mm", f, translation_step_mm=STEP)
    assert ds2["x"].attrs["units"] == "mm" and np.isclose(abs(ds2["x"].values[1] - ds2["x"].values[0]), STEP)


def test_overview_plot_puts_plus_y_up(tmp_path):
    from tasks.plots import image_extent

    y = np.array([0.2, 0.1, 0.0, -0.1])
    x = np.array([-0.1, 0.0, 0.1])
    img = np.zeros((4, 3))
    img[0, 2] = 1.0                          # at (x, y) = (0.1, 0.2)
    shown, extent, origin = image_extent(img, y, x)
    # drawn with origin "lower": row -1 is at the top (largest y), column -1 at the right
    assert origin == "lower" and extent == pytest.approx((-0.15, 0.15, -0.15, 0.25))
    assert shown[-1, -1] == 1.0
    shown2, extent2, _ = image_extent(img[::-1], y[::-1], x)
    assert np.array_equal(shown2, shown) and extent2 == pytest.approx(extent)


def test_wavelength_read_from_the_file(tmp_path):
    """The wavelength of sinogram input: the NXmonochromator's (with its units), else the
    radial dataset's ``wavelength_m``; on main it was NaN unless the spec gave it."""
    angles, t, cube = _disc_cube(n_angle=30)
    f = write_sinogram(tmp_path / "w.h5", cube, angles=angles, translation=t,
                       radial=np.array([1.0, 2.0]), radial_name="q", radial_units="1/A")
    with h5py.File(f, "a") as h:
        h.create_dataset("entry/instrument/monochromator/wavelength", data=0.1582).attrs["units"] = "Angstrom"
    s = open_scan(f, parse_spec({"schema_version": 1}).input)
    assert s.wavelength_m == pytest.approx(0.1582e-10)
    with h5py.File(f, "a") as h:
        h["entry/data/q"].attrs["wavelength_m"] = 2.0e-11
    assert open_scan(f, parse_spec({"schema_version": 1}).input).wavelength_m == pytest.approx(2.0e-11)
    ds = _run(tmp_path, f)
    assert ds["radial"].attrs["wavelength_m"] == pytest.approx(2.0e-11)


def test_no_radial_dataset_is_labelled_bins(tmp_path):
    angles, t, cube = _disc_cube(n_angle=30)
    f = write_sinogram(tmp_path / "b.h5", cube, angles=angles, translation=t)
    ds = _run(tmp_path, f)
    assert ds["radial"].attrs["unit"] == "bin"
    assert np.array_equal(ds["radial"].values, [0.0, 1.0])
