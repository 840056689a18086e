#!/usr/bin/env bash
# Prepare what one device call needs, in the ignored folder .device/ (carried by the call):
#   .device/wheels/  the wheels of benchmarks/device/wheels.txt for CPython 3.12, manylinux
#                    (hdf5plugin repacked with only the bitshuffle filter: 46 MB -> ~3 MB)
#   .device/real/    the few real-data files the gpu tests read
# Then, from the device tool:  run(command="bash benchmarks/device/run.sh", carry=[".device"])
set -euo pipefail
cd "$(dirname "$0")/../.."
D=.device
rm -rf "$D" && mkdir -p "$D/wheels" "$D/real"
grep -v '^#' benchmarks/device/wheels.txt | grep . | while read -r req; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d "$D/wheels" "$req"
done
# hdf5plugin: keep the bitshuffle filter only
python - "$D/wheels" <<'PY'
import glob, os, sys, zipfile, base64, hashlib
d = sys.argv[1]
for whl in glob.glob(os.path.join(d, "hdf5plugin-*.whl")):
    tmp = whl + ".tmp"
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        names = [n for n in zin.namelist()
                 if not (n.startswith("hdf5plugin/plugins/") and "bshuf" not in n.lower())]
        record = [n for n in names if n.endswith("RECORD")][0]
        rows = []
        for n in names:
            if n == record:
                continue
            data = zin.read(n)
            zout.writestr(n, data)
            h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{n},sha256={h},{len(data)}")
        rows.append(f"{record},,")
        zout.writestr(record, "\n".join(rows) + "\n")
    os.replace(tmp, whl)
PY
REAL=../shared/data/real
for f in ndtomo_ceo2_pilatus2m/CeO2.cbf ndtomo_ceo2_pilatus2m/CeO2.poni ndtomo_ceo2_pilatus2m/mask.edf \
         ndtomo_images/catalyst_particles_medium.tif ndtomo_images/catalyst_particles_small.tif \
         ndtomo_patterns/CeO2.xy pyxrdct_sinograms/pyxrdct_image1_sinogram.hdf5; do
  if [ -f "$REAL/$f" ]; then mkdir -p "$D/real/$(dirname "$f")" && cp "$REAL/$f" "$D/real/$f"; fi
done
du -sh "$D/wheels" "$D/real" "$D"
