# One entry point for set-up and checks; CI runs `make test` through .ci/run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint bench soak fuzz docs fmt clean setup images nv-oracle

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py src/shieldml/files/_pfnative.c
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "shieldml needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	@# OpenSSL headers for the optional gramine-pf C helper (without them: pure-Python reader)
	@test -f /usr/include/openssl/evp.h || \
		{ command -v apt-get >/dev/null && apt-get install -y -q libssl-dev >/dev/null 2>&1; } || \
		echo "note: no OpenSSL headers; the gramine-pf C helper is not built (slower, same results)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# NVIDIA's nv-local-gpu-verifier 2.7.3 (deprecated) as a test oracle for the GPU evidence
# verifier (tests/attest/test_nvidia_oracle.py, scripts/nv_oracle.py): its pins conflict with
# ours, so it has a venv of its own. Needs the package registry once (about 20 s); without it a
# note, and the oracle tests skip saying why.
NV_ORACLE       := .venv-nvoracle
NV_ORACLE_STAMP := $(NV_ORACLE)/.installed

nv-oracle: $(NV_ORACLE_STAMP)

$(NV_ORACLE_STAMP):
	@{ $(PYTHON) -m venv $(NV_ORACLE) && $(NV_ORACLE)/bin/pip install --quiet \
		--disable-pip-version-check --retries 1 --timeout 30 nv-local-gpu-verifier==2.7.3 && \
		touch $@; } || { rm -rf $(NV_ORACLE); \
		echo "note: nv-local-gpu-verifier 2.7.3 not installed: the NVIDIA oracle tests skip"; }

demo: $(STAMP)
	$(BIN)/shieldml demo

# The suite, then its date-sensitive part again with the wall clock CLOCK_SHIFT away (libfaketime;
# scripts/clock_shift.py says SKIPPED when no working libfaketime is there). Under an outer
# `faketime '-30 days' make test` the first run keeps that shift, the second has CLOCK_SHIFT.
CLOCK_SHIFT ?= +730d
# What the shifted run repeats: everything that reads a clock or a validity window (evidence,
# collateral, certificates, policies, the broker, manifests, receipts, shielded runs that end in a
# receipt). The runner's isolation tests (private root, mounts, pinned trees, faults, formats,
# torch, multi-node) assert on the file system view, run the same simulated evidence path as
# test_run.py, and take about 150 s: they run once.
DATED_TESTS := tests/attest tests/policy tests/broker \
	tests/runner/test_run.py tests/runner/test_receipt_policy.py tests/runner/test_recipient_receipt.py \
	tests/runner/test_evidence.py tests/runner/test_rtmr.py tests/runner/test_rtmr_run.py \
	tests/runner/test_manifest.py tests/runner/test_key_scope.py

# pytest-xdist workers (0: in one process, the default). TEST_WORKERS=2 takes the suite from
# about 10 to 6 minutes on two cores (most tests wait on child processes), but one run in four
# had a shielded run stall under it (tests/runner/test_run.py::test_sigkill_of_...): serial
# until that is understood.
TEST_WORKERS ?= 0

test: $(STAMP) $(NV_ORACLE_STAMP)
	$(BIN)/python scripts/clock_shift.py --what "the suite" -- $(BIN)/pytest -n $(TEST_WORKERS)
	$(BIN)/python scripts/clock_shift.py --what "the date-sensitive tests" --shift $(CLOCK_SHIFT) \
		-- $(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) $(DATED_TESTS)

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy --strict src

fmt: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_files.py --markdown docs/benchmarks.md
	$(BIN)/python benchmarks/bench_attest.py --markdown docs/benchmarks.md
	$(BIN)/python benchmarks/bench_peers.py --markdown docs/benchmarks.md
	$(BIN)/python benchmarks/bench_broker.py --markdown docs/benchmarks.md
	$(BIN)/python benchmarks/bench_runner.py --markdown docs/benchmarks.md

# The broker under load and faults (PostgreSQL server binaries needed; libfaketime for clock skew).
soak: $(STAMP)
	@test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 || \
		{ command -v apt-get >/dev/null && apt-get install -y -q faketime >/dev/null 2>&1; } || \
		echo "note: libfaketime missing: the soak runs without clock skew"
	$(BIN)/python benchmarks/soak_broker.py --seconds 60 --markdown docs/benchmarks.md

# The broker and runner container images, from a Debian root filesystem (no registry needed):
# root, mmdebstrap and podman (apt-get install mmdebstrap podman). IMAGE_EXTRAS=examples adds
# PyTorch to the runner image for the example jobs.
images: $(STAMP)
	$(BIN)/python scripts/build_images.py $(if $(IMAGE_EXTRAS),--extras $(IMAGE_EXTRAS))

docs: $(STAMP)
	$(BIN)/python scripts/gen_cli_docs.py

fuzz: $(STAMP)
	SHIELDML_FUZZ_EXAMPLES=2000 $(BIN)/pytest -q -p no:cacheprovider tests/broker/test_fuzz_api.py
	SHIELDML_FUZZ_EXAMPLES=20000 $(BIN)/pytest -q -p no:cacheprovider --hypothesis-show-statistics \
		tests/test_fuzz_parsers.py tests/attest/test_intel.py tests/attest/test_snp.py \
		tests/attest/test_ratls.py tests/files/test_stream.py \
		-k "parser or mutated or flipped or random_access or headers or text or structures or json"
	$(BIN)/python scripts/fuzz_atheris.py --seconds $${FUZZ_SECONDS:-60} --markdown docs/security.md

clean:
	rm -rf $(VENV) $(NV_ORACLE) .pytest_cache .mypy_cache .ruff_cache .hypothesis
