#!/usr/bin/env bash
# The Python 3.12 check (docs/development.md): the engine, registry and worker tests, and the
# shared clip extracted with every format through the CLI, on a machine whose python3 is 3.12
# and already has torch, torchvision, numpy, OpenCV, scikit-image, scipy, numba, psutil, tqdm
# and pandas (the lent GPU machines) but nothing else of ours and no network.
#
# Expects, from the repository root:
#   .whl/   cp312 manylinux x86_64 wheels of the rest (av 19, sqlmodel, SQLAlchemy, pydantic,
#           facenet-pytorch, face-alignment, safetensors, trimesh, pytest ...): the download
#           command is in docs/development.md.
#
# Usage: bash scripts/py312_check.sh CLIP [SHARED]
#   CLIP    the shared test clip (WDA_KatieHill_000.mp4), anywhere.
#   SHARED  optional copy of ../shared (testdata/, bfm_index/); default .carry/shared when it
#           exists. With it the tests that read images or the BFM index run too, and the overlay
#           format is written with a synthetic face model made from bfm_index.
# Environment: PYTHON (python3), SITE (/tmp/site, where the wheels go), OUT (/tmp/out),
#   STEPS ("versions tests extract"), DEVICE (cuda when torch sees a GPU, else cpu).
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

CLIP=${1:?usage: bash scripts/py312_check.sh CLIP [SHARED]}
CLIP=$(realpath "$CLIP") || exit 2
SHARED=${2:-}
if [[ -z "$SHARED" && -d .carry/shared ]]; then SHARED=.carry/shared; fi
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

echo "=== install .whl/*.whl into $SITE"
ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/ (see docs/development.md)"; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { echo "installing the wheels failed"; exit 2; }
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1

# The tests find the clip at $STUDIO_SHARED/testdata/video/WDA_KatieHill_000.mp4.
if [[ -n "$SHARED" ]]; then
  export STUDIO_SHARED=$(realpath "$SHARED")
else
  export STUDIO_SHARED=$(mktemp -d /tmp/py312-shared.XXXXXX)
  mkdir -p "$STUDIO_SHARED/testdata/video"
  ln -s "$CLIP" "$STUDIO_SHARED/testdata/video/WDA_KatieHill_000.mp4"
fi

failed=()
for step in ${STEPS:-versions tests extract}; do
  echo "=== $step"
  case $step in
    versions)
      "$PY" - <<'EOF' || failed+=(versions)
import importlib, platform, sys
from importlib import metadata
print("python", sys.version.split()[0], platform.machine())
for module, dist in (("av", "av"), ("torch", "torch"), ("torchvision", "torchvision"), ("numpy", "numpy"),
                     ("cv2", "opencv-python-headless"), ("scipy", "scipy"), ("skimage", "scikit-image"),
                     ("numba", "numba"), ("PIL", "pillow"), ("pandas", "pandas"), ("sqlmodel", "sqlmodel"),
                     ("sqlalchemy", "sqlalchemy"), ("pydantic", "pydantic"), ("facenet_pytorch", "facenet-pytorch"),
                     ("face_alignment", "face-alignment"), ("safetensors", "safetensors"), ("trimesh", "trimesh"),
                     ("psutil", "psutil"), ("tqdm", "tqdm"), ("pytest", "pytest")):
    try:
        found = importlib.import_module(module)
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:  # e.g. OpenCV installed under another distribution name
            version = getattr(found, "__version__", "?")
        print(f"{module:16s} {version}")
    except Exception as e:  # report and go on: the tests say what it breaks
        print(f"{module:16s} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
      ;;
    tests)
      "$PY" -m pytest -p no:cacheprovider -q -ra -m "not browser" \
        tests/test_avcompat.py tests/test_sources.py tests/test_pipeline.py tests/test_db.py \
        tests/test_worker.py tests/test_cli.py tests/test_align.py tests/test_regressor.py \
        engine/avcompat.py engine/sources.py 2>&1 | tee "$OUT/tests.log"
      [[ ${PIPESTATUS[0]} == 0 ]] || failed+=(tests)
      ;;
    extract)
      work=$(mktemp -d /tmp/py312-extract.XXXXXX)
      device=${DEVICE:-$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
      formats=pirender,sadtalker,deep3d,npz,csv,landmarks
      "$PY" -c "import sys; from tests.factories import make_checkpoint; make_checkpoint(sys.argv[1], 'deep3d')" \
        "$work/epoch_20.pth" || { failed+=(extract); continue; }
      if [[ -d "$STUDIO_SHARED/bfm_index" ]]; then
        "$PY" -c "import sys; from engine.face3d.synthetic import write_synthetic_model as w; w(sys.argv[1], sys.argv[2], seed=0)" \
          "$STUDIO_SHARED/bfm_index" "$work/BFM" && export STUDIO_BFM_DIR="$work/BFM" && formats=$formats,overlay
      else
        echo "(no bfm_index in SHARED: the overlay format is left out)"
      fi
      echo "device $device, formats $formats"
      "$PY" -m engine extract "$CLIP" -o "$work/out" --checkpoint "$work/epoch_20.pth" --landmarks mtcnn \
        --formats "$formats" --device "$device" --no-progress 2>&1 | tee "$OUT/extract.log"
      [[ ${PIPESTATUS[0]} == 0 ]] || { failed+=(extract); continue; }
      "$PY" - "$work/out" <<'EOF' 2>&1 | tee -a "$OUT/extract.log" || failed+=(extract)
import sys
from pathlib import Path

import numpy as np
from scipy.io import loadmat

out = Path(sys.argv[1])
for p in sorted(out.rglob("*")):
    if p.is_file():
        print(f"{p.relative_to(out)}  {p.stat().st_size} bytes")
[npz] = out.glob("*.npz")
with np.load(npz) as r:
    coeff, valid = r["coeff"], r["valid"]
print(f"npz: coeff {coeff.shape} {coeff.dtype}, valid {int(valid.sum())}/{len(valid)}")
assert coeff.shape[1] == 257 and len(coeff) > 0 and np.isfinite(coeff).all()
for mat in sorted(out.glob("*.mat")):
    keys = sorted(k for k in loadmat(mat) if not k.startswith("__"))
    print(f"{mat.name}: {keys}")
EOF
      ;;
    *) echo "unknown step $step"; failed+=("$step") ;;
  esac
done

echo "=== py312 check: ${#failed[@]} step(s) failed${failed:+: ${failed[*]}}"
[[ ${#failed[@]} == 0 ]]
