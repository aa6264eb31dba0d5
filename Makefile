PY ?= python3

.PHONY: setup test lock demo study study-dose study-mechanism
# Installs what is missing or off constraints/test.txt (about a second when all is in place).
# PRSL_UNLOCKED=1 make test: the newest releases instead of the locked ones.
setup:
	PYTHON=$(PY) bash scripts/setup.sh
test: setup
	$(PY) -m pytest -q
# Rewrite the lock from what is installed (after an upgrade that passed the suite).
lock:
	$(PY) scripts/test_env.py freeze > constraints/test.txt
demo: setup
	$(PY) -m prsl_kernels.drivers.demo
study: setup
	$(PY) -m prsl_kernels.drivers.study
study-dose: setup
	$(PY) -m prsl_kernels.drivers.study --design dose
study-mechanism: setup
	$(PY) -m prsl_kernels.drivers.study --design mechanism
