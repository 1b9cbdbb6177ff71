"""The ``keystay`` console command: one dispatcher above both sides.

Design
------
The dispatcher names the device's and the server's command groups by string
and imports a group only when it is used, so ``keystay device ...`` never
loads server code (and the reverse). It is the one package allowed to know
both sides; neither side imports it.
"""
