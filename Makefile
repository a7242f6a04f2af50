# make demo: set up and fine-tune the embedded default (offline).  make test: set up and run the tests.
# make lint: ruff over the code.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt scripts/install_system_deps.sh
	sh scripts/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/tfl finetune

# One TensorFlow thread per xdist worker (more oversubscribe the cores: 180 s against 200 s wall for six end-to-end
# test files). Three workers on two cores: the third fills the time the others wait on child processes and files
# (193 % CPU against 178 %; 2-5 % faster in three back-to-back pairs, docs/developing.md).
test: setup
	TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info

# make docs: build the documentation site (docs/, mkdocs.yml) into site/; --strict turns every warning into an error.
.PHONY: docs
docs: setup
	$(VENV)/bin/mkdocs build --strict -d site
