PY ?= python3

.PHONY: setup test demo
setup:
	bash scripts/setup.sh
test: setup
	$(PY) -m pytest -q
demo: setup
	$(PY) -m prsl_kernels.drivers.demo
