# Two commands for a new user: `make run` and `make test`. Everything installs into .venv.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SAMPLE := data/sample

.PHONY: setup run test test-faults lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# the quickstart: write the sample dataset, index it, train ResNet-50 on 2 local Ray workers
run: $(STAMP)
	test -f $(SAMPLE)/index/classes.tsv || { $(BIN)/resnet-pipe data synth $(SAMPLE) && $(BIN)/resnet-pipe data prepare $(SAMPLE); }
	$(BIN)/resnet-pipe submit quickstart

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# KServe's Python SDK, for tests/serve/kserve_client.py: a virtual environment of its own, as
# kserve 0.21 pins psutil<6 and pandas<3, below what Ray and MLflow need in .venv
KSERVE := .venv-kserve
$(KSERVE)/.installed:
	python3 -m venv $(KSERVE)
	$(KSERVE)/bin/pip install --quiet kserve==0.21.0
	touch $@

# two test processes, a module at a time each, the slowest modules first (tests/conftest.py)
test: lint $(KSERVE)/.installed
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not faults"

# the share-nothing cluster: a lost node, and the faults injected into it (docs/reliability.md):
# one process, as the cluster's nodes take both cores; iptables refuses and drops the store's and
# the tracking server's traffic
test-faults: $(STAMP)
	command -v iptables >/dev/null || { apt-get update -qq && apt-get install -y -qq iptables; }
	$(BIN)/pytest -m faults

clean:
	rm -rf runs mlflow.db mlartifacts $(SAMPLE)
