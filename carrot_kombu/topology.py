"""What the manager re-creates on every new connection: declared entities and setup functions."""

from __future__ import annotations

import threading
from typing import Any, Callable

__all__ = ("Topology",)

SetupFn = Callable[[Any], Any]


class Topology:
    """Exchanges, queues (with their bindings) and setup functions, in order.

    Thread-safe registry; :meth:`apply` runs everything on one channel.  A
    server-named queue (``Queue("")``) is declared anew with an empty name on
    every connection: the name the broker gave it last time died with the
    connection (and ``amq.*`` names cannot be declared by clients).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entities: list[Any] = []
        self._server_named: set[int] = set()
        self._setups: list[SetupFn] = []

    def after_fork(self) -> None:
        """In a forked child: a parent thread may have held the lock at fork time."""
        self._lock = threading.Lock()

    def add_entities(self, entities: tuple[Any, ...]) -> None:
        with self._lock:
            for entity in entities:
                if not any(e is entity for e in self._entities):
                    self._entities.append(entity)
                    if getattr(entity, "name", None) == "" and hasattr(entity, "queue_arguments"):
                        self._server_named.add(id(entity))

    def add_setup(self, fn: SetupFn) -> None:
        with self._lock:
            if fn not in self._setups:
                self._setups.append(fn)

    def remove_setup(self, fn: SetupFn) -> None:
        with self._lock:
            if fn in self._setups:
                self._setups.remove(fn)

    def declares(self, entity: Any) -> bool:
        with self._lock:
            return any(e is entity for e in self._entities)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._entities or self._setups)

    def apply(self, channel: Any, entities: tuple[Any, ...] = ()) -> None:
        """Declare ``entities`` (default: all) and run the setup functions (all, in order).

        Raises:
            Exception: The first failure, as raised by kombu or the setup function.
        """
        with self._lock:
            todo = list(entities) if entities else list(self._entities)
            setups = [] if entities else list(self._setups)
            fresh = set(self._server_named)
        for entity in todo:
            if id(entity) in fresh:
                entity.name = ""
            bound = entity.bind(channel)  # kombu binds a copy
            bound.declare()
            if id(entity) in fresh:
                entity.name = bound.name  # users read the broker-given name from their object
        for fn in setups:
            fn(channel)
