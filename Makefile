# The two commands of the README. Both set up .venv/ first (tools/setup/install.sh; a no-op when up to date).
PY := .venv/bin/python
RESULTS := results

.PHONY: install demo test model-zoo bench-edge bench-server bench-dense

install:
	bash tools/setup/install.sh

# Main job: DeiT-S and every registered small model (a new family is picked up without edits) - params, GMACs, tokens
# per block, eager PyTorch speed, ONNX export with parity, onnxruntime FP32 and dynamic INT8 latency on the edge
# profile (1 thread, batch 1) with INT8 agreement. Random weights (no download here; the output says so): with local
# weights run tools/benchmark.py with --checkpoint MODEL=PATH. Results go to a new file each run.
demo: install
	@mkdir -p $(RESULTS)
	$(PY) tools/benchmark.py --zoo small --profile edge --variants fp32 int8-dynamic --batch-size 8 --iters 20 \
		--json $(RESULTS)/demo_$$(date +%Y%m%d-%H%M%S).json

test: install
	$(PY) -m pytest tests -q

# Regenerate model_zoo.md and its plots from the measurements kept in tools/results/ (copy a new benchmark JSON there
# first). It replaces the file: model_zoo.md is generated, never hand-edited.
model-zoo:
	$(PY) tools/model_zoo.py tools/results/*.json --out model_zoo.md --force

# The zoo's benchmarks, one command per profile (bench-dense: UperNet 512 and Mask R-CNN 1024), on a quiet machine (each writes a new JSON into $(RESULTS)/; copy it
# to tools/results/ and run make model-zoo). SIZE=small by default; random weights (the agreement figures say so).
# edge: 1 thread, batch 1, every graph variant, mobile check; server: all usable cores, batch 32.
SIZE ?= small
bench-edge: install
	@mkdir -p $(RESULTS)
	$(PY) tools/benchmark.py --zoo $(SIZE) --profile edge --variants all --mobile \
		--json $(RESULTS)/edge_$(SIZE)_224_$$(date +%Y%m%d-%H%M%S).json
bench-server: install
	@mkdir -p $(RESULTS)
	$(PY) tools/benchmark.py --zoo $(SIZE) --profile server --variants fp32 int8-static int8-dynamic fp16 \
		--json $(RESULTS)/server_$(SIZE)_224_$$(date +%Y%m%d-%H%M%S).json
bench-dense: install
	@mkdir -p $(RESULTS)
	$(PY) tools/benchmark.py --dense configs/deit/upernet_deit-small_mln_8xb2-160k_ade20k-512x512.py \
		$$(ls configs/*/upernet_*-small*_8xb2-160k_ade20k-512x512.py | grep -v '^configs/deit/') \
		--iters 10 --warmup 2 --json $(RESULTS)/dense_upernet_512_$$(date +%Y%m%d-%H%M%S).json
	$(PY) tools/benchmark.py --dense configs/deit/mask-rcnn_deit-small_sfp_8xb2-lsj-100e_coco.py \
		$$(ls configs/*/mask-rcnn_*-small*_8xb2-lsj-100e_coco.py | grep -v '^configs/deit/') \
		--iters 5 --warmup 1 --json $(RESULTS)/dense_mask-rcnn_1024_$$(date +%Y%m%d-%H%M%S).json
