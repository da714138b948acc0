"""Pictures the labs draw that take more than a few lines: int8 instruction lanes and memory layouts.

Every number a figure shows is computed by the library function the labs teach (``int8.maddubs_pair`` for the
saturating pair, ``kernels.to_blocked`` for the blocked layout), never typed in, so a picture cannot disagree
with the code. Each ``*_values`` / ``*_order`` function returns the data and is tested; the drawing function
beside it only lays that data out with matplotlib and returns the figure.
"""

from __future__ import annotations

import numpy as np

__all__ = ["int8_lane_values", "int8_lanes", "layout_order", "memory_order", "trace_events", "trace_timeline", "compute_ops",
           "fusion_before_after", "roofline_values", "roofline_plot"]

LAYOUTS = ("NCHW", "NHWC", "nChw16c")


def _ints(values, name, lo, hi):
    values = list(values)
    if len(values) != 4:
        raise ValueError(f"{name} must hold the 4 bytes of one 32-bit lane, got {len(values)} values")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise ValueError(f"{name} values must be integers in [{lo}, {hi}], got {v!r}")
    return [int(v) for v in values]


def int8_lane_values(a, b):
    """What each instruction leaves in one 32-bit lane, for 4 u8 activations ``a`` and 4 s8 weights ``b``.

    Parameters
    ----------
    a : sequence of 4 ints in [0, 255]
    b : sequence of 4 ints in [-128, 127]

    Returns
    -------
    dict
        ``products`` (the 4 exact products), ``pairs_s16`` (``vpmaddubsw``'s two saturated pair sums),
        ``saturated`` (which pairs were clamped), ``avx512bw_s32`` (``vpmaddwd`` with ones: the two pairs
        widened and added), ``vnni_s32`` (``vpdpbusd``: the four products added exactly).
    """
    a = _ints(a, "a", 0, 255)
    b = _ints(b, "b", -128, 127)
    from .int8 import maddubs_pair

    products = [x * y for x, y in zip(a, b)]
    pairs = [maddubs_pair(a[0], b[0], a[1], b[1]), maddubs_pair(a[2], b[2], a[3], b[3])]
    exact_pairs = [products[0] + products[1], products[2] + products[3]]
    return {
        "products": products,
        "pairs_s16": [int(p) for p in pairs],
        "saturated": [int(p) != e for p, e in zip(pairs, exact_pairs)],
        "avx512bw_s32": int(pairs[0]) + int(pairs[1]),
        "vnni_s32": sum(products),
    }


def _box(ax, x, y, width, text, color="white", height=0.7):
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x + 0.05, y), width - 0.1, height, facecolor=color, edgecolor="black", lw=1))
    ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=9)


def _arrow(ax, x0, y0, x1, y1):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=0.8, color="gray"))


