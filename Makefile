# The two commands a newcomer needs: `make demo` (a simulated fleet, end to end, with a live timeline) and
# `make test`. `make run` serves one simulated 8-GPU node on :9835.
VENV ?= .venv
PY := $(VENV)/bin/python
# Two pytest workers, one test file each at a time: the end-to-end files mostly wait on Prometheus' intervals, so a
# second worker fills the idle core (CI machines have two).
TEST_WORKERS ?= 2

.PHONY: demo run test venv bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m gpu_health_stack.demo

run: venv
	$(VENV)/bin/gpu-health-exporter --backend sim --web.listen-address 127.0.0.1:9835 --state-dir ""

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: venv
	$(PY) benchmarks/exporter_scrape.py

clean:
	rm -rf $(VENV) build *.egg-info
