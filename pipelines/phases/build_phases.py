"""Build the shipped phase library (``pipelines/phases/*.cif``) from published cells.

Every CIF here is generated, not copied: pymatgen builds the structure from the space
group, the lattice parameters and the Wyckoff positions listed in :data:`PHASES`
(``Structure.from_spacegroup``), and ``CifWriter`` writes it. Each file starts with
comment lines naming the sources of the cell and the atomic positions, so the library
carries no database or package copyright. Atomic displacement (Debye-Waller) parameters
are not included (pymatgen's ``XRDCalculator`` then uses B = 0).

Run ``python pipelines/phases/build_phases.py`` to (re)write the files; it checks each
written file by reading it back (lattice, composition and reflection list must match the
structure it was built from). ``tests/test_rietveld.py`` checks the shipped files against
:data:`PHASES`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Each entry: file name, formula (for the header), space group symbol as pymatgen accepts
# it, lattice parameters (a, b, c in Angstrom; alpha, beta, gamma in degrees), the
# asymmetric unit (species, fractional coordinates), and the source lines written into
# the CIF header.
PHASES: dict[str, dict] = {
    "LiCoO2": dict(
        file="LiCoO2.cif",
        title="LiCoO2, layered alpha-NaFeO2 type (O3), hexagonal setting of R-3m",
        spacegroup="R-3m",
        lattice=(2.8156, 2.8156, 14.0542, 90.0, 90.0, 120.0),
        species=["Li", "Co", "O"],
        coords=[[0.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.2396]],
        sources=[
            "Cell: Y. Akimoto, Y. Gotoh, Y. Oosawa, 'Synthesis and structure refinement of",
            "  LiCoO2 single crystals', J. Solid State Chem. 141 (1998) 298-302",
            "  (a = 2.8156 A, c = 14.0542 A).",
            "Positions: Li 3b (0,0,1/2), Co 3a (0,0,0), O 6c (0,0,z) with z = 0.2396, the",
            "  oxygen parameter of the LiCoO2 refinements (Akimoto et al. 1998; H. J. Orman,",
            "  P. J. Wiseman, Acta Cryst. C40 (1984) 12-14), rounded to 4 digits.",
        ],
    ),
    "graphite": dict(
        file="graphite.cif",
        title="graphite-2H (Bernal, ABAB stacking), P6_3/mmc",
        spacegroup="P6_3/mmc",
        lattice=(2.464, 2.464, 6.711, 90.0, 90.0, 120.0),
        species=["C", "C"],
        coords=[[0.0, 0.0, 0.25], [1 / 3, 2 / 3, 0.25]],
        sources=[
            "Cell and positions: P. Trucano, R. Chen, 'Structure of graphite by neutron",
            "  diffraction', Nature 258 (1975) 136-137 (a = 2.464 A, c = 6.711 A;",
            "  C 2b (0,0,1/4), C 2c (1/3,2/3,1/4)).",
        ],
    ),
    "Al": dict(
        file="Al.cif",
        title="aluminium, fcc (Fm-3m)",
        spacegroup="Fm-3m",
        lattice=(4.0495,) * 3 + (90.0,) * 3,
        species=["Al"],
        coords=[[0.0, 0.0, 0.0]],
        sources=[
            "Cell: a = 4.0495 A, W. Witt, Z. Naturforsch. A 22 (1967) 92 (the reference",
            "  cited for the Al calibrant of pyFAI). Position: Al 4a (0,0,0).",
        ],
    ),
    "Cu": dict(
        file="Cu.cif",
        title="copper, fcc (Fm-3m)",
        spacegroup="Fm-3m",
        lattice=(3.6149,) * 3 + (90.0,) * 3,
        species=["Cu"],
        coords=[[0.0, 0.0, 0.0]],
        sources=[
            "Cell: a = 3.6149 A, the standard room-temperature lattice parameter of copper",
            "  (compiled e.g. in R. W. G. Wyckoff, Crystal Structures, vol. 1, 2nd ed.,",
            "  Interscience, 1963). Position: Cu 4a (0,0,0).",
        ],
    ),
    "Fe": dict(
        file="Fe.cif",
        title="alpha-iron (ferrite; stands in for steel), bcc (Im-3m)",
        spacegroup="Im-3m",
        lattice=(2.8665,) * 3 + (90.0,) * 3,
        species=["Fe"],
        coords=[[0.0, 0.0, 0.0]],
        sources=[
            "Cell: a = 2.8665 A, the standard room-temperature lattice parameter of",
            "  alpha-Fe (compiled e.g. in R. W. G. Wyckoff, Crystal Structures, vol. 1,",
            "  2nd ed., Interscience, 1963). Position: Fe 2a (0,0,0).",
        ],
    ),
    "NiO": dict(
        file="NiO.cif",
        title="nickel(II) oxide (bunsenite), rock salt (Fm-3m), cubic average structure",
        spacegroup="Fm-3m",
        lattice=(4.1771,) * 3 + (90.0,) * 3,
        species=["Ni", "O"],
        coords=[[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]],
        sources=[
            "Cell: a = 4.1771 A, the commonly tabulated room-temperature lattice parameter",
            "  of stoichiometric NiO (powder-diffraction reference value; cf. R. W. G.",
            "  Wyckoff, Crystal Structures, vol. 1, 2nd ed., 1963, rock-salt table).",
            "  The small rhombohedral distortion below T_N is ignored.",
            "Positions: Ni 4a (0,0,0), O 4b (1/2,1/2,1/2).",
        ],
    ),
    "Ni": dict(
        file="Ni.cif",
        title="nickel, fcc (Fm-3m)",
        spacegroup="Fm-3m",
        lattice=(3.5239,) * 3 + (90.0,) * 3,
        species=["Ni"],
        coords=[[0.0, 0.0, 0.0]],
        sources=[
            "Cell: a = 3.5239 A, A. Taylor, J. Inst. Metals 77 (1950) 585 (the reference",
            "  cited for the Ni calibrant of pyFAI). Position: Ni 4a (0,0,0).",
        ],
    ),
    "Al2O3_corundum": dict(
        file="Al2O3_corundum.cif",
        title="alpha-Al2O3 (corundum), hexagonal setting of R-3c",
        spacegroup="R-3c",
        lattice=(4.759355, 4.759355, 12.99231, 90.0, 90.0, 120.0),
        species=["Al", "O"],
        coords=[[0.0, 0.0, 0.35216], [0.30624, 0.0, 0.25]],
        sources=[
            "Cell: NIST Standard Reference Material 676a (alumina powder), certificate",
            "  (2015): a = 4.759355 A, c = 12.99231 A.",
            "Positions: J. Lewis, D. Schwarzenbach, H. D. Flack, 'Electric field gradients",
            "  and charge density in corundum, alpha-Al2O3', Acta Cryst. A38 (1982)",
            "  733-739: Al 12c (0,0,z) z = 0.35216, O 18e (x,0,1/4) x = 0.30624.",
        ],
    ),
    "CeO2": dict(
        file="CeO2.cif",
        title="cerium dioxide (ceria), fluorite type (Fm-3m)",
        spacegroup="Fm-3m",
        lattice=(5.411651,) * 3 + (90.0,) * 3,
        species=["Ce", "O"],
        coords=[[0.0, 0.0, 0.0], [0.25, 0.25, 0.25]],
        sources=[
            "Cell: NIST Standard Reference Material 674b certificate, a = 5.411651 A",
            "  (CeO2 for quantitative analysis).",
            "Positions: fluorite type, Ce 4a (0,0,0), O 8c (1/4,1/4,1/4).",
        ],
    ),
    "Fe3O4": dict(
        file="Fe3O4.cif",
        title="magnetite Fe3O4, inverse spinel (Fd-3m, origin choice 2)",
        spacegroup="Fd-3m:2",
        lattice=(8.396,) * 3 + (90.0,) * 3,
        species=["Fe", "Fe", "O"],
        coords=[[0.125, 0.125, 0.125], [0.5, 0.5, 0.5], [0.2549, 0.2549, 0.2549]],
        sources=[
            "Cell: a = 8.396 A, the commonly tabulated room-temperature lattice parameter",
            "  of stoichiometric magnetite (powder-diffraction reference value).",
            "Positions: spinel type, origin choice 2: Fe 8a (1/8,1/8,1/8), Fe 16d",
            "  (1/2,1/2,1/2), O 32e (x,x,x) x = 0.2549, the magnetite oxygen parameter",
            "  given by R. J. Hill, J. R. Craig, G. V. Gibbs, 'Systematics of the spinel",
            "  structure type', Phys. Chem. Minerals 4 (1979) 317-339.",
        ],
    ),
    "LiC6": dict(
        file="LiC6.cif",
        title="LiC6 (stage-1 lithium-graphite intercalation compound), P6/mmm",
        spacegroup="P6/mmm",
        lattice=(4.305, 4.305, 3.706, 90.0, 90.0, 120.0),
        species=["Li", "C"],
        coords=[[0.0, 0.0, 0.0], [1 / 3, 0.0, 0.5]],
        sources=[
            "Cell: D. Guerard, A. Herold, 'Intercalation of lithium into graphite and",
            "  other carbons', Carbon 13 (1975) 337-345 (a = 4.305 A, c = 3.706 A).",
            "Positions: AA-stacked graphene layers with Li above the centre of every",
            "  third C6 ring: Li 1a (0,0,0), C 6k (1/3,0,1/2).",
        ],
    ),
}


def build_structure(entry: dict):
    """Return the pymatgen ``Structure`` of one :data:`PHASES` entry."""
    from pymatgen.core import Lattice, Structure

    a, b, c, al, be, ga = entry["lattice"]
    lattice = Lattice.from_parameters(a, b, c, al, be, ga)
    return Structure.from_spacegroup(entry["spacegroup"], lattice, entry["species"], entry["coords"])


def cif_text(name: str, entry: dict) -> str:
    """The CIF text for one phase: a source header, then pymatgen's ``CifWriter`` output."""
    from pymatgen.io.cif import CifWriter

    struct = build_structure(entry)
    a, b, c, al, be, ga = entry["lattice"]
    header = [
        f"# {name}: {entry['title']}",
        "# Generated by pipelines/phases/build_phases.py with pymatgen",
        "# (Structure.from_spacegroup + CifWriter) from published values; not copied from",
        "# any database.",
        f"# Space group {entry['spacegroup']}; a={a} b={b} c={c} alpha={al} beta={be} gamma={ga}",
        "# Sources:",
    ] + [f"#   {line}" for line in entry["sources"]] + [
        "# No displacement parameters (B = 0). CifWriter lists the asymmetric unit in",
        "# spglib's standard setting, which may differ from the positions above by an",
        "# origin shift or an equivalent choice of representative atom.",
        "",
    ]
    body = str(CifWriter(struct, symprec=1e-3))
    return "\n".join(header) + body


def check_file(path: Path, entry: dict) -> None:
    """Read ``path`` back and compare with the built structure; raises AssertionError."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator
    from pymatgen.io.cif import CifParser

    built = build_structure(entry)
    read = CifParser(path).parse_structures(primitive=False)[0]
    want = np.array(entry["lattice"])
    got = np.array(read.lattice.parameters)
    assert np.allclose(got, want, rtol=1e-6, atol=1e-6), (path, got, want)
    assert read.composition == built.composition, (path, read.composition, built.composition)
    calc = XRDCalculator(wavelength=0.5)
    p0 = calc.get_pattern(built, scaled=False, two_theta_range=(0, 60))
    p1 = calc.get_pattern(read, scaled=False, two_theta_range=(0, 60))
    assert np.allclose(p0.x, p1.x, atol=1e-8) and np.allclose(p0.y, p1.y, rtol=1e-6), path


def main(out_dir: Path = HERE) -> None:
    for name, entry in PHASES.items():
        path = Path(out_dir) / entry["file"]
        path.write_text(cif_text(name, entry))
        check_file(path, entry)
        print(f"wrote {path}  ({build_structure(entry).composition.reduced_formula})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
