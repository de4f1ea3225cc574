"""Explicit state-transition tables for the auth machines, and diagrams drawn from them.

Each machine names its states and its inputs as enums and writes every legal move down in
one nested mapping, ``{state: {input: next_state}}``, in the style of h11's ``_state.py``.
The machine asks the table before it changes state; a move that is not in the table is an
error whose kind (the client's fault, the upstream's, or a bug of ours) the machine picks.

Because the table is data, :meth:`TransitionTable.to_dot` can draw it::

    python -c "from proxy.protocol.imap import state_diagrams; print(state_diagrams())" \\
        | dot -Tsvg > imap.svg
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = ["TransitionTable"]

StateT = TypeVar("StateT", bound=enum.Enum)
InputT = TypeVar("InputT", bound=enum.Enum)


class TransitionTable(Generic[StateT, InputT]):
    """All the legal moves of one state machine: ``(state, input) -> next state``."""

    __slots__ = ("_moves", "name")

    def __init__(self, name: str, moves: Mapping[StateT, Mapping[InputT, StateT]]) -> None:
        self.name = name
        self._moves: dict[StateT, dict[InputT, StateT]] = {
            state: dict(edges) for state, edges in moves.items()
        }

    def __repr__(self) -> str:
        return f"<TransitionTable {self.name}: {sum(1 for _ in self.edges())} moves>"

    def next_state(self, state: StateT, what: InputT) -> StateT | None:
        """Where ``what`` leads from ``state``, or ``None`` if it is not allowed there."""
        return self._moves.get(state, {}).get(what)

    def allowed(self, state: StateT) -> frozenset[InputT]:
        """The inputs that ``state`` accepts."""
        return frozenset(self._moves.get(state, {}))

    def states(self) -> frozenset[StateT]:
        """Every state the table names, as a source or as a target."""
        return frozenset(state for edge in self.edges() for state in (edge[0], edge[2]))

    def edges(self) -> Iterator[tuple[StateT, InputT, StateT]]:
        for state, edges in self._moves.items():
            for what, target in edges.items():
                yield state, what, target

    def to_dot(self) -> str:
        """The table as a Graphviz digraph; self-loops and parallel edges are merged."""
        labels: dict[tuple[StateT, StateT], list[str]] = {}
        for state, what, target in self.edges():
            labels.setdefault((state, target), []).append(str(what.value))
        lines = [f'digraph "{self.name}" {{', "  rankdir=LR;", "  node [shape=box];"]
        states: dict[StateT, None] = {}
        for source, target in labels:
            states.setdefault(source)
            states.setdefault(target)
        lines += [f'  "{state.name}";' for state in states]
        for (source, target), names in labels.items():
            label = "\\n".join(names)
            lines.append(f'  "{source.name}" -> "{target.name}" [label="{label}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"