def int8_lanes(a=(255, 255, 10, 20), b=(127, 127, -3, 4)):
    """Draw one 32-bit lane: AVX512-BW's ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` beside VNNI's ``vpdpbusd``.

    The accumulator starts at 0. A pair that ``vpmaddubsw`` saturated is drawn red. Returns the figure.
    """
    import matplotlib.pyplot as plt

    v = int8_lane_values(a, b)
    a, b = list(a), list(b)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, title in zip(axes, ("before VNNI (AVX512-BW): 3 instructions", "VNNI: vpdpbusd, 1 instruction")):
        for i in range(4):
            _box(ax, i, 4.0, 1, f"a{i}={a[i]}", "#dbe9f6")
            _box(ax, i, 3.1, 1, f"b{i}={b[i]}", "#fde0c5")
        ax.text(-0.1, 4.35, "u8", ha="right", va="center", fontsize=9)
        ax.text(-0.1, 3.45, "s8", ha="right", va="center", fontsize=9)
        ax.set_title(title, fontsize=11)
        ax.set_xlim(-0.8, 4.2)
        ax.set_ylim(-0.3, 4.9)
        ax.axis("off")
    left, right = axes
    for k in range(2):
        text = f"a{2 * k}b{2 * k} + a{2 * k + 1}b{2 * k + 1}\n= {v['pairs_s16'][k]}"
        if v["saturated"][k]:
            exact = v["products"][2 * k] + v["products"][2 * k + 1]
            text = f"a{2 * k}b{2 * k} + a{2 * k + 1}b{2 * k + 1} = {exact}\n-> {v['pairs_s16'][k]} (saturated)"
        _box(left, 2 * k, 1.9, 2, text, "#f4a6a6" if v["saturated"][k] else "#e8e8e8", height=0.8)
        for i in (2 * k, 2 * k + 1):
            _arrow(left, i + 0.5, 3.1, 2 * k + 1, 2.7)
    left.text(-0.1, 2.3, "vpmaddubsw\ns16", ha="right", va="center", fontsize=8)
    _box(left, 0, 0.9, 4, f"{v['pairs_s16'][0]} + {v['pairs_s16'][1]} = {v['avx512bw_s32']}", "#e8e8e8")
    left.text(-0.1, 1.25, "vpmaddwd\ns32", ha="right", va="center", fontsize=8)
    _arrow(left, 1, 1.9, 1.5, 1.6)
    _arrow(left, 3, 1.9, 2.5, 1.6)
    _box(left, 0, 0.0, 4, f"acc += {v['avx512bw_s32']}", "#c7e9c0")
    left.text(-0.1, 0.35, "vpaddd\ns32", ha="right", va="center", fontsize=8)
    _arrow(left, 2, 0.9, 2, 0.7)
    _box(right, 0, 1.4, 4, " + ".join(f"a{i}b{i}" for i in range(4)) + f"\n= {v['vnni_s32']} (exact)", "#c7e9c0",
         height=0.9)
    right.text(-0.1, 1.85, "vpdpbusd\ns32", ha="right", va="center", fontsize=8)
    for i in range(4):
        _arrow(right, i + 0.5, 3.1, 2, 2.3)
    fig.suptitle("One 32-bit lane of a 512-bit register (16 such lanes per instruction)", fontsize=11)
    fig.tight_layout()
    return fig


def layout_order(layout, channels=32, height=2, width=2, block=16):
    """The (channel, pixel) held at each memory address of one image, in ``layout``.

    ``pixel`` is ``h * width + w``; channels padded by the blocked layout are reported as channel -1.
    NCHW and NHWC are the plain orders; nChw16c comes from :func:`workshop_lib.kernels.to_blocked`.

    Returns
    -------
    list of (int, int)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    for name, value in (("channels", channels), ("height", height), ("width", width), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    from . import kernels

    c, p = np.meshgrid(np.arange(channels), np.arange(height * width), indexing="ij")
    code = (c * height * width + p + 1).reshape(1, channels, height, width).astype(np.float64)  # 0: padding
    if layout == "NCHW":
        flat = code.ravel()
    elif layout == "NHWC":
        flat = code.transpose(0, 2, 3, 1).ravel()
    else:
        flat = kernels.to_blocked(code, "NCHW", block).ravel()
    pixels = height * width
    return [(-1, -1) if v == 0 else (int(v - 1) // pixels, int(v - 1) % pixels) for v in flat]


def memory_order(channels=32, height=2, width=2, block=16, addresses=48):
    """Draw the first ``addresses`` memory addresses of one image in NCHW, NHWC and nChw16c. Returns the figure.

    Colour is the channel, the number in a cell the pixel: in NHWC one pixel's channels are adjacent, in NCHW one
    channel's pixels, in nChw16c one pixel's 16 channels of a block (one 512-bit register of float32).
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(LAYOUTS), 1, figsize=(13, 1.1 * len(LAYOUTS) + 0.6))
    colours = plt.cm.viridis(np.linspace(0, 1, channels))
    for ax, layout in zip(axes, LAYOUTS):
        order = layout_order(layout, channels, height, width, block)[:addresses]
        for address, (channel, pixel) in enumerate(order):
            colour = "white" if channel < 0 else colours[channel]
            ax.add_patch(plt.Rectangle((address, 0), 1, 1, facecolor=colour, edgecolor="white", lw=0.5))
            ax.text(address + 0.5, 0.5, "-" if pixel < 0 else str(pixel), ha="center", va="center", fontsize=7,
                    color="white" if channel >= 0 and channel < channels / 2 else "black")
        ax.set_xlim(0, addresses)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_ylabel(layout, rotation=0, ha="right", va="center", fontsize=10)
        ax.set_xticks(range(0, addresses + 1, 8))
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel(f"memory address (float32 elements) of one {channels}-channel {height}x{width} image; "
                        "number: pixel, colour: channel (dark = channel 0)")
    fig.tight_layout()
    return fig


