# Entry points, all starting from nothing but python3:
#   make demo  - set up, build engines from the bundled ecar-digits checkpoint, generate an image grid
#   make test  - set up, lint, type-check and run the test suite
#   make bench - every benchmark script (long: the ecar-b builds take ~7.5 GB; see benchmarks/README.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench clean

# Every package at the version constraints.txt pins (pyproject.toml only states ranges).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build (never an unpinned CUDA download)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[export,onnxruntime,openvino,serve,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/ecar-export build --out engines
	$(BIN)/ecar-run --engine-dir engines --per-class 8 --seed 0 --out out

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy runtime ecar_export calibration
	# the TensorRT layer against NVIDIA's published API stubs (unpacked into .stubs/, not installed)
	PYTHON=$(BIN)/python bash scripts/typecheck_tensorrt.sh

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q

# Results and charts go to benchmarks/results/; builds and the trained S = 1 baseline are cached in
# benchmarks/.cache/ (gitignored) and reused by reruns.
ECAR_B_VARIANTS := torch,torch-bf16,torch-compile,torch-compile-bf16,fp32,int8,ov-fp32,ov-fp16,ov-int8

bench: $(STAMP)
	$(BIN)/ecar-export build --out engines
	$(BIN)/python benchmarks/pipeline_speed.py
	# ecar-b: one process per batch size (the nine variants' engines and compiled graphs at both sizes in one
	# process outgrew a 24 GB machine)
	$(BIN)/python benchmarks/pipeline_speed.py --preset ecar-b --batches 8 --repeats 5 --calibration-requests 245 \
		--variants $(ECAR_B_VARIANTS)
	$(BIN)/python benchmarks/pipeline_speed.py --preset ecar-b --batches 1 --repeats 5 --calibration-requests 245 \
		--variants $(ECAR_B_VARIANTS) --out benchmarks/results/pipeline_speed_ecar-b_batch1.json
	$(BIN)/python benchmarks/image_agreement.py --preset ecar-b
	$(BIN)/python benchmarks/calibration_reader_memory.py
	$(BIN)/python benchmarks/flops_compare.py
	$(BIN)/python benchmarks/paper_claim.py
	$(BIN)/python benchmarks/startup_memory.py
	$(BIN)/python benchmarks/openvino_memory.py
	$(BIN)/python benchmarks/openvino_shapes.py
	$(BIN)/python benchmarks/decoder_speed.py
	$(BIN)/python benchmarks/decoder_memory.py
	$(BIN)/python benchmarks/demo_quality.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/runtime_install.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/serve_failover.py
	# the paper-scale cases of the test suite (full-size KL-16 decoders, FlowAR-S end to end): about 45 min
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) out engines/*.onnx engines/*.weights engines/manifest.json
