"""What the handlers share for the app's lifetime: the engine, the served model's name and the response store."""

from __future__ import annotations

import time
from collections import OrderedDict

from gptoss.tokenizer import get_tokenizer

MAX_STORED_RESPONSES = 1000


class ResponseStore:
    """The /v1/responses objects kept for GET and previous_response_id: in memory only, oldest dropped first."""

    def __init__(self, capacity: int = MAX_STORED_RESPONSES):
        self.capacity = capacity
        self._entries: OrderedDict[str, dict] = OrderedDict()

    def get(self, response_id: str) -> dict | None:
        """-> {"response": the Response object, "items": the conversation's input + output items} or None."""
        return self._entries.get(response_id)

    def put(self, response: dict, items: list[dict]) -> None:
        self._entries[response["id"]] = {"response": response, "items": items}
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class ServerState:
    def __init__(self, engine, model_name: str, api_key: str | None):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.created = int(time.time())  # the model's "created" in /v1/models
        self.tokenizer = get_tokenizer()
        self.responses = ResponseStore()
