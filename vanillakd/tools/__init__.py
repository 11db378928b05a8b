"""The commands built on top of training: compare, report, demo and the benchmarks."""
