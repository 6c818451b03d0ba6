"""Coreset baselines (PDS tables 2 and 5): real pairs selected from an embedding store, in the distilled format."""
