#!/usr/bin/env bash
# Run the test suite against a build of clipdecomp._core with AddressSanitizer + UBSan.
#
#   tests/sanitize.sh                     # the default selection, about 3 minutes on 2 cores
#   tests/sanitize.sh tests               # everything (about 10 minutes)
#   tests/sanitize.sh tests/engine/test_fuzz.py  # any pytest arguments instead
#
# The default selection is the whole suite but the three files that run the 6-layer toy model
# end to end (test_toy_world, test_demo, test_notebooks): they go through the same C code as the
# oracle tests, only at a larger size, and take two thirds of the time under the sanitizers.
#
# The source tree is copied to build/sanitize/src (the working tree's own extension is left
# alone), the extension is built there with CLIPDECOMP_SANITIZE=1 (setup.py then adds
# -fsanitize=address,undefined -O1 -g), and pytest runs in the copy with the sanitizer runtimes
# preloaded into the (uninstrumented) Python interpreter. An ASan report or a UBSan finding
# stops the process with an error, which fails the run.
#
# torch: its libraries are not instrumented, but they load and run under the preloaded runtime
# with leak detection off (CPython and torch keep memory until exit by design), so the tests
# that compare against torch / transformers run here too; only clipdecomp's C code is checked
# for bad accesses and undefined behaviour, torch's allocations are merely tracked.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${CLIPDECOMP_SANITIZE_DIR:-$ROOT/build/sanitize}
CC=${CC:-gcc}

ASAN_LIB=$($CC -print-file-name=libasan.so)
UBSAN_LIB=$($CC -print-file-name=libubsan.so)
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
    if [ ! -e "$lib" ]; then
        echo "sanitize.sh: $lib not found (install gcc's libasan / libubsan)" >&2
        exit 2
    fi
done

# a fresh copy of the source tree, without environments, builds and caches
rm -rf "$OUT/src" "$OUT/tmp"
mkdir -p "$OUT/src"
tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude=./.git --exclude=./.hypothesis \
    --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude='__pycache__' \
    --exclude='*.so' --exclude='*.o' -cf - . | tar -C "$OUT/src" -xf -
echo "sanitize.sh: building clipdecomp._core with -fsanitize=address,undefined"
(cd "$OUT/src" && CLIPDECOMP_SANITIZE=1 "$PY" setup.py -q build_ext --inplace \
    --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1) || { cat "$OUT/build.log"; exit 1; }
SO=$(ls "$OUT"/src/clipdecomp/_core*.so)
# (not `ldd | grep -q`: under pipefail, grep -q quitting early can kill ldd with SIGPIPE and
# fail the pipeline although the library is there)
DEPS=$(ldd "$SO")
if ! printf '%s\n' "$DEPS" | grep libasan >/dev/null; then
    echo "sanitize.sh: $SO is not linked against libasan:" >&2
    printf '%s\n' "$DEPS" >&2
    tail -n 40 "$OUT/build.log" >&2
    exit 1
fi

export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}"
# no leak report (the interpreter leaks by design); stop at the first error, saying where
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
cd "$OUT/src"
if [ "$#" -eq 0 ]; then
    set -- tests --ignore=tests/toy/test_world.py --ignore=tests/test_cli_and_demo.py \
        --ignore=tests/test_notebooks.py
fi
echo "sanitize.sh: pytest $* (in $OUT/src, LD_PRELOAD=$LD_PRELOAD)"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
