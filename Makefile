# clipdecomp -- `make demo` sets up .venv with what the package needs, builds the C core and runs
# the demo; `make test` adds the test references (torch, transformers, ...) and runs every test.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
CC      ?= gcc
CSRC    := $(filter-out csrc/module.c,$(wildcard csrc/*.c))
CFLAGS_CORE := -O2 -g -std=c11 -fopenmp -Wall -Wextra -Icsrc

.PHONY: venv venv-run build test test-c test-py test-browser test-sanitize typecheck lint demo bench bench-memory notebooks clean

# what the package itself needs (pyproject's dependencies) and its build: enough for the demo
$(VENV)/.stamp-run: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q numpy pillow tokenizers tqdm pandas matplotlib
	touch $@

# the test references and tools on top: torch and transformers (the oracles), the data extras
$(VENV)/.stamp-test: $(VENV)/.stamp-run
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q huggingface_hub pytest transformers safetensors scikit-learn scipy h5py \
	    nbformat nbclient ipykernel zarr "dask[distributed]" hypothesis ruff mypy \
	    sentencepiece protobuf
	touch $@

venv-run: $(VENV)/.stamp-run
venv: $(VENV)/.stamp-test

build: $(VENV)/.stamp-run
	$(VPY) setup.py -q build_ext --inplace

# C-only test program: the core without Python, plain and under ASan + UBSan.
build/test_core: $(CSRC) csrc/tests/test_core.c
	mkdir -p build
	$(CC) $(CFLAGS_CORE) -o $@ $(CSRC) csrc/tests/test_core.c -lm
build/test_core_san: $(CSRC) csrc/tests/test_core.c
	mkdir -p build
	$(CC) $(CFLAGS_CORE) -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
	    -o $@ $(CSRC) csrc/tests/test_core.c -lm

build/test_gemm: csrc/gemm.c csrc/gemm_avx2.c csrc/gemm_avx512.c csrc/cpu.c csrc/tests/test_gemm.c
	mkdir -p build
	$(CC) $(CFLAGS_CORE) -o $@ $^ -lm

build/test_moments: csrc/moments.c csrc/gemm.c csrc/gemm_avx2.c csrc/gemm_avx512.c csrc/cpu.c csrc/tests/test_moments.c
	mkdir -p build
	$(CC) $(CFLAGS_CORE) -o $@ $^ -lm

OPS_TEST_SRC := csrc/ops.c csrc/attention_amx.c csrc/gemm.c csrc/gemm_avx2.c csrc/gemm_avx512.c csrc/cpu.c csrc/tests/test_ops.c
build/test_ops: $(OPS_TEST_SRC)
	mkdir -p build
	$(CC) $(CFLAGS_CORE) -o $@ $^ -lm
build/test_ops_san: $(OPS_TEST_SRC)
	mkdir -p build
	$(CC) $(CFLAGS_CORE) -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
	    -o $@ $^ -lm

test-c: build/test_core build/test_core_san build/test_gemm build/test_moments build/test_ops build/test_ops_san venv
	$(VPY) csrc/tests/make_fixture.py build/fixture
	./build/test_core build/fixture
	./build/test_gemm
	./build/test_moments
	./build/test_ops
	ASAN_OPTIONS=detect_leaks=1 ./build/test_ops_san
	ASAN_OPTIONS=detect_leaks=1 ./build/test_core_san build/fixture

test-py: build venv
	$(VPY) -m pytest -q tests

# mypy over the package (settings in pyproject.toml)
typecheck: venv
	$(VPY) -m mypy

lint: venv
	$(VPY) -m ruff check clipdecomp tests benchmarks scripts

test: test-c test-py typecheck

# the atlas in headless Chromium alone (also part of test-py; skipped there without Chromium;
# .ci/run installs it with apt-get install chromium)
test-browser: build
	CLIPDECOMP_REQUIRE_BROWSER=1 $(VPY) -m pytest -q -m browser tests/viz

# the pytest suite against an ASan + UBSan build of the extension (build/sanitize/)
test-sanitize: venv
	tests/sanitize.sh

demo: build
	$(VPY) -m clipdecomp demo

bench: build venv
	$(VPY) benchmarks/run.py

# peak and steady memory of loading B/16, L/14, H/14 (random weights, each in a fresh process;
# writes multi-GB checkpoints to /tmp and deletes them); results in benchmarks/MEMORY.md
bench-memory: build
	$(VPY) benchmarks/bench_memory.py --models B16,L14,H14 --precisions fp32,bf16 \
	    --towers both,image --decompose 8

# execute every notebook in place, so the committed outputs (and figures) are current
notebooks: build venv
	MPLBACKEND=Agg $(VPY) scripts/run_notebooks.py notebooks/*.ipynb

clean:
	rm -rf build clipdecomp/*.so
