"""Canonical JSON: the bytes a device signs and the server checks.

Design
------
Privacy reports (:mod:`keystay.client.ledger.report`,
:mod:`keystay.server.ledger.verify`) and enrollment requests
(:mod:`keystay.client.enroll`, :mod:`keystay.server.deploy.enrollment`) are
signed over one byte string per JSON value, so that two different byte
strings never stand for the same value: UTF-8 JSON, keys sorted, separators
``","`` and ``":"``, ASCII escapes, floats as Python's ``repr`` (the
shortest string that round-trips), and no NaN or Infinity.

Why not RFC 8785 (JCS, the ``rfc8785`` package): it writes numbers as
ECMAScript does, so ``1.0`` becomes ``1`` and ``1e-07`` becomes ``1e-7``.
Every report and request already signed (and stored in ledgers, which
re-verify them) uses the form above; switching means a new report format
version (``keystay.privacy-report.v2``) that servers accept beside v1. Until
then the form stays, written once, here.

>>> canonical_json({"b": 1.0, "a": "é"})
b'{"a":"\\\\u00e9","b":1.0}'
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of a JSON value (see the module docstring).

    Raises
    ------
    ValueError
        If a float in ``obj`` is NaN or infinite.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("utf-8")
