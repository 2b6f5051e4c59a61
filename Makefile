# Two set-up commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The lock: the exact versions of every dependency the suite last passed with (refresh: `make lock`).
LOCK := constraints.txt
TORCH := torch==2.13.0
GPTQMODEL := gptqmodel==7.6.0 device-smi==0.5.7 pypcre tokenicer logbar defuser protobuf pillow ninja
# One torch thread: on 2 shared cores, 2 threads made small-op workloads 10-40x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-latest lock bench clean

# $(1): the venv, $(2): pip's constraint options (the lock, or torch alone for test-latest)
define make_venv
	python3 -m venv $(1)
	# torch first and pinned: a dependency must never pull a CUDA build
	$(1)/bin/python -m pip install -q $(TORCH)
	$(1)/bin/python -m pip install -q $(2) -e ".[dev]"
	# transformers loads GPTQ checkpoints through gptqmodel; 7.6.0 is the last release for torch 2.13 and
	# pins numpy 2.2.6, so it goes in without its dependencies (research/ecosystem.md, section 2); not
	# torchao: the GPTQ loader does not need it, and transformers would import it (CUDA warnings) everywhere
	$(1)/bin/python -m pip install -q $(2) --no-deps $(GPTQMODEL)
endef

$(VENV)/.installed: pyproject.toml $(LOCK) Makefile
	$(call make_venv,$(VENV),-c $(LOCK))
	touch $@

install: $(VENV)/.installed

# the demo build times 1 vs 2 training threads itself (demo.pick_threads): 2 are 1.8x faster on idle cores
demo: install
	env -u OMP_NUM_THREADS $(PY) scripts/demo.py

test: install
	$(PY) -m pytest

# The suite against the newest release of every dependency (only torch pinned), in a venv of its own:
# run it before `make lock` to move the lock forward.
test-latest:
	rm -rf .venv-latest
	echo "$(TORCH)" > /tmp/orthoquant-torch-only.txt
	$(call make_venv,.venv-latest,-c /tmp/orthoquant-torch-only.txt --upgrade)
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -iE '^(transformers|compressed-tensors|lm.eval)=='
	.venv-latest/bin/python -m pytest

# Write the lock from the working environment (after `make test` passed in it).
lock: install
	{ echo "# The tested versions of every dependency: written by \`make lock\` from a venv whose \`make test\` passed."; \
	  $(PY) -m pip freeze --exclude-editable | sed -e 's/+cpu$$//'; } > $(LOCK)

clean:
	rm -rf $(VENV) .venv-latest runs .pytest_cache .hypothesis
