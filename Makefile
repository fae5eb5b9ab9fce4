# The README's two commands: `make demo` and `make test`. Both are idempotent.
PY      := .venv/bin/python
STAMP   := .venv/.stamp-install
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DATA := data/mnist-lt
DEMO_RUN  := runs/demo

.PHONY: demo test setup sysdeps diskcheck clean

# A fresh install (torch's CUDA build with its nvidia-* libraries, DALI) fills about 7.1 GB of
# .venv: say so before the venv is made rather than let pip run out of room halfway through.
NEED_GB := 8

setup: $(STAMP)

# ffcv compiles against OpenCV and libjpeg-turbo, found through pkg-config.
sysdeps:
	@pkg-config --exists opencv4 libturbojpeg 2>/dev/null || { \
	  echo "installing system packages for ffcv"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq --no-install-recommends libopencv-dev libturbojpeg0-dev pkg-config; }

diskcheck:
	@avail=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	[ "$$avail" -ge $(NEED_GB) ] || { \
	  echo "make setup: the install needs about $(NEED_GB) GB free on the disk that holds $(CURDIR), and $$avail GB are free" >&2; \
	  exit 1; }

$(PY):
	@$(MAKE) --no-print-directory diskcheck
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

# pyproject.toml gives ranges; constraints.txt pins the set known to work here (DALI for CUDA 13).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(MAKE) sysdeps
	$(PY) -m pip install -q -c constraints.txt -e '.[dali-cuda13,test]'
	touch $(STAMP)

demo: setup
	@[ -f $(DEMO_DATA)/meta.json ] || .venv/bin/ecvl-fast convert mnist-lt --out $(DEMO_DATA)
	.venv/bin/ecvl-fast demo --data $(DEMO_DATA) --out $(DEMO_RUN)

# Two workers, a test module each at a time (module fixtures are built once): on two cores the
# suite takes 7 min instead of 10, as much of it waits on subprocesses, imports and the loader.
# The longest modules go first (tests/conftest.py), so that the last minutes are not one long
# module on one worker while the other idles.
TEST_WORKERS ?= 2
test: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope

clean:
	rm -rf runs data .pytest_cache
