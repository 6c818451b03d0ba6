"""Input and output: the embedding store, WebDataset shards, and output files (atomic writes, markers, locks)."""
