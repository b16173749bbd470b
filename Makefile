# Standalone use: `make demo`, `make test`, `make bench`. Each sets up what is missing first.
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := PIP_CONFIG_FILE=/dev/null $(VENV)/bin/pip
TORCH_PINS := torch==2.15.0 torchvision==0.29.2
COMFYUI_TAG := v0.3.64
COMFYUI_REPO := https://github.com/comfyanonymous/ComfyUI.git
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-fast test-compat test-reliability test-browser demo bench bench-peers coverage memory-report clean

setup: $(STAMP) .comfyui_path

# The host: $COMFYUI_PATH, else $HOME/ComfyUI, else a clone of the pinned tag under .host/.
.comfyui_path: FORCE
	@host="$${COMFYUI_PATH:-}"; \
	if [ -z "$$host" ] && [ -f "$$HOME/ComfyUI/main.py" ]; then host="$$HOME/ComfyUI"; fi; \
	if [ -z "$$host" ]; then \
	  host="$(CURDIR)/.host/ComfyUI"; \
	  if [ ! -f "$$host/main.py" ]; then \
	    echo "ComfyUI not found: cloning $(COMFYUI_TAG) into $$host"; \
	    git clone --depth 1 --branch $(COMFYUI_TAG) $(COMFYUI_REPO) "$$host" || exit 1; \
	  fi; \
	fi; \
	if [ ! -f "$$host/main.py" ]; then echo "error: no ComfyUI at $$host (main.py missing)"; exit 1; fi; \
	echo "$$host" > .comfyui_path.new; \
	if ! cmp -s .comfyui_path.new .comfyui_path; then mv .comfyui_path.new .comfyui_path; else rm .comfyui_path.new; fi; \
	echo "ComfyUI host: $$host"

$(STAMP): requirements.txt requirements-dev.txt .comfyui_path
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH_PINS)
	grep -v -E '^(torch|torchvision|torchaudio)\s*$$' "$$(cat .comfyui_path)/requirements.txt" > $(VENV)/host-requirements.txt
	$(PIP) install -r $(VENV)/host-requirements.txt -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

FORCE:

PYTEST := $(PY) -m pytest -c tests/pytest.ini -q -p no:logging

# The browser test needs Debian's chromium (apt-get install -y chromium); without it `make test` says so and skips it.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)

test: setup
	@if [ -z "$(CHROMIUM)" ]; then echo "*** browser test SKIPPED: chromium not found (Debian/Ubuntu: sudo apt-get install -y chromium) ***"; fi
	$(PYTEST) -rs tests
	@if [ -z "$(CHROMIUM)" ]; then echo "*** browser test was SKIPPED: chromium not found (Debian/Ubuntu: sudo apt-get install -y chromium) ***"; fi

test-browser: setup
	@if [ -z "$(CHROMIUM)" ]; then echo "error: chromium not found (Debian/Ubuntu: sudo apt-get install -y chromium)"; exit 1; fi
	$(PYTEST) -rs tests/browser

test-fast: setup
	$(PYTEST) tests/unit

# Randomized reliability suite (also part of `make test`): FC_RELIABILITY_SEED / _EXAMPLES / _ONLY replay or widen it
test-reliability: setup
	$(PYTEST) tests/integration/test_randomized.py tests/integration/test_soak.py

# The second compatibility target (ComfyUI v0.8): COMFYUI_PATH=$$HOME/ComfyUI-0.8 make test-compat
test-compat: setup
	$(PYTEST) tests/integration

demo: setup
	$(PY) -m benchmarks.demo

bench: setup
	$(PY) -m benchmarks.frontier

# Every model family at every cache site on the host in use: out/coverage.json and a printed matrix.
# Second host: COMFYUI_PATH=$$HOME/ComfyUI-0.8 make coverage
coverage: setup
	$(PY) -m benchmarks.coverage

# The other caching packs side by side (benchmarks/frontier/peers.py pins their commits): checkouts in
# $$FC_PEERS_DIR, else .peers/ (each absent one cloned there). ComfyUI-TeaCache imports diffusers.
FC_PEERS_DIR ?= $(CURDIR)/.peers
bench-peers: setup
	@$(PY) -c "import diffusers" 2>/dev/null || $(PIP) install --no-deps diffusers
	$(PY) -m benchmarks.frontier --peers "$(FC_PEERS_DIR)" --out out/bench-peers

# Cache bytes per method, order and site at Flux-dev and Wan-14B sizes (meta tensors): out/memory_report.{md,json}
memory-report: setup
	$(PY) -m benchmarks.memory_report --out out

clean:
	rm -rf out .pytest_cache
