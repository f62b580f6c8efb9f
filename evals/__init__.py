"""Benchmarks and evaluations (`qzoom.evals`): performance benchmarks that print ratios measured side by side."""
