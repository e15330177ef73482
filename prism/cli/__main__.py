"""``python -m prism.cli``: the same as the ``prism`` console script."""

from prism.cli.main import run

run()
