"""The ClientApp starts light: Flower runs a fresh process for every message.

``keystay.client.app`` is what that process imports besides Flower. It must
not pull in torch or any of the device's own machinery (store, trainer,
ledger, daemon, capture): it only forwards a request to the daemon's socket.
Measured with ``python -X importtime -c "import keystay.client.app"``.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: Packages the ClientApp process must never load.
HEAVY = ("torch", "opacus", "scipy", "dp_accounting")
#: keystay's device side: the daemon's, never the server-shipped ClientApp's.
DEVICE_SIDE = ("keystay.client.store", "keystay.client.trainer", "keystay.client.ledger",
               "keystay.client.daemon", "keystay.client.capture", "keystay.common.model")


def test_the_clientapp_imports_nothing_heavy_and_nothing_of_the_device() -> None:
    code = ("import json, sys; import keystay.client.app; "
            "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    device = [m for m in loaded if m.startswith(DEVICE_SIDE)]
    assert not heavy, f"the ClientApp process loads {heavy}"
    assert not device, f"the ClientApp process loads device-side modules {device}"
    assert "keystay.client.federation_client" in loaded  # the test sees real imports
