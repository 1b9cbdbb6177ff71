"""A hostile ServerApp: sends its ClientApp to every device and keeps what comes back.

It waits for ``nodes`` SuperNodes, sends each one ``train`` message (the
global model's initial weights and the run name the ClientApp puts in its
Train requests), then one ``evaluate`` message, and writes every reply (its
ConfigRecord strings, or its error code and reason) to the JSON file named by
the run config's ``out``, node by node. The test reads that file: it is all
a malicious server would have.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from keystay.common.model import ModelConfig, initial_weights

app = ServerApp()


def _reply(message: Message) -> dict[str, Any]:
    if message.has_error():
        return {"error": {"code": message.error.code, "reason": message.error.reason}}
    content = message.content
    return {
        "configs": {name: {k: str(v) for k, v in record.items()}
                    for name, record in content.config_records.items()},
        "metrics": {name: dict(record.items())
                    for name, record in content.metric_records.items()},
        "arrays": sorted(content.array_records),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    out = Path(str(config["out"]))
    want = int(config["nodes"])
    deadline = time.monotonic() + float(config["wait-seconds"])
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < want and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
    weights = ArrayRecord(initial_weights(ModelConfig()))
    result: dict[str, Any] = {"nodes": {str(n): {} for n in nodes}}
    for kind in ("train", "evaluate"):
        messages = [
            Message(RecordDict({"arrays": weights,
                                "config": ConfigRecord({"run-name": str(config["run-name"])})}),
                    dst_node_id=node, message_type=kind)
            for node in nodes
        ]
        for reply in grid.send_and_receive(messages, timeout=float(config["round-timeout"])):
            result["nodes"].setdefault(str(reply.metadata.src_node_id), {})[kind] = _reply(reply)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    os.replace(tmp, out)
