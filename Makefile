# The checks a pull request must pass, as transformers and diffusers name them: `make style` fixes, `make quality`
# checks, `make test` runs the whole suite (`make test-fast` leaves out the tests marked slow).
check_dirs := modeling_streetclip training eval model_card tests

.PHONY: style quality test test-fast

style:
	ruff check --fix $(check_dirs)
	ruff format $(check_dirs)

quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)

test:
	python -m pytest -n auto

test-fast:
	python -m pytest -n auto -m "not slow"
