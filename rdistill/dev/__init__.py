"""Development tools: benchmarks, planted mixtures, toy shards and the planted demo."""
