# megatron_bluelm: `make demo` trains the tiny model on the bundled corpus (CPU, 4 gloo ranks);
# `make test` runs the test suite. Both install what they need first.
PY ?= python3
NPROC ?= 4
STAMP := .install.stamp

.PHONY: install data demo test test-fast lint bench-preprocess clean

$(STAMP): setup.py
	@# CPU machines: the pinned CPU wheel. A GPU image keeps the torch it ships.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@# The oldest transformers setup.py declares, beside (not instead of) the installed one: the HF
	@# export test loads its output with both (tests/checkpoint/test_hf.py).
	$(PY) -m pip install -q --no-deps --upgrade --target .deps/transformers-oldest \
		transformers==4.57.1 tokenizers==0.22.1 huggingface_hub==0.36.0
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(PY) -m megatron_bluelm.data.demo

demo: data
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) \
		-m megatron_bluelm.stages.pretrain --config examples/pretrain_tiny.yaml

# The kernel tests run in their own process: Triton chooses interpreter vs compiler when a kernel
# module is imported, and in one process with the other suites the interpreter broke (Triton's
# "Cannot call @triton.jit'd outside of the scope of a kernel").
test: $(STAMP)
	$(PY) -m pytest -q --ignore=tests/kernels
	$(PY) -m pytest -q tests/kernels

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --ignore=tests/kernels
	$(PY) -m pytest -q -m "not slow" tests/kernels

lint:
	$(PY) -m ruff check megatron_bluelm bluelm_kernels tools tests

bench-preprocess: $(STAMP)
	$(PY) tools/bench/preprocess_bench.py

clean:
	rm -rf outputs $(STAMP)
