"""The bare Flower app of bench/bench_round.py (see app.py)."""
