"""Studies built from the pieces: cross-dataset matrix (``cross``) and backbone pruning (``prune``)."""
