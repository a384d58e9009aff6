#!/usr/bin/env bash
# Builds a learn2learn 0.2.0 wheel that installs on Python >= 3.11.
#
# Why: the only release on PyPI is an sdist whose Cython-generated C includes `longintrepr.h`,
# which CPython 3.11 removed (learn2learn issue #413). Regenerating the C from the shipped .pyx
# files with a current Cython fixes the build. The wheel lands in a local cache folder that
# `pip install --find-links` then reads; a second run finds it and does nothing.
#
# Usage: tools/build_learn2learn.sh PYTHON WHEEL_DIR
set -euo pipefail
python=${1:?usage: $0 PYTHON WHEEL_DIR}
wheels=${2:?usage: $0 PYTHON WHEEL_DIR}
version=0.2.0

tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if compgen -G "$wheels/learn2learn-$version-$tag-$tag-*.whl" >/dev/null; then
    exit 0
fi
mkdir -p "$wheels"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "Building learn2learn $version for $tag (regenerating its Cython C; see tools/build_learn2learn.sh)"
"$python" -m pip install --quiet "cython>=3.0" "setuptools>=68" wheel
"$python" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    "learn2learn==$version" -d "$work"
tar -xzf "$work/learn2learn-$version.tar.gz" -C "$work"
src="$work/learn2learn-$version"
for pyx in "$src"/learn2learn/data/*.pyx; do
    "$python" -m cython -3 "$pyx" -o "${pyx%.pyx}.c"
done
"$python" -m pip wheel --quiet --no-deps --no-build-isolation "$src" -w "$wheels"
ls "$wheels"/learn2learn-$version-$tag-*.whl
