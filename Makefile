# The two commands of the README's quick start. Each does its own set-up.
.PHONY: demo test lint setup bench clean

demo:
	scripts/setup.sh runtime
	scripts/demo.sh

test:
	scripts/setup.sh test
	.venv/bin/pytest -q -p no:cacheprovider tests

lint:
	scripts/setup.sh test
	.venv/bin/ruff check layerfs cli tests benchmarks

bench:
	scripts/setup.sh test
	.venv/bin/python benchmarks/bench_import.py

clean:
	rm -rf .venv build *.egg-info
