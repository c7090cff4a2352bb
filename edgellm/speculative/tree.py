"""Token trees (SpecInfer): several drafts merged into a trie and verified in one target batch.

Each candidate draft is a branch with its own sequence id; its tokens see the context (copied into
every branch sequence, which in a unified KV cache only tags the cells) and their own ancestors,
never a sibling branch. The target's greedy choice walks down the trie; the accepted path is copied
back into sequence 0 and every branch sequence is dropped, so the cache holds only accepted text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import Sampler


@dataclass
class Node:
    token: int
    parent: int  # index of the parent node, -1: the pending token at the root
    depth: int  # 1 for children of the root
    branches: set[int] = field(default_factory=set)  # sequence ids of the drafts through this node


def build(candidates: Sequence[Sequence[int]]) -> list[Node]:
    """Merge drafts into a trie; candidate i is branch (sequence id) i + 1."""
    nodes: list[Node] = []
    children: dict[tuple[int, int], int] = {}
    for branch, draft in enumerate(candidates, start=1):
        parent = -1
        for depth, token in enumerate(draft, start=1):
            key = (parent, token)
            if key not in children:
                children[key] = len(nodes)
                nodes.append(Node(token, parent, depth))
            parent = children[key]
            nodes[parent].branches.add(branch)
    return nodes


def verify(engine: Engine, sampler: Sampler, pending: int, nodes: list[Node], n_branches: int) -> tuple[list[int], int]:
    """Decode the tree after `pending`; return (accepted tokens, the target's next token). Greedy."""
    start = len(engine.kv_tokens)  # position of the pending token
    for branch in range(1, n_branches + 1):
        engine.seq.share_cells(branch)  # the context, visible to every branch
    tokens = [pending] + [n.token for n in nodes]
    positions = [start] + [start + n.depth for n in nodes]
    seq_ids = [list(range(n_branches + 1))] + [sorted(n.branches) for n in nodes]
    engine.decode_tree(tokens, positions, seq_ids)

    accepted: list[int] = []
    node, row = -1, 0
    while True:
        best = sampler.sample(engine.ctx, row)
        child = next((i for i, n in enumerate(nodes) if n.parent == node and n.token == best), None)
        if child is None:
            break
        accepted.append(best)
        node, row = child, child + 1

    keep = min(nodes[node].branches) if node >= 0 else None
    if keep is not None:  # tag the accepted path's cells with sequence 0
        engine.sequence(keep).share_cells(0, start + 1, start + 1 + len(accepted))
    for branch in range(1, n_branches + 1):
        engine.sequence(branch).clear()
    engine.kv_tokens.extend([pending, *accepted])
    return accepted, best
