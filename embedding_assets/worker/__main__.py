"""`python -m embedding_assets.worker`: the local inference worker."""

from embedding_assets.worker.server import main

main()
