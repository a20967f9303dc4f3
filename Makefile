# Two commands do everything on a fresh machine (see README):
#   make run ARGS='--model tiny --prompt "a red fox"'   install into .venv and run txt2img
#   make test                                           install into .venv, lint (ruff, mypy), run the tests
# TORCH=auto|cu126|cu130|cpu picks the PyTorch build (auto: from nvidia-smi; see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
ARGS   ?= --model tiny --prompt "a photograph of an astronaut riding a horse"
TORCH  ?= auto
TORCH_INDEX_BASE ?= https://download.pytorch.org/whl

.PHONY: install install-test install-browser run lint test clean FORCE

# The requested build, rewritten only when it changes: `make run TORCH=cu126` after an earlier
# install reinstalls torch, and an unchanged request installs nothing.
$(VENV)/.torch-request: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH) $(TORCH_INDEX_BASE)' | cmp -s - $@ || echo '$(TORCH) $(TORCH_INDEX_BASE)' > $@

$(VENV)/.installed: pyproject.toml constraints.txt tools/select_torch.py $(VENV)/.torch-request
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned and built for this machine's GPU (or the CPU): tools/select_torch.py
	# prints the pip arguments. An open range would let pip pull a multi-GB CUDA build.
	args="$$($(PY) tools/select_torch.py --index-base '$(TORCH_INDEX_BASE)' '$(TORCH)')" && $(PIP) install -q $$args
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
	$(VENV)/bin/mypy leansd tools

test: lint install-browser
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
