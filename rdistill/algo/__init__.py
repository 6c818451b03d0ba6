"""The pure algorithm (numpy / faiss / scipy; no Ray, no I/O): prune, k-means, matching, cells, retrieval."""
