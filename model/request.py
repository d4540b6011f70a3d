"""One generation request as the engine's driver takes it: a tokenised prompt and its settings.

In a module of its own, importing neither JAX nor Ray, so that the serving app's CPU deployments
(ingress, batcher) can build and pass requests without loading the engine (app.protocol).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Sequence


@dataclasses.dataclass
class Request:
    prompt_ids: Sequence[int]
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = a fresh random seed
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()  # stop strings, matched on the detokenised text
    stop_at_eos: bool = False
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
