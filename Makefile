# Two commands: `make demo` (an SSR run on the embedded defaults) and `make test`.
# Both create .venv if missing and install the package with the exact versions of
# constraints.txt (what the suite last passed with); on a machine without CUDA the CPU build of
# the pinned torch goes in first (an unpinned torch would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.toml
CONSTRAINTS ?= constraints.txt

.PHONY: setup demo test lint format bench experiment experiment-tune experiment-seeds experiment-ablations experiment-options gpu-check gpu-check-quick upgrade-deps clean

setup: $(STAMP)

# install_into(venv, constraints): torch (CPU build without nvidia-smi), the package with its dev
# extra, and Liger-Kernel as a test peer for the fused cross-entropy (--no-deps: its own deps
# would pull a CUDA torch); `-c` pins every one of them when a constraints file is given.
define install_into
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(1)/bin/python -m pip install -q $(2) "torch==$$(sed -n 's/^torch==//p' $(CONSTRAINTS))"; fi
	$(1)/bin/python -m pip install -q $(2) -e '.[dev]'
	$(1)/bin/python -m pip install -q $(2) --no-deps "liger-kernel==$$(sed -n 's/^liger_kernel==//p' $(CONSTRAINTS))"
endef

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(CONSTRAINTS)
	$(call install_into,$(VENV),-c $(CONSTRAINTS))
	touch $(STAMP)

