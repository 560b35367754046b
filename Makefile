# The two commands: `make demo` (train a small GPT and print samples) and `make test`.
# Both install missing Debian packages, configure, build, then run.
BUILD   ?= build
JOBS    ?= 2
CMAKE_FLAGS ?=

.PHONY: demo test deps build data clean

deps:
	@bash scripts/install_deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

data: build
	@bash scripts/prepare_corpus.sh $(BUILD)

demo: data
	@bash scripts/demo.sh $(BUILD)

test: data
	@cd $(BUILD) && ctest --output-on-failure --timeout 900

clean:
	rm -rf $(BUILD) data runs
