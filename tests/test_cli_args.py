"""Every subcommand's numeric options are checked by argparse before any work: a bad value
is one line naming the option and what was expected, exit 2 (train, learn, profile; the
process/simulate/demo options are covered in test_clean_stops.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import subprocess_env

CASES = [
    (["train", "--epochs", "0"], "--epochs", "whole number >= 1"),
    (["train", "--angles", "2"], "--angles", "whole number >= 3"),
    (["train", "--lr=-1e-3"], "--lr", "(0.0, inf]"),
    (["train", "--noise", "nan"], "--noise", "[0.0, inf]"),
    (["train", "--seed", "-4"], "--seed", "whole number >= 0"),
    (["learn", "--held-out-fraction", "1.5"], "--held-out-fraction", "(0.0, 1.0)"),
    (["learn", "--bins", "0"], "--bins", "whole number >= 1"),
    (["profile", "cal.xy", "--poni", "g.poni", "--npt", "5"], "--npt", "whole number >= 16"),
    (["profile", "cal.xy", "--poni", "g.poni", "--tth-range", "2", "190"], "--tth-range",
     "(0.0, 180.0)"),
]


@pytest.mark.parametrize("argv, option, expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_option_is_one_line_and_exit_2(argv, option, expected, tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True,
                       cwd=tmp_path, env=subprocess_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    msg = lines[-1]
    assert f"argument {option}" in msg and expected in msg, msg
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []   # nothing written
