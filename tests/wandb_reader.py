"""Reads back an offline W&B run's ``.wandb`` file (wandb ships no Python reader for it).

Format (see DESIGN.md): a 7-byte header (``:W&B``, 2-byte magic, 1-byte version), then
LevelDB-log framing: 32 KiB blocks; each chunk has a 7-byte header (crc32, uint16 length,
type FULL=1 FIRST=2 MIDDLE=3 LAST=4); a block tail shorter than 7 bytes is padding. The
payloads are serialized ``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
RECORD: Any = getattr(wandb_internal_pb2, "Record")  # noqa: B009 (no stubs for mypy)


def read_records(path: str | Path) -> list[Any]:
    """Every ``Record`` in the file, in order (protobuf messages: no type stubs, so ``Any``)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a .wandb file")
    records: list[Any] = []
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # padding at the end of a block
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero-filled tail of a file still being written
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = RECORD()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def item_value(item: Any) -> Any:
    """The value of a ``HistoryItem`` (typed fields in new files, ``value_json`` in old ones)."""
    kind = item.WhichOneof("value") if item.DESCRIPTOR.oneofs_by_name.get("value") else None
    if kind is not None and kind != "value_json":
        value = getattr(item, kind)
        return json.loads(value) if kind == "json" else value
    return json.loads(item.value_json) if item.value_json else None


def history(path: str | Path) -> list[dict[str, Any]]:
    """One dict per committed history row: key -> value (keys joined with '/' if nested)."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = item_value(item)
            rows.append(row)
    return rows


def alerts(path: str | Path) -> list[Any]:
    """The ``AlertRecord``s: ``title``, ``text``, ``level``, ``wait_duration`` (ms)."""
    return [r.alert for r in read_records(path) if r.WhichOneof("record_type") == "alert"]


def metrics(path: str | Path) -> list[Any]:
    """The ``MetricRecord``s written by ``define_metric``."""
    return [r.metric for r in read_records(path) if r.WhichOneof("record_type") == "metric"]
