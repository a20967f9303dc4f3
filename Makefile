# Two commands do everything on a fresh machine (see README):
#   make run ARGS='--model tiny --prompt "a red fox"'   install into .venv and run txt2img
#   make test                                           install into .venv, lint (ruff, mypy), run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
ARGS   ?= --model tiny --prompt "a photograph of an astronaut riding a horse"

.PHONY: install install-test install-browser run lint test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an open range lets pip pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/leansd txt2img $(ARGS)

# The web UI's browser test drives Debian's chromium through Playwright (executable_path); browsers
# are never downloaded with `playwright install`.
CHROMIUM ?= /usr/bin/chromium

install-browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium); \
	else echo "install-browser: $(CHROMIUM) is missing; install Debian's chromium (sudo apt-get install chromium)" >&2; exit 1; fi

# Lint and type checks first: they take seconds and fail before the slower tests start.
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy leansd

test: lint install-browser
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
