"""The floor of a Flower round: a one-phase ServerApp and an echo ClientApp.

Flower's stock pieces only: the ServerApp uses the ``Grid`` it is given as is
(``send_and_receive`` with Flower's own pull interval), and the ClientApp
imports nothing but ``flwr`` and returns the arrays it received. Each round
sends ``payload-floats`` float32 numbers (the bench sets it to keystay's model
size, so both apps move the same bytes) to every connected node and waits for
every reply; its wall time is appended to ``times-file`` as one JSON line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def echo(msg: Message, context: Context) -> Message:
    """Reply with the arrays received: no work, only Flower's own cost."""
    return Message(content=RecordDict({"arrays": msg.content.array_records["arrays"]}),
                   reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` one-phase rounds over all ``min-nodes`` nodes."""
    config = context.run_config
    rounds = int(config["num-server-rounds"])
    min_nodes = int(config["min-nodes"])
    payload = np.zeros(int(config["payload-floats"]), dtype=np.float32)
    times_file = Path(str(config["times-file"]))
    while len(nodes := list(grid.get_node_ids())) < min_nodes:
        time.sleep(1.0)
    for server_round in range(1, rounds + 1):
        started = time.time()
        messages = [
            Message(content=RecordDict({"arrays": ArrayRecord([payload])}),
                    message_type="train", dst_node_id=node)
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages))
        seconds = time.time() - started
        answered = sum(1 for reply in replies if reply.has_content())
        with times_file.open("a") as out:
            out.write(json.dumps({"round": server_round, "seconds": round(seconds, 3),
                                  "nodes": len(nodes), "answered": answered}) + "\n")
