"""Centre of rotation over a matrix of scan geometries (issue 14, item 2).

Sinograms of the simulator's shapes phantom about a known axis (tests/centre_cases.py):
16 to 400 translations, 12 to 400 angles over 180 degrees (with or without the end
point) and 360 degrees, the axis up to a quarter of the width off the middle, noise-free,
100 counts per radial bin (250 bins summed, a quarter of the default pipeline's 1000)
with 3 % single-crystal hot spots and 5 % air scatter, or high counts with 30 % air
scatter. (With 64 bins summed, 6,400 counts in the brightest total, 400 x 12 scans reach
0.105 px: the noise limit of so few angles; benchmarks/bench_centre.py shows it.) The
centre found with the default method must be within 0.1 px of the truth for every case and
within 0.02 px when noise-free.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from centre_cases import CentreCase, make_sinogram
from tasks.sinogram import find_center

NOISE = {"clean": dict(counts=None),
         "100cts+hot+air": dict(counts=100.0, hot=0.03, air=0.05),
         "air30": dict(counts=1e5, air=0.3)}
SCANS = [(180, False), (180, True), (360, False)]


def _cases(sizes, offsets=(0.0, 0.13, -0.25)):
    out = []
    for (nt, na), (span, ep), f, noise in itertools.product(sizes, SCANS, offsets, NOISE):
        seed = len(out)
        out.append(pytest.param(CentreCase(nt, na, span, f * nt, endpoint=ep, seed=seed,
                                           **NOISE[noise]),
                                id=f"{nt}x{na}-{span}{'e' if ep else ''}-off{f:+}-{noise}"))
    return out


FAST = _cases([(16, 12), (20, 13), (24, 24), (48, 36), (128, 128), (64, 400)])
# the issue's case: 24 x 24, 24 angles over 180, axis 1.7 px off, noise and hot spots
FAST += [pytest.param(CentreCase(24, 24, 180, 1.7, counts=100.0, hot=0.03, air=0.05, seed=s),
                      id=f"issue-24x24-off1.7-seed{s}") for s in range(4)]
_LARGE = _cases([(400, 12), (400, 400), (256, 90)])
# in the default run: every large size and scan span once, at the hardest noise and the
# largest axis offset; the rest of the large matrix (about 3 min here) runs with -m long
LARGE_DEFAULT = [p for p in _LARGE if p.id.endswith("-off-0.25-100cts+hot+air")]
LARGE_LONG = [p for p in _LARGE if p not in LARGE_DEFAULT]


def _check(case):
    s, ang = make_sinogram(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # no edge-of-range or fallback warning
        c = find_center(s, ang)
    err = c - case.center
    print(f"{case.label()}: error {err:+.4f} px")
    assert abs(err) < 0.1
    if case.counts is None:
        assert abs(err) < 0.02


@pytest.mark.parametrize("case", FAST)
def test_centre_within_a_tenth_of_a_pixel(case):
    _check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_DEFAULT)
def test_centre_within_a_tenth_of_a_pixel_large(case):
    _check(case)


@pytest.mark.long
@pytest.mark.parametrize("case", LARGE_LONG)
def test_centre_within_a_tenth_of_a_pixel_large_all(case):
    _check(case)


def test_centre_uncertainty_is_calibrated():
    """The reported uncertainty matches the error: over 36 noisy scans (1,600 counts in the
    brightest bin) the rms of error / uncertainty is near 1, and the uncertainty grows with
    the noise (measured: rms 1.12; median 0.018 px at 100 counts, 0.012 px at 1e4)."""
    z, unc = [], {}
    for k, (nt, na, span) in enumerate(itertools.product((24, 48, 96), (24, 60),
                                                         (180, 360))):
        for counts in (100.0, 1e4):
            for seed in range(3 if counts == 100.0 else 1):
                case = CentreCase(nt, na, span, 0.1 * nt, counts=counts, hot=0.03, air=0.05,
                                  n_bins=16, seed=100 * k + seed)
                s, ang = make_sinogram(case)
                c, u, info = find_center(s, ang, return_uncertainty=True, return_info=True)
                assert info["method"] == "moment" and u > 0
                unc.setdefault(counts, []).append(u)
                if counts == 100.0:
                    z.append((c - case.center) / u)
    rms = float(np.sqrt(np.mean(np.square(z))))
    print(f"rms(error / uncertainty) = {rms:.2f} over {len(z)} scans; median uncertainty "
          f"{np.median(unc[100.0]):.3f} px (100 counts), {np.median(unc[1e4]):.3f} px (1e4)")
    assert 0.4 < rms < 2.0
    assert np.median(unc[1e4]) < np.median(unc[100.0])


def test_centre_search_range_is_chosen_from_the_scan():
    """vo and correlation on an axis a quarter of the width off the middle (outside the
    old default range (n-1)/2 +- n/8): the range is centred on the moment estimate and
    widened at an edge, so no edge-of-range minimum is returned."""
    case = CentreCase(128, 181, 180, -32.0, endpoint=True, seed=3)
    s, ang = make_sinogram(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("vo", "correlation"):
            c, u, info = find_center(s, ang, method=method, return_uncertainty=True,
                                     return_info=True)
            lo, hi = info["search_px"]
            print(f"{method}: error {c - case.center:+.4f} px, range [{lo:.2f}, {hi:.2f}]")
            assert lo < case.center < hi
            assert abs(c - case.center) < 0.05
    # a given range whose lower edge is just above the axis is widened past it
    c, info = find_center(s, ang, method="correlation", search=(33.0, 60.0), return_info=True)
    assert abs(c - case.center) < 0.05 and info["search_px"][0] < case.center


def test_auto_falls_back_to_vo_for_a_truncated_object():
    """An object that leaves the field of view on one side breaks the moment condition;
    auto says so and uses vo (the moments are then consistent only for a sample whose
    truncated part is the same at every angle, as this disc-shaped one is)."""
    case = CentreCase(96, 180, 180, 0.0, sample=1.0, seed=5)
    s, ang = make_sinogram(case)
    s = s[:, 8:]                                     # crop: the object now leaves the field
    with pytest.warns(RuntimeWarning, match="edge of the field"):
        c, info = find_center(s, ang, return_info=True)
    cm = find_center(s, ang, method="moment")
    print(f"truncated: vo error {c - (case.center - 8):+.3f} px, "
          f"moment {cm - (case.center - 8):+.3f}")
    assert info["method"] == "vo" and info["truncated"]
    assert abs(c - (case.center - 8)) < 0.1


def test_issue_scan_end_to_end(tmp_path):
    """The issue's scan through the whole pipeline: simulated frames (24 translations x 24
    angles over 180 degrees, axis 1.7 px off, Poisson noise, hot spots, air scatter, beam
    decay), integrated, scaled, air removed, centred. On 564e3f7 the product's centre is
    0.064 px off on this scan (the issue measured 0.29 px on its own); now 0.001 px, with
    an uncertainty of 0.004 px recorded beside the centre."""
    from flows.process import run_pipeline
    from tasks import store
    from tasks.simulate import SimConfig, simulate_scan

    sim = simulate_scan(tmp_path / "scan", SimConfig(n_translations=24, n_angles=24,
                                                     cor_offset_px=1.7))
    path = run_pipeline(sim.nexus_path, poni=sim.poni_path, pipeline="default",
                        out=tmp_path / "out")
    ds = store.open_product(path)
    err = float(ds["center_of_rotation"].values[0]) - sim.center_of_rotation_px
    print(f"issue scan: error {err:+.4f} px")
    assert abs(err) < 0.02
    unc = ds["center_of_rotation_uncertainty"]
    assert 0 < float(unc.values[0]) < 0.02 and unc.attrs["center_method"] == "moment"
    prov = store.provenance(path)["stages"]["sinogram"]
    assert prov["center_method"] == ["moment"]
    assert prov["center_uncertainty_px"][0] == pytest.approx(float(unc.values[0]))
