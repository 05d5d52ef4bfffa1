# Developer shortcuts. `make test` is the README's test command without the install step.
PY ?= python

.PHONY: build test asan bench clean

build:
	$(PY) setup.py build_ext --inplace

test: build
	$(PY) -m pytest -q

# AddressSanitizer + UBSan build of the C code, then a fast subset of the tests under it.
asan:
	FLASH_ATTN_C_SANITIZE=address,undefined $(PY) setup.py build_ext --inplace --force
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 $(PY) -m pytest -q -x -p no:cacheprovider \
	  tests/test_flash_attn.py tests/test_errors.py tests/test_backward.py tests/test_decode.py \
	  tests/test_amx_blocks.py tests/test_dropout_stream.py tests/test_backward_panels.py \
	  tests/test_workspace.py tests/test_forward_isa.py
	$(PY) setup.py build_ext --inplace --force

bench:
	$(PY) benchmarks/bench.py --quick

clean:
	rm -rf build flash_attn_c/*.so
