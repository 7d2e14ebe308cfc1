"""What both worker kinds share: the Ray-facing base (an engine at the pool's precision with its KV connector,
the stats the router balances on) and the typed messages that cross between router and workers."""
