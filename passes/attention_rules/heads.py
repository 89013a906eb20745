"""The head split that queries, keys, values and the rotated tensor all go through:
`Transpose(Reshape(x, [B, S, H, D]), perm [0, 2, 1, 3])`, with a constant head count H and size D."""
from __future__ import annotations

from pipeline.core.graph import attribute
from pipeline.core.rewrite import GraphView, Mismatch

BNSH_TO_BSNH = [0, 2, 1, 3]  # the head split's (and merge's) Transpose


def head_split(view: GraphView, tensor: str, what: str) -> tuple[int, int]:
    """Transpose(Reshape(x, [B, S, H, D]), perm [0, 2, 1, 3]) -> (H, D)."""
    transpose = view.producer.get(tensor)
    if transpose is None or transpose.op_type != "Transpose" or attribute(transpose, "perm") != BNSH_TO_BSNH:
        raise Mismatch(f"{what} is not split into heads by Reshape + Transpose [0, 2, 1, 3]")
    reshape = view.parent(transpose.input[0], ["Reshape"], f"{what}'s head split")
    dims = shape_tail(view, reshape.input[1])
    if dims is None:
        raise Mismatch(f"{what}'s head split has no constant head count and size")
    return dims


def shape_tail(view: GraphView, shape: str) -> tuple[int, int] | None:
    """The last two entries of a 4-D Reshape target, when constant: a constant, or a Concat of pieces."""
    value = view.ints(shape)
    if value is not None:
        return (value[2], value[3]) if len(value) == 4 and min(value[2:]) > 0 else None
    concat = view.producer.get(shape)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    tail = [view.ints(i) for i in concat.input[2:]]
    if any(t is None or len(t) != 1 or t[0] <= 0 for t in tail):
        return None
    return tail[0][0], tail[1][0]


def shape_rank(view: GraphView, shape: str) -> int | None:
    """How many dims a Reshape target has: a constant's length, or a Concat's piece count."""
    value = view.ints(shape)
    if value is not None:
        return len(value)
    node = view.producer.get(shape)
    return len(node.input) if node is not None and node.op_type == "Concat" else None
