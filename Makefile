# Secure-AI: two commands for a fresh machine.
#   make lab    create .venv if missing, then open JupyterLab on tutorials/
#   make test   create .venv if missing, then run every test (helper + notebooks)
#   make run    execute every notebook headlessly, in place
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard tutorials/Part-*.ipynb))
CUDA_ONLY := nvidia-|cuda-|triton==

.PHONY: lab test run env lock lint clean

env: $(STAMP)

# Re-installs whenever the lock changes, so `git pull && make test` never runs a stale env.
$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "Could not create $(VENV) with '$(PYTHON)'. Install Python 3.11 or run: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m ipykernel install --sys-prefix --name secure-ai --display-name "Python 3 (secure-ai)" >/dev/null
	@touch $@
	@echo "Environment ready in $(VENV)."

# Extra options for JupyterLab, e.g. make lab LAB_ARGS="--no-browser --port 8890"
LAB_ARGS ?=
ROOT_ARGS := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=tutorials --MultiKernelManager.default_kernel_name=secure-ai $(ROOT_ARGS) $(LAB_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

run: $(STAMP)
	cd tutorials && for nb in $(notdir $(NOTEBOOKS)); do \
	  echo "== $$nb"; \
	  ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.kernel_name=secure-ai --ExecutePreprocessor.timeout=900 "$$nb" || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check tutorials tests benchmarks

# Update the lock after editing requirements.in. CUDA runtime wheels exist for Linux only, so they
# get a marker that lets macOS and Windows install the same lock.
lock:
	test -x .tools/bin/pip-compile || { $(PYTHON) -m venv .tools && .tools/bin/pip install --quiet pip-tools==7.6.2; }
	.tools/bin/pip-compile --quiet --no-emit-index-url --no-emit-find-links --strip-extras \
	  -o requirements.txt requirements.in
	sed -i.bak -E '/^($(CUDA_ONLY))/ s/$$/ ; sys_platform == "linux"/' requirements.txt && rm requirements.txt.bak

clean:
	rm -rf $(VENV) .tools .pytest_cache
