"""Helpers shared by the test suite and the benchmarks: start and stop a real cluster, run kernel cases
under Triton's interpreter. Importable from any folder, so no test or tool edits sys.path."""
