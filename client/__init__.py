"""keystay's employee-machine side: capture, tokens, store, policy, ledger, trainer, daemon."""

__version__ = "0.1.0"