# Upgrading the pins is a deliberate commit, never part of CI: a fresh venv gets the newest
# versions pyproject.toml allows (torch and Liger-Kernel stay at their lines in constraints.txt:
# edit those by hand to move them), constraints.txt is rewritten from it, and the whole suite
# runs there. Commit constraints.txt when it passes; `git checkout constraints.txt` otherwise.
UPGRADE_VENV ?= .venv-upgrade
upgrade-deps:
	rm -rf $(UPGRADE_VENV)
	$(call install_into,$(UPGRADE_VENV),)
	{ sed -n '/^#/p' $(CONSTRAINTS); $(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable \
	  | sed 's/+cpu$$//'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	$(UPGRADE_VENV)/bin/ruff check . && OMP_NUM_THREADS=1 $(UPGRADE_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(PY) -m ssrengine.models fetch smollm2-135m
	$(PY) -m ssrengine.train --config $(CONFIG)

# The paper's experiment in miniature (docs/experiment.md) on SmolLM2-135M with the
# embedded data, on the CPU: base, SFT and SSR with full fine-tuning and LoRA, SSR with the
# options, then one report with paired intervals. One file target per run, so `make -j2
# experiment` runs two chains at once (one thread each: EXP_THREADS); finished runs and evals
# are kept, so a rerun continues where a killed one stopped. Every SSR run reuses the `ssr`
# run's generations (same base model, same prompts). EVAL_ARGS sizes the eval: 200 questions
# per split (class-balanced; all of builtin:test and builtin:ood), the whole probe (200
# prompts) and MC set (260 items); fewer cannot separate the runs (docs/experiment.md).
EXP ?= runs/experiment
EVAL_ARGS ?= --limit 200 --probe-limit 0 --mc-limit 0
EXP_THREADS ?= 1
EXP_RUNS ?= sft ssr ssr-prefix ssr-options sft-lora ssr-lora
# After `make experiment`: the rule judge at other token-F1 cuts (ssr-fX: judge.min_f1, 0.3 in
# the experiment), the LLM judge at P(Yes) >= 0.5 (ssr-llm) or another cut (ssr-llm-pX).
ABLATIONS ?= ssr-f0.5 ssr-f0.1 ssr-llm-p0.15
# Options against the rehearsal set's weak spots (docs/experiment.md, "Options ..."): ssr-prefix (gold
# decision in the model's own words), ssr-balanced (a third of G answerable hard negatives),
# ssr-decision (the first 8 target tokens weigh 3x), ssr-options (all three), ssr-gold3 (gold
# targets weigh 3x: they carry the refusal decision).
OPTIONS ?= ssr-prefix ssr-balanced ssr-decision ssr-options ssr-gold3
OPT_prefix = --judge.prefix=true
OPT_balanced = --judge.gold_answerable_share=0.33
OPT_decision = --train.decision_tokens=8 --train.decision_weight=3
OPT_gold3 = --train.loss_weight_gold=3
DONE := $(EXP)/.done
# Every training run checkpoints every 10 steps (an operational setting: provenance ignores it),
# so a run killed with the working session resumes there instead of from step 0.
EXP_SAVE ?= --train.save_every=10
RUN_ENV := OMP_NUM_THREADS=$(EXP_THREADS)
report_of = $(RUN_ENV) $(PY) -m ssrengine report $(EXP)/base $(addprefix $(EXP)/,$(1)) --out $(EXP)/$(2)

# Fair tuning (docs/experiment.md): each arm picks train.epochs and train.lr on
# builtin:validation (never on test), seed 0; the chosen settings then train every seed on test.
# A tuning run is $(EXP)/tune/ARM-eEPOCHS-lrLR; its eval scores the validation split only.
TUNE_ARMS ?= sft ssr
TUNE_EPOCHS ?= 1 2 3
TUNE_LRS ?= 5e-5 1e-4 2e-4
TUNE_RUNS := $(foreach a,$(TUNE_ARMS),$(foreach e,$(TUNE_EPOCHS),$(foreach l,$(TUNE_LRS),tune/$(a)-e$(e)-lr$(l))))
TUNE_EVAL_ARGS ?= --split in_domain=builtin:validation --limit 0 --probe-limit 1 --mc-limit 1 \
	--self-vs-gold-limit 1 --lm-eval off

experiment-tune: $(EXP)/tune/selected.json

# Once selected, the grid's checkpoints (2.1 GB per full fine-tuning run) are deleted: the
# selection needs only their eval.json, and the seeded runs need the disk. TUNE_KEEP=1 keeps them.
$(EXP)/tune/selected.json: $(TUNE_RUNS:%=$(EXP)/%/eval/eval.json)
	$(PY) benchmarks/experiment.py select $(EXP)/tune
	$(if $(TUNE_KEEP),,rm -rf $(TUNE_RUNS:%=$(EXP)/%/checkpoints))

# Seeds (docs/experiment.md): every arm at its tuned epochs and lr with train.seed 0, 1, 2 on
# test, as $(EXP)/seedS/ARM; the SSR levers on the answer decision train at the SSR arm's
# settings. Then one report over all of them, the evidence copied into
# benchmarks/results/experiment/ (EVIDENCE) with summary.json (pooled over seeds), and the
# results table in README.md and docs/experiment.md regenerated from those files.
SEEDS ?= 0 1 2
ARMS ?= sft ssr ssr-balance ssr-ul ssr-contains ssr-perex
OPT_balance = --train.gold_balance=sft
OPT_ul = --train.unlikelihood_weight=1
OPT_contains = --judge.match=contains
OPT_perex = --train.loss_per_example=true
SEED_RUNS := $(foreach s,$(SEEDS),$(foreach a,$(ARMS),seed$(s)/$(a)))
EVIDENCE ?= benchmarks/results/experiment

experiment-seeds: $(EXP)/base/eval/eval.json $(SEED_RUNS:%=$(EXP)/%/eval/eval.json)
	$(call report_of,$(SEED_RUNS),report-seeds)
	$(PY) benchmarks/experiment.py collect $(EXP) $(EVIDENCE) --runs base $(SEED_RUNS) \
	  --report $(EXP)/report-seeds
	$(PY) benchmarks/experiment.py summary $(EVIDENCE)
	$(PY) benchmarks/experiment.py table $(EVIDENCE) --write README.md docs/experiment.md

$(addprefix $(DONE)/,$(addsuffix .trained,$(SEED_RUNS))): $(EXP)/tune/selected.json
$(addprefix $(DONE)/,$(addsuffix .trained,$(filter seed%/ssr,$(SEED_RUNS)) $(filter seed%/ssr-%,$(SEED_RUNS)))): $(DONE)/ssr.generated

$(EXP)/tune/%/eval/eval.json: $(DONE)/tune/%.trained
	$(RUN_ENV) $(PY) -m ssrengine eval $(EXP)/tune/$* $(TUNE_EVAL_ARGS)

$(addprefix $(DONE)/,$(addsuffix .trained,$(filter tune/ssr%,$(TUNE_RUNS)))): $(DONE)/ssr.generated

experiment: $(EXP)/base/eval/eval.json $(EXP_RUNS:%=$(EXP)/%/eval/eval.json)
	$(call report_of,$(EXP_RUNS),report)

experiment-ablations: $(EXP)/base/eval/eval.json $(addsuffix /eval/eval.json,$(addprefix $(EXP)/,sft ssr $(ABLATIONS)))
	$(call report_of,sft ssr $(ABLATIONS),report-ablations)

experiment-options: $(EXP)/base/eval/eval.json $(addsuffix /eval/eval.json,$(addprefix $(EXP)/,sft ssr $(OPTIONS)))
	$(call report_of,sft ssr $(OPTIONS),report-options)

$(DONE)/model: | $(STAMP)
	$(PY) -m ssrengine.models fetch smollm2-135m
	mkdir -p $(@D) && touch $@

$(EXP)/base/eval/eval.json: | $(DONE)/model
	$(RUN_ENV) $(PY) -m ssrengine eval smollm2-135m --config configs/experiment_sft.toml --out $(EXP)/base $(EVAL_ARGS)

$(EXP)/%/eval/eval.json: $(DONE)/%.trained $(EXP)/base/eval/eval.json
	$(RUN_ENV) $(PY) -m ssrengine eval $(EXP)/$* --base-eval $(EXP)/base $(EVAL_ARGS)

# The SSR run's generate stage, shared by every SSR run.
$(DONE)/ssr.generated: | $(DONE)/model
	$(RUN_ENV) $(PY) -m ssrengine generate --config configs/experiment_ssr.toml --run.dir=$(EXP)/ssr
	touch $@

$(addprefix $(DONE)/,$(addsuffix .trained,$(filter ssr%,$(EXP_RUNS) $(ABLATIONS) $(OPTIONS)))): $(DONE)/ssr.generated

.PRECIOUS: $(DONE)/%.trained
$(DONE)/%.trained: | $(DONE)/model
	r=$*; s=; case $$r in seed*/*) s=$${r%%/*}; s=$${s#seed}; r=$${r#*/};; esac; \
	case $$r in \
	  sft) a="configs/experiment_sft.toml";; sft-lora) a="configs/experiment_sft_lora.toml";; \
	  ssr) a="configs/experiment_ssr.toml";; ssr-lora) a="configs/experiment_ssr_lora.toml";; \
	  ssr-prefix) a="configs/experiment_ssr.toml $(OPT_prefix)";; \
	  ssr-balanced) a="configs/experiment_ssr.toml $(OPT_balanced)";; \
	  ssr-decision) a="configs/experiment_ssr.toml $(OPT_decision)";; \
	  ssr-options) a="configs/experiment_ssr.toml $(OPT_prefix) $(OPT_balanced) $(OPT_decision)";; \
	  ssr-gold3) a="configs/experiment_ssr.toml $(OPT_gold3)";; \
	  ssr-balance) a="configs/experiment_ssr.toml $(OPT_balance)";; \
	  ssr-ul) a="configs/experiment_ssr.toml $(OPT_ul)";; \
	  ssr-contains) a="configs/experiment_ssr.toml $(OPT_contains)";; \
	  ssr-perex) a="configs/experiment_ssr.toml $(OPT_perex)";; \
	  ssr-f*) a="configs/experiment_ssr.toml --judge.min_f1=$${r#ssr-f}";; \
	  ssr-llm) a="configs/experiment_ssr_llm.toml";; \
	  ssr-llm-p*) a="configs/experiment_ssr_llm.toml --judge.threshold=$${r#ssr-llm-p}";; \
	  tune/sft-e*-lr* | tune/ssr-e*-lr*) n=$${r#tune/}; e=$${n#*-e}; \
	    a="configs/experiment_$${n%%-e*}.toml --train.epochs=$${e%%-lr*} --train.lr=$${e#*-lr}";; \
	  *) echo "unknown experiment run $*" >&2; exit 2;; esac; \
	if [ -n "$$s" ]; then \
	  f=$$($(PY) benchmarks/experiment.py args $$r $(EXP)/tune/selected.json) || exit 2; \
	  a="$$a $$f --train.seed=$$s"; fi; \
	mkdir -p $(EXP)/$*; \
	case $* in ssr) ;; *) case $${r##*/} in ssr*) cp -n $(EXP)/ssr/generations.jsonl $(EXP)/$*/;; esac;; esac; \
	$(RUN_ENV) $(PY) -m ssrengine.train --config $$a $(EXP_SAVE) --run.dir=$(EXP)/$*
	mkdir -p $(@D) && touch $@

# On a CUDA GPU node: pytest -m gpu (a skipped required test fails it), the bf16 cross-entropy
# benchmark, a short bf16 SSR run with FlashAttention-2 + Triton loss + packing (loss falls,
# MFU above the GPU's floor) and its checkpoint reloaded; one summary table, JSON + PNG in
# benchmarks/results/, non-zero exit on any failure. Needs the `flash` extra in this env.
# gpu-check-quick: no SGLang, one benchmark shape, 8 minutes in all on a warm H100.
gpu-check: $(STAMP)
	$(PY) -m ssrengine.models fetch smollm2-135m
	$(PY) benchmarks/gpu_check.py

gpu-check-quick: $(STAMP)
	$(PY) -m ssrengine.models fetch smollm2-135m
	$(PY) benchmarks/gpu_check.py --quick

# The suite in TEST_WORKERS processes (pytest-xdist; whole files per worker, so a module's
# fixtures are built once), one thread each: on two cores about 1.5x faster than one process.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build *.egg-info runs $(UPGRADE_VENV)
