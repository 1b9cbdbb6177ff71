"""The employee-day mechanism: what one device adds to a securely aggregated round.

The privacy unit is the employee-day (one block of the store). Each round a
device samples its eligible days in secret, trains on each chosen day
separately, clips each day's update, sums them, and adds its share of the
noise *before* the sum is masked for secure aggregation
(:mod:`keystay.client.employee_day.mechanism`). The noise is discrete
(:mod:`keystay.client.employee_day.discrete_gaussian`) so that the shares of
many devices add up, inside SecAgg's modular arithmetic, to a sum that
carries the noise of all of them.

numpy only: the daemon runs this without torch.
"""
