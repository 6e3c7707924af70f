# The two commands of the README. Both set up .venv/ first (tools/setup/install.sh; a no-op when up to date).
PY := .venv/bin/python
RESULTS := results

.PHONY: install demo test model-zoo bench-edge bench-server bench-dense

install:
	bash tools/setup/install.sh

# Main job: evit_small vs deit_small - params, GMACs, token counts, eager and onnxruntime speed, export parity.
# DEIT_S=path/to/deit_small_patch16_224-cd65a155.pth loads local DeiT-S weights into both; random weights otherwise
# (the output says which). Results go to a new file each run.
demo: install
	@mkdir -p $(RESULTS)
	$(PY) tools/benchmark.py deit_small_patch16_224 evit_small --onnx \
		$(if $(DEIT_S),--checkpoint deit_small_patch16_224=$(DEIT_S) --checkpoint evit_small=$(DEIT_S)) \
		--json $(RESULTS)/demo_$$(date +%Y%m%d-%H%M%S).json

test: install
	$(PY) -m pytest tests -q

# Regenerate model_zoo.md and its plots from the measurements kept in tools/results/ (copy a new benchmark JSON there
# first). It replaces the file: model_zoo.md is generated, never hand-edited.
model-zoo:
	$(PY) tools/model_zoo.py tools/results/*.json --out model_zoo.md --force

# The zoo's benchmarks, one command per profile, on a quiet machine (each writes a new JSON into $(RESULTS)/; copy it
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
		--json $(RESULTS)/dense_upernet_512_$$(date +%Y%m%d-%H%M%S).json
