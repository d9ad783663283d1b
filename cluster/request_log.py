"""Structured per-request logs: one JSON object per event, keyed by request id.

Events through a request's life: `accepted`, `placed` (pool, replica), `handoff` (prefill rank ->
decode replica), `kv_taken` (received or refilled), `failover` (the samples that resume, and why),
`finished` (reason, tokens, time to first token, total), `aborted`, `failed`. They go to the
`moecluster.requests` logger at INFO as a JSON line, so any log shipper can index them by
`request_id`; the same dict rides on the record as `record.request_event`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

logger = logging.getLogger("moecluster.requests")


def log_event(request_id: str, event: str, **fields: Any) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    record = {"ts": round(time.time(), 6), "request_id": request_id, "event": event, **fields}
    logger.info(json.dumps(record, default=str, separators=(",", ":")), extra={"request_event": record})
