"""`python -m embedding_assets.cli`: the console script."""

from embedding_assets.cli.main import entry

entry()
