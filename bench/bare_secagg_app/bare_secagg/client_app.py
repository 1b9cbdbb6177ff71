"""The ClientApp of the bare SecAgg+ app: Flower's ``secaggplus_mod`` around a constant update.

``secaggplus_mod`` runs the four stages (setup, share keys, collect masked
vectors, unmask) and calls ``train`` only for the masked vector. ``train``
returns ``payload-floats`` zeros with weight 1 (keystay's devices send weight
1 too), so no work is done beyond Flower's protocol. It is a module of its
own, as in Flower's example, so the ClientApp process imports nothing of the
server side.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

client = ClientApp(mods=[secaggplus_mod])


@client.train()
def constant_update(msg: Message, context: Context) -> Message:
    """The masked-vector stage's update: zeros the size of the model, weight 1."""
    floats = int(context.run_config["payload-floats"])
    fitres = FitRes(status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters([np.zeros(floats, dtype=np.float32)]),
                    num_examples=1, metrics={})
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
