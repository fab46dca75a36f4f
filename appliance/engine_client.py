"""The engines this web process has loaded, by variant name."""
import threading

_lock = threading.Lock()
_engines: dict = {}


def register(name: str, engine) -> None:
    with _lock:
        _engines[name] = engine


def unregister(name: str):
    """Remove and return the engine serving name, or None."""
    with _lock:
        return _engines.pop(name, None)


def get(name: str):
    with _lock:
        return _engines.get(name)


def names() -> list[str]:
    with _lock:
        return sorted(_engines)
