"""Tools beside the serving path: the benchmark client, the accuracy evaluation, the demo (each imported only
when its `pdserve` subcommand runs), and random model weights for benchmarks and tests."""
