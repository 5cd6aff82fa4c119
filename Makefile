# README's two commands are `make smoke` and `make test`; both set up .venv first.
.PHONY: setup smoke test test-slow bench clean

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

setup:
	bash scripts/setup.sh

smoke: setup
	.venv/bin/agemem pipeline --profile smoke

test: setup
	.venv/bin/python -m pytest -q

test-slow: setup
	.venv/bin/python -m pytest -q -m slow

bench: setup
	for b in benchmarks/*.py; do .venv/bin/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
