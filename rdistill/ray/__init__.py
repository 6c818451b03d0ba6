"""The Ray layer: joining or starting a cluster, sizing actor pools, Ray Data adapters."""
