"""Settings of one server (what ``softprompt serve`` options set)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional


@dataclasses.dataclass
class ServerConfig:
    """Args:
        model_id: the id of the base model in ``/v1/models`` (requests for it use no soft prompt).
        api_key: when set, every endpoint needs ``Authorization: Bearer <api_key>``.
        adapter_root: the only folder run-time adapter loads may read from.
        enable_adapter_loading: allow ``/v1/load_adapter`` and ``/v1/unload_adapter``.
        max_waiting: more queued requests than this are answered 429 with ``Retry-After``.
        max_prompt_tokens: longest prompt accepted (tokens).
        max_body_bytes: largest request body accepted (413 above).
        default_max_tokens: ``max_tokens`` of a chat request that gives none (completions: 16).
        grace_s: on SIGTERM, how long requests in flight may go on before they are aborted.
    """

    model_id: str
    api_key: Optional[str] = None
    adapter_root: Optional[Path] = None
    enable_adapter_loading: bool = False
    max_waiting: int = 256
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    grace_s: float = 30.0
