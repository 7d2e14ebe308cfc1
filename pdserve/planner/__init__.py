"""Planning a cluster before buying it: measured profiles (`pdserve profile`), a discrete-event simulator of
the router, prefill pools, KV transfer and decode pools, and of colocated engines at the same GPU count
(`pdserve plan`), and what the autoscaler takes from it.

- profile.py: the profile JSON (step times vs tokens, batch and context; transfer time vs bytes) and its cost model;
- measure.py: how `pdserve profile` measures one on the machine at hand (CUDA or CPU);
- workload.py: arrivals (Poisson, bursty), length distributions, shared prefixes; published presets;
- sim.py: the simulation itself; stats.py: its numbers, by `pdserve bench`'s own statistics;
- hostload.py: the CPU share engines get on a shared box (a profile's, a run's);
- plan.py: P:D splits, goodput search, the recommendation, Helm values;
- report.py: tables and PNG plots; commands.py: the two subcommands.
"""
