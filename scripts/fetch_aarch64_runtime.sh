#!/usr/bin/env bash
# Fetch TVM's runtime for 64-bit Arm Linux (the aarch64 wheels of apache-tvm and apache-tvm-ffi, the
# versions this venv compiles with) and unpack its shared libraries into
#   ${FXPRESS_CACHE:-~/.cache/fxpress}/aarch64-runtime/
# libtvm_runtime.so, libtvm_runtime_extra.so, libtvm_ffi.so and VERSION.  fxpress.backends.edge runs
# aarch64 artifacts with it under qemu-aarch64 (tests/backends/test_aarch64_qemu.py).  A set-up step:
# it needs the network once (about 100 MB of wheels, deleted after unpacking); idempotent.
#
#   scripts/fetch_aarch64_runtime.sh            # PYTHON=.venv/bin/python by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CACHE=${FXPRESS_CACHE:-$HOME/.cache/fxpress}
DEST="$CACHE/aarch64-runtime"

# The runtime must match the compiler that wrote the VM executable: take the installed versions.
read -r TVM_VERSION FFI_VERSION < <("$PY" -c \
  "import importlib.metadata as m; print(m.version('apache-tvm'), m.version('apache-tvm-ffi'))")
WANT="apache-tvm==$TVM_VERSION apache-tvm-ffi==$FFI_VERSION"

if [ -f "$DEST/VERSION" ] && [ "$(cat "$DEST/VERSION")" = "$WANT" ] \
   && [ -f "$DEST/libtvm_runtime.so" ] && [ -f "$DEST/libtvm_runtime_extra.so" ] && [ -f "$DEST/libtvm_ffi.so" ]; then
  echo "aarch64 TVM runtime already in $DEST ($WANT)"
  exit 0
fi

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.aarch64-runtime-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --platform manylinux_2_28_aarch64 --only-binary=:all: \
  "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" -d "$WORK/wheels"
mkdir -p "$WORK/out"
"$PY" - "$WORK/wheels" "$WORK/out" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheels, out = Path(sys.argv[1]), Path(sys.argv[2])
wanted = {"tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_extra.so", "tvm_ffi/lib/libtvm_ffi.so"}
found = set()
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name in wanted:
                target = out / Path(name).name
                target.write_bytes(archive.read(name))
                target.chmod(0o755)
                found.add(name)
missing = wanted - found
if missing:
    sys.exit(f"the aarch64 wheels lack {', '.join(sorted(missing))}")
EOF
echo "$WANT" > "$WORK/out/VERSION"
rm -rf "$DEST"
mv "$WORK/out" "$DEST"
echo "aarch64 TVM runtime ($WANT) in $DEST"
