# The two commands of the README. Both set up .venv/ first (tools/setup/install.sh; a no-op when up to date).
PY := .venv/bin/python
RESULTS := results

.PHONY: install demo test model-zoo

install:
	bash tools/setup/install.sh

# Main job: evit_small vs deit_small - params, GMACs, token counts, eager and onnxruntime speed, export parity.
demo: install
	@mkdir -p $(RESULTS)
	$(PY) tools/benchmark.py deit_small_patch16_224 evit_small --onnx \
		--json $(RESULTS)/demo_$$(date +%Y%m%d-%H%M%S).json

test: install
	$(PY) -m pytest tests -q

# Regenerate model_zoo.md from the newest demo results (replaces the file: it is generated, never hand-edited).
model-zoo:
	$(PY) tools/model_zoo.py $$(ls -t $(RESULTS)/demo_*.json | head -n 1) --out model_zoo.md --force
