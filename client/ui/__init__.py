"""The employee's local page (``keystay device ui``): see :mod:`keystay.client.ui.server`."""
