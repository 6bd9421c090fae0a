# The two commands a newcomer needs: `make run` (a simulated 8-GPU node on :9835) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test venv bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/gpu-health-exporter --backend sim --web.listen-address 127.0.0.1:9835 --state-dir ""

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/exporter_scrape.py

clean:
	rm -rf $(VENV) build *.egg-info
