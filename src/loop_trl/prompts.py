"""Prompt sources: a ``prompt_function``, a list of prompts, or a ``datasets.Dataset``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["PromptSource", "prompt_rows"]


def prompt_rows(source: Any, column: str = "prompt") -> list[tuple[str, dict]]:
    """``(prompt, metadata)`` rows of a list of strings or a ``datasets.Dataset`` with a ``column`` column."""
    column_names = getattr(source, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        if column not in column_names:
            raise ValueError(f"The prompt dataset has no {column!r} column (columns: {column_names}); "
                             f"rename one with dataset.rename_column(..., {column!r}).")
        return [(row[column], {k: v for k, v in row.items() if k != column}) for row in source]
    if isinstance(source, str):
        raise TypeError("Pass prompts as a list of strings, not a single string.")
    rows = []
    for i, prompt in enumerate(source):
        if not isinstance(prompt, str):
            raise TypeError(f"Prompt {i} is a {type(prompt).__name__}, not a string.")
        rows.append((prompt, {}))
    return rows


class PromptSource:
    """Draws ``(prompts, metadata)`` for one sampling batch of one process.

    * A callable ``prompt_function() -> (prompt, metadata)`` is called once per prompt (DDPO's
      convention; seed its randomness through ``random``/``numpy``, which the trainer seeds).
    * A list of strings, or a ``datasets.Dataset`` with a ``prompt`` column (its other columns
      become the metadata), is walked through in a shuffled order, reshuffled at each pass.
      The order depends only on ``(seed, epoch, batch, process)``, so a resumed run draws the
      same prompts as an uninterrupted one and processes never draw the same slot.
    """

    def __init__(self, source: Callable[[], tuple[str, Any]] | Sequence[str] | Any, seed: int = 0,
                 process_index: int = 0, num_processes: int = 1, column: str = "prompt"):
        self.function = source if callable(source) else None
        self.seed, self.process_index, self.num_processes = seed, process_index, num_processes
        self.rows: list[tuple[str, dict]] = []
        self._cached_order: tuple[int, np.ndarray] | None = None
        if self.function is None:
            self.rows = prompt_rows(source, column)
            if not self.rows:
                raise ValueError("The prompt source is empty; give at least one prompt.")

    def _order(self, data_pass: int) -> np.ndarray:
        """The shuffled order of the rows for one pass over them (cached for the current pass)."""
        if self._cached_order is None or self._cached_order[0] != data_pass:
            self._cached_order = (data_pass, np.random.default_rng([self.seed, data_pass]).permutation(len(self.rows)))
        return self._cached_order[1]

    def draw(self, count: int, epoch: int, batch: int, batches_per_epoch: int) -> tuple[list[str], list[Any]]:
        """``count`` prompts and their metadata for sampling batch ``batch`` of ``epoch``."""
        if self.function is not None:
            pairs = [self.function() for _ in range(count)]
            for pair in pairs:
                if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise TypeError(f"prompt_function must return (prompt: str, metadata), got {pair!r}.")
            return [p for p, _ in pairs], [m for _, m in pairs]
        n = len(self.rows)
        slot = (epoch * batches_per_epoch + batch) * self.num_processes + self.process_index
        prompts, metadata = [], []
        for position in range(slot * count, (slot + 1) * count):
            epoch_of_data, offset = divmod(position, n)
            prompt, meta = self.rows[self._order(epoch_of_data)[offset]]
            prompts.append(prompt)
            metadata.append(meta)
        return prompts, metadata
