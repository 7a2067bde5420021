"""The concurrency contract of a routed model: forwards share the library, changes to it are exclusive.

Any number of threads may run forwards at once: every forward of the base model holds the lock as a reader (forward
hooks, so every PEFT entry point is covered), and so does a whole ``generate`` called through a
``PeftModelForCausalLM`` (``task_type="CAUSAL_LM"``; the bare ``PeftModel`` calls the transformers model's
``generate`` directly, so each step is consistent but a change may land between steps). ``add_expert``,
``remove_expert``, ``set_phase``, ``set_prototype`` and PEFT's adapter verbs wait until the running forwards finish,
and forwards that start meanwhile wait for the change, so a forward sees the library before or after a change, never
a mix. Both sides are re-entrant in one thread (a forward inside ``generate``; a change that runs a forward).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class LibraryLock:
    """A re-entrant readers-writer lock, fair both ways: a waiting writer goes before readers that arrive after it,
    and readers that waited through one change go before the next one."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers: dict[int, int] = {}  # thread id -> re-entrant depth
        self._writer: int | None = None
        self._writer_depth = 0
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._admitted = 0  # readers let in before the next change (those that waited through the last one)

    def __deepcopy__(self, memo) -> LibraryLock:
        return LibraryLock()  # a copied model is another model, with its own lock

    def __reduce__(self):
        return LibraryLock, ()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the library unchanged for the block (a forward, a generate call)."""
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    def acquire_read(self) -> None:
        """Start holding the library unchanged (``release_read`` ends it; forward hooks use the pair)."""
        me = threading.get_ident()
        with self._condition:
            if self._writer != me and me not in self._readers:
                # a waiting change goes first, but as many readers as waited through a change go before the next
                self._readers_waiting += 1
                while self._writer is not None or (self._writers_waiting and not self._admitted):
                    self._condition.wait()
                self._readers_waiting -= 1
                self._admitted = max(0, self._admitted - 1)
            self._readers[me] = self._readers.get(me, 0) + 1

    def release_read(self) -> None:
        """End one ``acquire_read`` of this thread."""
        me = threading.get_ident()
        with self._condition:
            if me not in self._readers:
                return
            self._readers[me] -= 1
            if not self._readers[me]:
                del self._readers[me]
                self._condition.notify_all()

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Change the library in the block, alone."""
        me = threading.get_ident()
        with self._condition:
            if self._writer != me:
                if me in self._readers:
                    raise RuntimeError("The expert library cannot change inside a forward of the same model (a hook "
                                       "or callback called add_expert/remove_expert/set_phase); do it after.")
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers or self._admitted:
                        self._condition.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = me
            self._writer_depth += 1
        try:
            yield
        finally:
            with self._condition:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._admitted = self._readers_waiting
                    self._condition.notify_all()
