"""keystay's employee-machine side: capture, store, policy, ledger, trainer, daemon."""

from keystay.common import __version__

__all__ = ["__version__"]
