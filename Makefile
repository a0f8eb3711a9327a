# Secure-AI: two commands for a fresh machine.
#   make lab    create .venv if missing, then open JupyterLab on tutorials/
#   make test   create .venv if missing, then run every test (helper + notebooks), JOBS notebooks at a time
#   make run    execute every notebook headlessly, in place, with figures and stamps (tools/execute.py)
#   make html   render the executed notebooks into a static book in build/ (tools/book.py)
#   make cost   execute each notebook alone; print run time and peak memory (benchmarks/notebook_cost.py)
#   make binder-check  execute each notebook inside a 1.8 GB memory cgroup, as in a Binder pod (tools/cgroup.py)
# Python 3.11 or 3.12, each with its own lock (numpy differs: syft 0.9.5 pins 1.24 on 3.11, 1.26 on 3.12).
# PYTHON defaults to the first of python3.11, python3.12 that runs; the lock follows the Python of $(VENV)
# (or of PYTHON while $(VENV) does not exist yet), so `make test PYTHON=python3.12` needs no other setting.
LOCKS := 3.11:requirements.txt 3.12:requirements-py312.txt
runs   = $(shell $(1) -c "import sys; print('%d.%d' % sys.version_info[:2])" 2>/dev/null)
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12,$(if $(call runs,$(p)),$(p))) python3.11)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYVER  := $(call runs,$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)))
LOCK   := $(patsubst $(PYVER):%,%,$(filter $(PYVER):%,$(LOCKS)))
ifneq ($(origin PYTHON),file)
ifneq ($(wildcard $(BIN)/python),)
ifneq ($(call runs,$(PYTHON)),$(PYVER))
$(error $(VENV) holds Python $(PYVER), not $(PYTHON)'s: `make clean` first, or pass another VENV=...)
endif
endif
endif
# The chapters, then the appendices (exempt from the chapter goals of tools/chapter_metrics.py).
NOTEBOOKS := $(sort $(wildcard tutorials/Part-*.ipynb)) $(sort $(wildcard tutorials/Appendix-*.ipynb))
CUDA_ONLY := nvidia-|cuda-|triton==

.PHONY: lab test run html cost binder-check mnist env lock lint clean

env: $(STAMP)

# Re-installs whenever the lock changes, so `git pull && make test` never runs a stale env.
$(STAMP): $(or $(LOCK),requirements.txt)
	@test -n "$(LOCK)" || { echo "'$(PYTHON)' is Python $(or $(PYVER),<not found>): install Python 3.11 or 3.12," \
	  "or run: make PYTHON=/path/to/python3.12 ..."; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "Could not create $(VENV) with '$(PYTHON)'. Install Python 3.11 or 3.12, or run: make PYTHON=/path/to/python3.12 ..."; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r $(LOCK)
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
# cache together). One notebook: make binder-check NOTEBOOKS=tutorials/Part-07-....ipynb
BINDER_LIMIT ?= 1.8G
binder-check: $(STAMP) mnist
	$(BIN)/python -m tools.cgroup --limit $(BINDER_LIMIT) $(NOTEBOOKS)

lint: $(STAMP)
	$(BIN)/ruff check tutorials tests benchmarks tools

# Update both locks after editing requirements.in, each compiled by its own Python (pip-compile resolves
# for the Python it runs on). CUDA runtime wheels exist for Linux only, so they get a marker that lets
# macOS and Windows install the same lock. Each lock is for one Python: the python_version markers of
# requirements.in are dropped. Other names: make lock PYTHON3.11=... PYTHON3.12=...
PYTHON3.11 ?= python3.11
PYTHON3.12 ?= python3.12
lock: $(foreach pair,$(LOCKS),lock-$(firstword $(subst :, ,$(pair))))

lock-%:
	$(eval out := $(patsubst $*:%,%,$(filter $*:%,$(LOCKS))))
	test -x .tools/pip-tools-$*/bin/pip-compile || { $(PYTHON$*) -m venv .tools/pip-tools-$* && \
	  .tools/pip-tools-$*/bin/pip install --quiet pip-tools==7.6.2; }
	.tools/pip-tools-$*/bin/pip-compile --quiet --no-emit-index-url --no-emit-find-links --strip-extras \
	  -o $(out) requirements.in
	sed -i.bak -E -e 's/ ; python_version [<>=]+ "[0-9.]+"$$//' \
	  -e '/^($(CUDA_ONLY))/ s/$$/ ; sys_platform == "linux"/' $(out) && rm $(out).bak

clean:
	rm -rf $(VENV) .tools .pytest_cache build
