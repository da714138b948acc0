"""``tf.gradients``: reverse-mode automatic differentiation over the graph.

One topological sort of the ops between ``xs`` and ``ys``, then one reversed
loop that asks each op's ``grad`` function to build the gradient ops of its
inputs; gradients reaching a tensor along several paths are summed (AddN).
"""

from __future__ import annotations

from .core import Tensor, Variable, convert_to_tensor, topological_order
from .ops import add_n, ones_like


def _as_tensor(x):
    return x.value() if isinstance(x, Variable) else x


def gradients(ys, xs, grad_ys=None, name="gradients"):
    """Symbolic d(sum ys)/d(xs): a list with one Tensor per x (None where no path leads from x to ys)."""
    ys = [_as_tensor(y) for y in (ys if isinstance(ys, (list, tuple)) else [ys])]
    single = not isinstance(xs, (list, tuple))
    xs = [_as_tensor(x) for x in ([xs] if single else xs)]
    if grad_ys is None:
        grad_ys = [None] * len(ys)
    for t in ys + xs:
        if not isinstance(t, Tensor):
            raise TypeError(f"gradients needs tensors or variables; got {t!r}")

    # ops on some path from xs to ys
    reach_from_x = set()
    frontier = [x.op for x in xs]
    x_ops = {x.op for x in xs}
    consumers = {}
    for op in ys[0].graph.get_operations():
        for t in op.inputs:
            consumers.setdefault(t.op, []).append(op)
    while frontier:
        op = frontier.pop()
        if op in reach_from_x:
            continue
        reach_from_x.add(op)
        frontier.extend(consumers.get(op, []))
    reach_to_y = set()
    frontier = [y.op for y in ys]
    while frontier:
        op = frontier.pop()
        if op in reach_to_y:
            continue
        reach_to_y.add(op)
        if op not in x_ops:
            frontier.extend(t.op for t in op.inputs)
    between = reach_from_x & reach_to_y

    order = topological_order([y.op for y in ys if y.op in between],
                              lambda op: [] if op in x_ops else [t.op for t in op.inputs if t.op in between])

    grads = {}  # tensor -> list of gradient tensors

    with ys[0].graph.name_scope(name):
        for y, gy in zip(ys, grad_ys):
            grads.setdefault(y, []).append(convert_to_tensor(gy) if gy is not None else ones_like(y, name="grad_ys"))
        for op in reversed(order):
            if op in x_ops and all(t in xs for t in op.outputs):
                continue
            out_grads = [add_n(grads[t]) if grads.get(t) else None for t in op.outputs]
            if all(g is None for g in out_grads):
                continue
            if op.grad is None:
                if any(t.op in between for t in op.inputs):
                    raise LookupError(f"no gradient defined for op {op.name} of type {op.type}")
                continue
            in_grads = op.grad(op, *out_grads)
            for t, g in zip(op.inputs, in_grads):
                if g is not None and t.op in between:
                    grads.setdefault(t, []).append(g)
        return [add_n(grads[x]) if grads.get(x) else None for x in xs][0 if single else slice(None)]
