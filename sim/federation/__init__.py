"""``keystay sim``: a federation of simulated employees on Flower's Simulation Engine.

The one place where the server side and the device side of keystay meet in
one process (besides ``cli``): the deployment's own ServerApp
(:data:`keystay.server.app.app`) drives virtual nodes whose ClientApp calls
each simulated employee's real :class:`~keystay.client.daemon.core.DeviceCore`
in-process (:mod:`keystay.sim.federation.device`), through the daemon's own
``Federation`` servicer, instead of over the daemon's socket.

``keystay.sim.employees`` stays a leaf (server and client both generate
employees with it); this subpackage sits above both sides.
"""
