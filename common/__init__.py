"""What the device and the server must agree on, and nothing else.

Design
------
keystay runs in two places that trust each other only through a wire: the
employee's machine (:mod:`keystay.client`) and the ML team's server
(:mod:`keystay.server`). Every contract both sides must read the same way lives
here, once: the vocabulary and its tokenizer, the training windows, the model
and its checkpoint format, the weights digest, wire constants, report formats.

Layering (a unit test parses every module's syntax tree and enforces it)::

    keystay.cli ──► keystay.client ─┐
         │                          ├──► keystay.common ──► keystay.v1 (protos)
         └────────► keystay.server ─┤
                         │          │
                         └► keystay.sim ┘

``keystay.common`` imports neither side; ``keystay.client`` and
``keystay.server`` never import each other.
"""

__version__ = "0.1.0"
