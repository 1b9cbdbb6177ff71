"""Bytes a device's SuperNode sends per round, with and without SecAgg+ in the daemon.

Counts the serialised Flower reply content (``recorddict_to_proto``) a device
sends the server in one round:

* plain (record-level) round: one ``train`` reply, the float32 weights;
* SecAgg+ round (employee-day): the four stage replies the daemon's real
  :class:`~keystay.client.daemon.secagg_stages.SecAggStages` produce (public
  keys, encrypted shares, the masked int64 vector with Flower's factor, the
  unmask shares), for ``--devices`` devices all neighbours of each other.

Both carry the same signed privacy report, which is left out (it is the same
size either way); the model is keystay's default (``ModelConfig()``). Run::

    .venv/bin/python bench/bench_secagg_bytes.py --devices 3
"""

from __future__ import annotations

import argparse
import json
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.serde import recorddict_to_proto

from keystay.client.daemon.secagg_stages import SecAggStages, SessionKey
from keystay.common.model import ModelConfig, initial_weights
from keystay.server.secagg import CLIPPING_RANGE, MODULUS_RANGE, QUANTIZATION_RANGE


def _size(record: dict[str, ConfigRecordValues]) -> int:
    return int(recorddict_to_proto(RecordDict({"configs": ConfigRecord(record)})).ByteSize())


def secagg_round(devices: int, threshold: int) -> dict[str, float]:
    """Per-device bytes of each stage reply, averaged over the devices."""
    weights = initial_weights(ModelConfig(), 0)
    nodes = list(range(1, devices + 1))
    stages = {n: SecAggStages(threshold) for n in nodes}
    keys = {n: SessionKey("bench", 1, n) for n in nodes}
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: devices, Key.SHARE_NUMBER: devices,
             Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: CLIPPING_RANGE,
             Key.TARGET_RANGE: QUANTIZATION_RANGE, Key.MOD_RANGE: MODULUS_RANGE,
             Key.MAX_WEIGHT: 1.0}
    sizes: dict[str, list[int]] = {s: [] for s in Stage.all()}
    pks = {}
    for n in nodes:
        pks[n] = stages[n].setup(keys[n], ConfigRecord(dict(setup)))
        sizes[Stage.SETUP].append(_size(pks[n]))
    record = {str(n): [pk[Key.PUBLIC_KEY_1], pk[Key.PUBLIC_KEY_2]] for n, pk in pks.items()}
    inbox: dict[int, list[tuple[int, bytes]]] = {n: [] for n in nodes}
    for n in nodes:
        out = stages[n].share_keys(keys[n], ConfigRecord({**record, Key.STAGE: Stage.SHARE_KEYS}))
        sizes[Stage.SHARE_KEYS].append(_size(out))
        for dst, ct in zip(cast(list[int], out[Key.DESTINATION_LIST]),
                           cast(list[bytes], out[Key.CIPHERTEXT_LIST]), strict=True):
            inbox[dst].append((n, ct))
    gamma = QUANTIZATION_RANGE / (2 * CLIPPING_RANGE)
    for n in nodes:
        masking = stages[n].open_masking(keys[n], ConfigRecord({
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
            Key.SOURCE_LIST: [s for s, _ in inbox[n]],
            Key.CIPHERTEXT_LIST: [c for _, c in inbox[n]]}))
        encoded = [np.full(w.shape, round(gamma * CLIPPING_RANGE), np.int64) for w in weights]
        sizes[Stage.COLLECT_MASKED_VECTORS].append(
            _size(stages[n].masked_result(masking.mask(encoded))))
    for n in nodes:
        out = stages[n].unmask(keys[n], ConfigRecord({
            Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: nodes, Key.DEAD_NODE_ID_LIST: []}))
        sizes[Stage.UNMASK].append(_size(out))
    return {stage: float(np.mean(v)) for stage, v in sizes.items()}


def plain_round() -> int:
    weights = initial_weights(ModelConfig(), 0)
    content = RecordDict({"arrays": ArrayRecord([np.asarray(w) for w in weights])})
    return int(recorddict_to_proto(content).ByteSize())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--threshold", type=int, default=2)
    args = parser.parse_args()
    dim = sum(w.size for w in initial_weights(ModelConfig(), 0))
    stages = secagg_round(args.devices, args.threshold)
    plain = plain_round()
    total = sum(stages.values())
    print(json.dumps({
        "model_parameters": int(dim),
        "devices": args.devices,
        "plain_round_bytes": plain,
        "secagg_round_bytes": round(total),
        "secagg_stage_bytes": {k: round(v) for k, v in stages.items()},
        "ratio": round(total / plain, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
