# jobd: developer entry points. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench clean lock test-newest test-lowest

LOCK := requirements/lock.txt
LOCK_EXTRAS := --extra ca --extra otel --extra test --extra dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every dependency comes from the committed lock, each file checked against its
# hash; then jobd itself, editable, without dependencies and without build
# isolation (setuptools is in the lock too). The install's own chatter goes to a
# log, shown only if the install fails. docs/operations.md: "The lock".
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	@echo "installing the locked dependencies and jobd (editable) into $(VENV)"
	@{ $(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK) \
		&& $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . ; \
	} >$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	touch $(STAMP)

# Regenerate the lock after changing a range in pyproject.toml or
# requirements/tools.in: pins already in the lock stay where they are. `make
# lock UPGRADE=1` takes the newest releases the ranges allow (docs/operations.md).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml requirements/tools.in $(LOCK_EXTRAS) \
		--generate-hashes --universal --python-version 3.11 $(if $(UPGRADE),--upgrade) \
		--custom-compile-command 'make lock' -o $(LOCK)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check jobd jobctl protocol tests bench
	$(BIN)/mypy --strict jobd jobctl protocol

# Both ends of pyproject.toml's ranges, each in a fresh venv of its own
# (scripts/lane.py): the newest releases allowed today, and the lowest declared
# versions of our direct dependencies. Arguments for pytest: LANE_ARGS='-k tls'.
test-newest: $(STAMP)
	$(BIN)/python scripts/lane.py newest $(LANE_ARGS)

test-lowest: $(STAMP)
	$(BIN)/python scripts/lane.py lowest $(LANE_ARGS)

clean:
	rm -rf $(VENV) .venv-newest .venv-lowest .pytest_cache .mypy_cache .ruff_cache
