"""Model-hub access that fails fast offline: the weights come from the local cache or not at all."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

HUB_HOST = "huggingface.co"


def online(host: str = HUB_HOST) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_access() -> Iterator[None]:
    """Silence huggingface_hub's retry chatter (our own error says what went wrong); offline,
    answer from the local cache at once instead of retrying for a minute."""
    import huggingface_hub.constants as hub

    previous, was_offline = logging.root.manager.disable, hub.HF_HUB_OFFLINE
    logging.disable(logging.ERROR)
    hub.HF_HUB_OFFLINE = was_offline or not online()
    try:
        yield
    finally:
        logging.disable(previous)
        hub.HF_HUB_OFFLINE = was_offline
