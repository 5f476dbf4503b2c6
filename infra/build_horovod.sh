#!/usr/bin/env bash
# Build Horovod 0.28.1 (TensorFlow + Gloo, no MPI) against the venv's TensorFlow and install it.
#
# Usage: infra/build_horovod.sh [VENV]        (default: $VENV, else .venv)
#
# Horovod ships as an sdist only, and 0.28.1 does not compile against TF 2.21 as released:
# xla_mpi_ops.cc includes XLA headers that TF 2.21 no longer ships. We drop that one source
# (its ops are only used with HOROVOD_ENABLE_XLA_OPS=1). The build takes ~10 min on 2 cores,
# so the wheel is cached outside the work tree, keyed by the Horovod and TensorFlow versions.
set -euo pipefail

HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
VENV="${1:-${VENV:-.venv}}"
PY="$VENV/bin/python"
CACHE="${MLIMAGES_CACHE:-$HOME/.cache/mlimages}/wheels"

[ -x "$PY" ] || { echo "build_horovod: no python at $PY" >&2; exit 2; }
TF_VERSION="$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)" || {
    echo "build_horovod: TensorFlow must be installed in $VENV first" >&2; exit 2; }

if "$PY" -c 'import horovod.tensorflow' 2>/dev/null \
    && [ "$("$PY" -c 'import horovod; print(horovod.__version__)')" = "$HOROVOD_VERSION" ]; then
    echo "build_horovod: horovod $HOROVOD_VERSION already installed in $VENV"
    exit 0
fi

# The wheel links against one TF ABI: a wheel built for another TF version must not be reused.
WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-tf$TF_VERSION"
mkdir -p "$WHEEL_DIR"
WHEEL="$(ls "$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)"

if [ -z "$WHEEL" ]; then
    echo "build_horovod: building horovod $HOROVOD_VERSION for TF $TF_VERSION (about 10 min)"
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation \
        -d "$WORK" "horovod==$HOROVOD_VERSION"
    tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK"
    SRC="$WORK/horovod-$HOROVOD_VERSION"
    sed -i '/xla_mpi_ops\.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
    if grep -q 'xla_mpi_ops' "$SRC/horovod/tensorflow/CMakeLists.txt"; then
        echo "build_horovod: could not drop xla_mpi_ops.cc from CMakeLists.txt" >&2; exit 1
    fi
    # Without build isolation the venv itself must provide the build tools.
    command -v cmake >/dev/null || "$PY" -m pip install --quiet "cmake>=3.13,<4"
    "$PY" -m pip install --quiet wheel packaging
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
        MAKEFLAGS="-j$(nproc)" HOROVOD_BUILD_ARCH_FLAGS="${HOROVOD_BUILD_ARCH_FLAGS:-}" \
        "$PY" -m pip wheel --no-deps --no-build-isolation -w "$WORK/dist" "$SRC"
    cp "$WORK"/dist/horovod-"$HOROVOD_VERSION"-*.whl "$WHEEL_DIR"/
    WHEEL="$(ls "$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-*.whl | head -n1)"
else
    echo "build_horovod: using cached wheel $WHEEL"
fi

"$PY" -m pip install --no-deps "$WHEEL"
# Runtime deps of horovodrun; --no-deps above keeps pip from touching the TF stack.
"$PY" -m pip install --quiet cloudpickle psutil pyyaml packaging cffi
"$PY" -c 'import horovod.tensorflow as hvd; assert hvd.gloo_built(), "gloo not built"'
echo "build_horovod: installed $(basename "$WHEEL") into $VENV"
