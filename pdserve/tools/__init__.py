"""Tools beside the serving path: the benchmark client, the accuracy evaluation, the demo."""
