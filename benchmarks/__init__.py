"""Benchmarks (`make bench`): speed and memory figures printed as ratios measured in one run."""
