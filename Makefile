# jobd: developer entry points. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The install's own chatter (setuptools' notes on editable installs) goes to a
# log, shown only if the install fails.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing jobd (editable) and its test tools into $(VENV)"
	@$(BIN)/python -m pip install --quiet -e '.[test,dev]' >$(VENV)/install.log 2>&1 \
		|| { cat $(VENV)/install.log; exit 1; }
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check jobd jobctl protocol tests bench
	$(BIN)/mypy --strict jobd jobctl protocol

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
