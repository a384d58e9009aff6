# Set-up, demo and tests. Every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WHEELS := .wheels
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml tools/build_learn2learn.sh
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else \
	  f"metasgd-lightning needs Python >= 3.11; {sys.executable} is {v[0]}.{v[1]}. Run: make install PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash tools/build_learn2learn.sh $(BIN)/python $(WHEELS)
	$(BIN)/python -m pip install --quiet --find-links $(WHEELS) -e '.[test]'
	@touch $(STAMP)

demo: install
	$(BIN)/metasgd fit --config configs/sine_5shot.yaml

# The linter first (well under a second), then the suite on TEST_WORKERS processes (pytest-xdist; one per core, at most
# 4). --dist loadgroup keeps the tests that share a module's fitted run on one worker (tests/conftest.py). One process:
# make test TEST_WORKERS=0
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf $(VENV) $(WHEELS) runs