def trace_events(lines):
    """``[(label, start_ms, duration_ms), ...]`` of a ``WORKSHOP_VERBOSE`` trace, one per primitive, in order.

    A line is ``workshop_verbose,exec,<primitive>,<kernel or reorder>,...,<milliseconds>``; the label is the
    primitive with its kernel (``_FusedConv2DBiasAddRelu/im2col``) or, for a reorder, its direction. Primitives run
    one after another, so each starts where the previous one ended.
    """
    events, start = [], 0.0
    for number, line in enumerate(lines, start=1):
        fields = line.strip().split(",")
        if len(fields) < 5 or fields[0] != "workshop_verbose":
            raise ValueError(f"line {number} is not a workshop_verbose trace line: {line!r}")
        try:
            duration = float(fields[-1])
        except ValueError:
            raise ValueError(f"line {number} does not end with milliseconds: {line!r}") from None
        events.append((f"{fields[2]}/{fields[3]}", start, duration))
        start += duration
    return events


def trace_timeline(lines):
    """Draw a verbose trace as a timeline: one bar per primitive, reorders in red. Returns the figure."""
    import matplotlib.pyplot as plt

    events = trace_events(lines)
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(events) + 1.2))
    for row, (label, start, duration) in enumerate(events):
        colour = "tab:red" if label.startswith("reorder") else "tab:green" if label.startswith("_Fused") else "tab:gray"
        ax.barh(row, duration, left=start, color=colour)
        ax.text(start + duration, row, f" {duration:.2f} ms", va="center", fontsize=7)
    ax.set_yticks(range(len(events)), [label for label, _, _ in events], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds since the step started (green: fused primitives, red: reorders)")
    fig.tight_layout()
    return fig


_NOT_COMPUTE = {"Placeholder", "PlaceholderWithDefault", "VariableV2", "Const", "Identity"}


def compute_ops(tensor):
    """The operations that compute ``tensor``, inputs first, as ``[(type, name), ...]``.

    Walks the graph back through each operation's public ``inputs``; placeholders, variables and constants,
    which compute nothing, are left out. This is the graph as written, before any rewrite.
    """
    if not hasattr(tensor, "op"):
        raise TypeError(f"tensor={tensor!r} must be a graph tensor (with .op), e.g. model.logits")
    seen, order, stack = set(), [], [(tensor.op, False)]
    while stack:  # an explicit stack: deep graphs must not hit Python's recursion limit
        op, inputs_done = stack.pop()
        if inputs_done:
            order.append(op)
            continue
        if op.name in seen:
            continue
        seen.add(op.name)
        stack.append((op, True))
        stack.extend((t.op, False) for t in reversed(list(op.inputs)) if t.op.name not in seen)
    return [(op.type, op.name) for op in order if op.type not in _NOT_COMPUTE]


def _fusion_links(before, ran):
    """``[(row in before, row in ran), ...]``: which primitive each written operation became, in order.

    A fused primitive's name is ``_Fused`` + the types it folded (``_FusedConv2DBiasAddRelu``), so it takes the
    written operations whose types spell its name, one after another; any other primitive takes the next written
    operation of its own type; reorders were not written at all.
    """
    links, j = [], 0
    for row, label in enumerate(ran):
        primitive = label.split("/")[0]
        if primitive.startswith("_Fused"):
            rest = primitive[len("_Fused"):]
            while j < len(before) and rest.startswith(before[j][0]):
                links.append((j, row))
                rest, j = rest[len(before[j][0]):], j + 1
        elif not primitive.startswith("reorder"):
            match = next((k for k in range(j, len(before)) if before[k][0] == primitive), None)
            if match is not None:
                links.append((match, row))
                j = match + 1
    return links


def fusion_before_after(before, after):
    """Draw the graph as written (``before``: ``[(type, name), ...]``) beside what ran (``after``: trace lines).

    Fused primitives are green, reorders red; a line joins each written operation to the primitive it became. Reads
    of variables, which the written column leaves out too, are not drawn. Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import ConnectionPatch

    ran = [label for label, _, _ in trace_events(after) if label.split("/")[0] not in _NOT_COMPUTE]
    rows = max(len(before), len(ran))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.33 * rows + 1.0))
    columns = ((axes[0], [f"{kind}  ({name})" for kind, name in before], f"as written: {len(before)} operations"),
               (axes[1], ran, f"as run: {len(ran)} primitives, {sum(r.startswith('_Fused') for r in ran)} fused"))
    for ax, labels, title in columns:
        for row, label in enumerate(labels):
            colour = "#c7e9c0" if label.startswith("_Fused") else "#f4a6a6" if label.startswith("reorder") else "#e8e8e8"
            ax.add_patch(plt.Rectangle((0.02, rows - row - 0.9), 0.96, 0.8, facecolor=colour, edgecolor="gray"))
            ax.text(0.5, rows - row - 0.5, label, ha="center", va="center", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, rows)
        ax.axis("off")
        ax.set_title(title, fontsize=10)
    for left, right in _fusion_links(before, ran):
        fig.add_artist(ConnectionPatch((0.98, rows - left - 0.5), (0.02, rows - right - 0.5), "data", "data",
                                       axesA=axes[0], axesB=axes[1], color="tab:green", lw=0.8, alpha=0.7))
    fig.tight_layout()
    return fig


def roofline_values(result, points=64):
    """The lines and points of a roofline plot, from :func:`workshop_lib.roofline.report`'s result.

    Parameters
    ----------
    result : dict
        :func:`workshop_lib.roofline.report`'s dict.
    points : int
        Points along each roof.

    Returns
    -------
    dict
        ``roofs``: ``{name: (intensities, ops/s)}``, each ``min(peak, intensity x triad bandwidth)`` on all cores;
        ``kernels``: ``[(name, intensity, achieved ops/s, bound)]`` for every kernel with an intensity;
        ``bandwidth``: the triad bandwidth (bytes/s) the slanted roof uses.
    """
    try:
        bandwidth = result["memory"]["triad"]["all_cores"]
        compute = result["compute"]
    except (KeyError, TypeError):
        raise ValueError("result must be workshop_lib.roofline.report()'s dict (with 'memory' and 'compute')") from None
    kernels = [(row["name"], row["intensity"], row["rate"], row["bound"])
               for row in result.get("kernels", []) if row.get("intensity")]
    lowest = min([0.05] + [k[1] / 2 for k in kernels])
    highest = max([1e4] + [k[1] * 2 for k in kernels])
    xs = np.geomspace(lowest, highest, points)
    roofs = {name: (xs, np.minimum(row["all_cores"], xs * bandwidth))
             for name, row in compute.items() if "all_cores" in row}
    return {"roofs": roofs, "kernels": kernels, "bandwidth": bandwidth}


def roofline_plot(result):
    """Draw the log-log roofline of :func:`roofline_values`: one roof per instruction, one dot per kernel.

    Parameters
    ----------
    result : dict
        :func:`workshop_lib.roofline.report`'s dict.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    values = roofline_values(result)
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, (xs, ys) in values["roofs"].items():
        ax.loglog(xs, ys, label=f"{name} peak {ys.max() / 1e9:,.0f} G/s")
    for name, intensity, rate, bound in values["kernels"]:
        ax.loglog([intensity], [rate], "o", color="black" if bound == "compute" else "tab:red", markersize=4)
        ax.annotate(name, (intensity, rate), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("arithmetic intensity (operations per byte moved)")
    ax.set_ylabel("operations per second")
    ax.set_title(f"Roofline of {result.get('cpu', 'this CPU')}: memory {values['bandwidth'] / 1e9:.1f} GB/s (triad); "
                 "red dots memory-bound", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig
