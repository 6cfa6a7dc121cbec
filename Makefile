# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a step they run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := data/fashion-mnist

.PHONY: demo test test-quick install data test-tools bench eval clean

demo: install data
	$(BIN)/streamhash demo
	@echo "To explore it in a browser: $(BIN)/streamhash demo --serve  (prints the search page URL; Ctrl-C stops everything)"

test: install test-tools
	-@$(MAKE) --no-print-directory data  # the demo's own test skips if the dataset cannot be had
	$(BIN)/python -m pytest

# The edit-test loop: unit tests, doctests and in-process server tests; no broker, no processes.
test-quick: install
	$(BIN)/python -m pytest -m "not slow"

# torch first and pinned: the CPU wheel already on these machines. An open range pulls GBs of CUDA.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml setup.py streamhash/index/_hamming.h streamhash/index/_hamming.c \
		streamhash/index/_hamming_scan.c streamhash/index/_hamming_avx512.c streamhash/index/_hamming_mih.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,eval,natural]'
	touch $@

# Fashion-MNIST: the Debian package's files, unpacked into ./data (no root needed, no system change).
data: $(FMNIST)/t10k-labels-idx1-ubyte.gz
$(FMNIST)/t10k-labels-idx1-ubyte.gz:
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
		mkdir -p $(FMNIST) && cp /usr/share/datasets/fashion-mnist/*.gz $(FMNIST)/; \
	elif command -v apt-get >/dev/null; then \
		tmp=$$(mktemp -d) && (cd $$tmp && (apt-get download dataset-fashion-mnist 2>/dev/null || \
			{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download dataset-fashion-mnist; })) && \
		dpkg -x $$tmp/dataset-fashion-mnist_*.deb $$tmp/x && mkdir -p $(FMNIST) && \
		cp $$tmp/x/usr/share/datasets/fashion-mnist/*.gz $(FMNIST)/ && rm -rf $$tmp; \
	fi
	@test -f $@ || { echo "Fashion-MNIST not found and could not be fetched. Download the four *-ubyte.gz files"; \
		echo "from https://github.com/zalandoresearch/fashion-mnist into $(FMNIST)/ and run make demo again."; exit 1; }

# promtool/prometheus for the deploy tests, Debian's chromium + chromedriver for the search page's
# browser test; each skips with a reason where this cannot install them (not root, no apt).
test-tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -qq prometheus >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq prometheus >/dev/null 2>&1)) \
		|| echo "promtool not installed: deploy config tests will be skipped"; }
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) \
		|| echo "chromium not installed: the browser test will be skipped"; }

bench: install data
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_hamming.py

eval: install data
	$(BIN)/streamhash eval --protocol partial-labels --quick

clean:
	rm -rf $(VENV) var build *.egg-info
