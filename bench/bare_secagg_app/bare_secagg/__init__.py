"""The bare SecAgg+ Flower app of bench/bench_round.py (see app.py)."""
