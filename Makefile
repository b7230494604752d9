# Two commands: `make demo` (an SSR run on the embedded defaults) and `make test`.
# Both create .venv if missing and install the package; on a machine without CUDA the CPU
# build torch==2.13.0 goes in first (an unpinned torch would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.toml

.PHONY: setup demo test lint format bench experiment experiment-ablations gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	# Liger-Kernel is a test peer for the fused cross-entropy (its deps would pull a CUDA torch).
	$(PY) -m pip install -q --no-deps liger-kernel==0.8.5
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ssrengine.models fetch smollm2-135m
	$(PY) -m ssrengine.train --config $(CONFIG)

# The paper's experiment in miniature (README, "The experiment"): base vs SFT vs SSR on
# SmolLM2-135M with the embedded data, on the CPU, then one report. EVAL_ARGS sizes the eval.
EXP ?= runs/experiment
EVAL_ARGS ?= --limit 60
experiment: $(STAMP)
	$(PY) -m ssrengine.models fetch smollm2-135m
	$(PY) -m ssrengine eval smollm2-135m --config configs/experiment_sft.toml --out $(EXP)/base $(EVAL_ARGS)
	$(PY) -m ssrengine.train --config configs/experiment_sft.toml --run.dir=$(EXP)/sft
	$(PY) -m ssrengine eval $(EXP)/sft --base-eval $(EXP)/base $(EVAL_ARGS)
	$(PY) -m ssrengine.train --config configs/experiment_ssr.toml --run.dir=$(EXP)/ssr
	$(PY) -m ssrengine eval $(EXP)/ssr --base-eval $(EXP)/base $(EVAL_ARGS)
	$(PY) -m ssrengine report $(EXP)/base $(EXP)/sft $(EXP)/ssr --out $(EXP)/report

# Ablations, after `make experiment`: rule judge at another token-F1 cut (ssr-fX: judge.min_f1,
# 0.3 in the experiment), LLM judge at P(Yes) >= 0.5 (ssr-llm) or another cut (ssr-llm-pX:
# judge.threshold). They reuse the SSR run's generations (same base model, same prompts); each
# trains and evals once.
ABLATIONS ?= ssr-f0.5 ssr-f0.1 ssr-llm-p0.15
experiment-ablations: $(STAMP)
	for a in $(ABLATIONS); do \
	  case $$a in ssr-f*) cfg="configs/experiment_ssr.toml --judge.min_f1=$${a#ssr-f}";; \
	              ssr-llm) cfg=configs/experiment_ssr_llm.toml;; \
	              ssr-llm-p*) cfg="configs/experiment_ssr_llm.toml --judge.threshold=$${a#ssr-llm-p}";; \
	              *) echo "unknown ablation $$a"; exit 1;; esac; \
	  mkdir -p $(EXP)/$$a && cp -n $(EXP)/ssr/generations.jsonl $(EXP)/$$a/ 2>/dev/null; \
	  $(PY) -m ssrengine.train --config $$cfg --run.dir=$(EXP)/$$a && \
	  $(PY) -m ssrengine eval $(EXP)/$$a --base-eval $(EXP)/base $(EVAL_ARGS) || exit 1; \
	done
	$(PY) -m ssrengine report $(EXP)/base $(EXP)/sft $(EXP)/ssr $(addprefix $(EXP)/,$(ABLATIONS)) \
	  --out $(EXP)/report-ablations

# On a CUDA GPU node (under 8 minutes): pytest -m gpu, the bf16 cross-entropy benchmark and a
# short bf16 SSR run with FlashAttention-2 + Triton loss + packing; one JSON + PNG in
# benchmarks/results/, non-zero exit on any failure. Needs the `flash` extra in this env.
gpu-check: $(STAMP)
	$(PY) -m ssrengine.models fetch smollm2-135m
	$(PY) benchmarks/gpu_check.py

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build *.egg-info runs
