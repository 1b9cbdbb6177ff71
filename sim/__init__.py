"""Simulated employees: keystroke and click days generated from a seed.

Design
------
Real devices record real people; everything else (the demo, the tests, the
benchmarks and the server's own held-out evaluator) needs behaviour that looks
like an employee's without being one. The generator lives in its own package,
outside the device's capture code, so the server can run it without importing
device code. It depends only on :mod:`keystay.common`.
"""
