PY ?= python3

.PHONY: setup test demo study study-dose
setup:
	bash scripts/setup.sh
test: setup
	$(PY) -m pytest -q
demo: setup
	$(PY) -m prsl_kernels.drivers.demo
study: setup
	$(PY) -m prsl_kernels.drivers.study
study-dose: setup
	$(PY) -m prsl_kernels.drivers.study --design dose
