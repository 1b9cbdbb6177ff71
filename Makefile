# keystay: every set-up step lives here, so a fresh clone needs nothing by hand.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROTO_SRC := protos/keystay/v1/device.proto
PROTO_OUT := protos/gen

.PHONY: demo test lint protos venv test-deps apt-deps clean typecheck

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

# torch first and exact: a looser torch requirement resolved first pulls a
# multi-GB CUDA build; 2.13.0 is the CPU build this machine keeps on disk.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[device,server]'
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[device,server,test]'
	touch $@

venv: $(VENV)/.installed

# X11 tools for the capture tests; Debian's chromium and its chromedriver for
# the page tests (selenium drives them headless; nothing is downloaded at test
# time). Quick when all are present: apt runs only if one is missing.
apt-deps:
	@if ! command -v Xvfb >/dev/null || ! command -v xdotool >/dev/null \
	    || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq xvfb xdotool x11-utils \
	    chromium chromium-driver >/dev/null; \
	fi

demo: $(VENV)/.installed
	$(BIN)/keystay demo

# mypy --strict over the packages by their import names: the folders are
# mapped to keystay.* in a tree of symlinks (see [tool.mypy] in pyproject.toml).
MYPY_TREE := $(VENV)/mypy-tree
typecheck: $(VENV)/.test-installed
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)/keystay
	for d in cli client common server sim; do ln -s $(CURDIR)/$$d $(MYPY_TREE)/keystay/$$d; done
	ln -s $(CURDIR)/protos/gen/keystay/v1 $(MYPY_TREE)/keystay/v1
	cd $(MYPY_TREE) && MYPYPATH=$(CURDIR)/$(MYPY_TREE) $(CURDIR)/$(BIN)/mypy \
	  --config-file $(CURDIR)/pyproject.toml -p keystay

test: $(VENV)/.test-installed apt-deps typecheck
	$(BIN)/ruff check cli client common server sim tests bench
	$(BIN)/python -m pytest -p no:cacheprovider tests

protos: $(VENV)/.test-installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) \
	  --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) $(PROTO_SRC)

clean:
	rm -rf $(VENV) runs
