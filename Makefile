# Secure-AI: two commands for a fresh machine.
#   make lab    create .venv if missing, then open JupyterLab on tutorials/
#   make test   create .venv if missing, then run every test (helper + notebooks), JOBS notebooks at a time
#   make run    execute every notebook headlessly, in place, with figures and stamps (tools/execute.py)
#   make html   render the executed notebooks into a static book in build/ (tools/book.py)
#   make cost   execute each notebook alone; print run time and peak memory (benchmarks/notebook_cost.py)
#   make binder-check  execute each notebook inside a 1.8 GB memory cgroup, as in a Binder pod (tools/cgroup.py)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard tutorials/Part-*.ipynb))
CUDA_ONLY := nvidia-|cuda-|triton==

.PHONY: lab test run html cost binder-check mnist env lock lint clean

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

# pytest-xdist: one notebook per worker (--dist loadfile), each torch on one thread. JOBS=1 runs serially
# in one worker; every worker kernel needs up to 1.5 GB.
JOBS ?= 2
test: $(STAMP) mnist
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadfile

# MNIST on disk before the workers start (else each would download it into data/ at the same time).
mnist: $(STAMP)
	@cd tutorials && ../$(BIN)/python -c "from secure_ai.data import mnist_raw; mnist_raw(True); mnist_raw(False)"

# Always with figures (the inline backend, whatever MPLBACKEND says), widgets saved as text, each code
# cell stamped with the hash of its source. One notebook: make run NOTEBOOKS=tutorials/Part-02-....ipynb
run: $(STAMP)
	$(BIN)/python -m tools.execute $(NOTEBOOKS)

html: $(STAMP)
	$(BIN)/python -m tools.book --out build $(NOTEBOOKS)

cost: $(STAMP)
	$(BIN)/python benchmarks/notebook_cost.py $(NOTEBOOKS)

# Linux, as root or with a delegated cgroup (Binder's limit counts the kernel, its servers and the page
# cache together). One notebook: make binder-check NOTEBOOKS=tutorials/Part-06-....ipynb
BINDER_LIMIT ?= 1.8G
binder-check: $(STAMP) mnist
	$(BIN)/python -m tools.cgroup --limit $(BINDER_LIMIT) $(NOTEBOOKS)

lint: $(STAMP)
	$(BIN)/ruff check tutorials tests benchmarks tools

# Update the lock after editing requirements.in. CUDA runtime wheels exist for Linux only, so they
# get a marker that lets macOS and Windows install the same lock.
lock:
	test -x .tools/bin/pip-compile || { $(PYTHON) -m venv .tools && .tools/bin/pip install --quiet pip-tools==7.6.2; }
	.tools/bin/pip-compile --quiet --no-emit-index-url --no-emit-find-links --strip-extras \
	  -o requirements.txt requirements.in
	sed -i.bak -E '/^($(CUDA_ONLY))/ s/$$/ ; sys_platform == "linux"/' requirements.txt && rm requirements.txt.bak

clean:
	rm -rf $(VENV) .tools .pytest_cache build
