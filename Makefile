# The two commands of the README. Both set up .venv/ first (tools/setup/install.sh; a no-op when up to date).
PY := .venv/bin/python
RESULTS := results

.PHONY: install demo test model-zoo

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

# Regenerate model_zoo.md from the measurements kept in tools/results/ (copy a new benchmark JSON there first).
# It replaces the file: model_zoo.md is generated, never hand-edited.
model-zoo:
	$(PY) tools/model_zoo.py tools/results/*.json --out model_zoo.md --force
