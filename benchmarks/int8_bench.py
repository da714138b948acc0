"""int8 vs fp32 on this CPU: GEMM throughput and the MNIST CNN's inference speed, beside PyTorch's int8.

Run:  python benchmarks/int8_bench.py            (GEMM 256..2048 and the CNN's FC shapes; CNN at batch 256)
      python benchmarks/int8_bench.py --quick    (small sizes)

References measured in the same run: numpy's float32 GEMM (its BLAS) and, when PyTorch is
installed beside the project (an optional peer, never a dependency), oneDNN's int8 linear
(``torch.ao.nn.quantized.Linear`` on the onednn engine: u8 x s8 with a requantized u8 output),
``torch._int_mm`` (s8 x s8 -> s32) and PyTorch's static int8 CNN of the same network and weights
(FX graph mode, the x86 and onednn backends, the faster one counts). OpenBLAS reads
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE when it loads, and some machines set them to values that
pick a slower kernel, so this script restarts itself with both unset: the reference is numpy's
best. Figures are the best of several repeats; GOP/s counts a multiply and an add as two
operations. On a machine shared with other work the CNN comparison runs ``--rounds`` times,
alternating ours and PyTorch's, and reports the ratio of each round (median and spread).
"""

import os
import sys

_OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _OPENBLAS_VARS):  # before numpy loads OpenBLAS
    env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_VARS}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workshop_lib import int8, models, roofline, sysinfo  # noqa: E402
from workshop_lib.bench import best_time  # noqa: E402
from workshop_lib.data import load_mnist  # noqa: E402


def _torch():
    """PyTorch if it is installed (quietly: its quantization API warns about its own deprecation), else None."""
    try:
        import torch
    except ImportError:
        return None
    warnings.filterwarnings("ignore", module="torch")
    warnings.filterwarnings("ignore", message=".*quantiz.*")
    return torch


def onednn_linear_gops(torch, m, k, n, repeats):
    """oneDNN's static int8 linear (u8 activations, s8 weights, u8 output) in GOP/s, or None."""
    if "onednn" not in torch.backends.quantized.supported_engines:
        return None
    torch.backends.quantized.engine = "onednn"
    layer = torch.ao.nn.quantized.Linear(k, n)
    layer.set_weight_bias(torch.quantize_per_tensor(torch.randn(n, k), 0.02, 0, torch.qint8), None)
    x = torch.quantize_per_tensor(torch.rand(m, k), 1 / 255, 0, torch.quint8)
    return 2.0 * m * k * n / best_time(lambda: layer(x), repeats) / 1e9


def gemm_rows(shapes, repeats, torch, rounds=1):
    rng = np.random.default_rng(0)
    rows = []
    isa = int8.vnni_isa()
    for m, k, n in shapes:
        a32, b32 = rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)
        a8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
        b8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
        ops = 2.0 * m * k * n
        row = {"shape": [m, k, n], "fp32_gflops": ops / best_time(lambda: a32 @ b32, repeats) / 1e9}
        if isa:
            packed = int8.pack_weights(b8)  # weights are packed once, as inference libraries do
            row["int8_gops"] = ops / best_time(lambda: int8.gemm_u8s8s32(a8, packed), repeats) / 1e9
            fused = int8.pack_fused_weights(b8)
            row["int8_fused_u8_gops"] = ops / best_time(
                lambda: int8.gemm_u8s8u8_fused(a8, fused, 0, 1e-4, relu=False), repeats) / 1e9
        else:
            row["int8_gops"] = ops / best_time(lambda: int8.gemm_u8s8s32(a8, b8, path="portable"), repeats) / 1e9
        if m * k * n <= 1024**3:
            row["int8_portable_gops"] = ops / best_time(lambda: int8.gemm_u8s8s32(a8, b8, path="portable"), 1) / 1e9
        row["ratio"] = row["int8_gops"] / row["fp32_gflops"]
        extra = f"   (portable numba loops: {row['int8_portable_gops']:6.0f} GOP/s)" if "int8_portable_gops" in row else ""
        print(f"  {m:5d} x {k:5d} x {n:5d}   fp32 {row['fp32_gflops']:7.0f} GFLOP/s   int8 {row['int8_gops']:7.0f} GOP/s"
              f"   int8 / fp32 = {row['ratio']:.2f}{extra}")
        if torch is not None:
            ta = torch.from_numpy((a8 // 2).astype(np.int8))
            tb = torch.from_numpy(b8)
            row["torch_int_mm_gops"] = ops / best_time(lambda: torch._int_mm(ta, tb), repeats) / 1e9
            row["onednn_linear_gops"] = onednn_linear_gops(torch, m, k, n, repeats)
            ours = row.get("int8_fused_u8_gops", row["int8_gops"])
            line = f"        torch._int_mm {row['torch_int_mm_gops']:7.0f} GOP/s"
            if row["onednn_linear_gops"]:
                row["vs_onednn"] = ours / row["onednn_linear_gops"]
                if isa and rounds > 1 and (m, k, n) == (1024, 1024, 1024):  # alternate: both see the same load
                    ratios = [row["vs_onednn"]]
                    for _ in range(rounds - 1):
                        ours_round = ops / best_time(
                            lambda: int8.gemm_u8s8u8_fused(a8, fused, 0, 1e-4, relu=False), repeats) / 1e9
                        ratios.append(ours_round / onednn_linear_gops(torch, m, k, n, repeats))
                    row["vs_onednn"], row["vs_onednn_rounds"] = float(np.median(ratios)), ratios
                    print(f"        ours / oneDNN at 1024^3: median {row['vs_onednn']:.2f} of {rounds} rounds "
                          f"({min(ratios):.2f}..{max(ratios):.2f})")
                line += (f"   oneDNN int8 linear (u8 out) {row['onednn_linear_gops']:7.0f} GOP/s"
                         f"   ours (fused, u8 out) {ours:7.0f}: {row['vs_onednn']:.2f}x oneDNN")
            print(line)
        rows.append(row)
    return rows


def print_roof_fractions(figures, batch):
    """Each GEMM and the int8 CNN as a fraction of this CPU's measured int8 and fp32 peaks (same run)."""
    roofs = roofline.benchmark_roofs(("fp32", "int8"))
    print("\nFraction of this CPU's measured roofs:")
    for row in figures["gemm"]:
        m, k, n = row["shape"]
        ops = 2 * m * k * n
        ours = row.get("int8_fused_u8_gops", row["int8_gops"])
        print("  " + roofline.fraction_line(f"ours int8 {m}x{k}x{n}", ops, ops / (ours * 1e9), roofs, "int8"))
        print("  " + roofline.fraction_line(f"numpy fp32 {m}x{k}x{n}", ops, ops / (row["fp32_gflops"] * 1e9), roofs))
        if row.get("onednn_linear_gops"):
            print("  " + roofline.fraction_line(f"oneDNN int8 {m}x{k}x{n}", ops,
                                                ops / (row["onednn_linear_gops"] * 1e9), roofs, "int8"))
    if "int8_images_per_s" in figures["cnn"]:
        print("  " + roofline.fraction_line(f"int8 CNN inference, batch {batch}", roofline.cnn_ops_per_image(
            "inference") * figures["cnn"]["int8_images_per_s"], 1.0, roofs, "int8"))


def torch_int8_cnn(torch, params, calibration_images, example):
    """PyTorch's static int8 CNN of the same network and weights, per backend: {"x86": model, "onednn": model}."""
    from torch import nn
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    net = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(3136, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    with torch.no_grad():
        for index, name in ((0, "conv1"), (3, "conv2")):  # HWIO -> OIHW
            net[index].weight.copy_(as_tensor(params[f"{name}/w"].transpose(3, 2, 0, 1)))
            net[index].bias.copy_(as_tensor(params[f"{name}/b"]))
        # our flatten is NHWC (h, w, c), torch's is NCHW (c, h, w)
        fc1 = params["fc1/w"].reshape(7, 7, 64, 1024).transpose(2, 0, 1, 3).reshape(3136, 1024)
        net[7].weight.copy_(as_tensor(fc1.T))
        net[7].bias.copy_(as_tensor(params["fc1/b"]))
        net[9].weight.copy_(as_tensor(params["fc2/w"].T))
        net[9].bias.copy_(as_tensor(params["fc2/b"]))
    models_by_backend = {}
    for backend in ("x86", "onednn"):
        if backend not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = backend
        prepared = prepare_fx(net, get_default_qconfig_mapping(backend), (example,))
        with torch.no_grad():
            prepared(calibration_images)
        models_by_backend[backend] = convert_fx(prepared)
    return models_by_backend


def cnn_row(batch, repeats, rounds, torch, why_no_torch="PyTorch is not installed"):
    params, _ = models.load_model()
    (x_train, _), (x_test, y_test) = load_mnist()
    images = x_test[:batch]
    qmodel = models.QuantizedCNN(params, x_train[:500])
    fp32 = best_time(lambda: models.mnist_cnn_forward(params, images), repeats)
    i8 = best_time(lambda: qmodel.logits(images), repeats)
    acc32 = models.accuracy(params, x_test, y_test)
    acc8 = float((qmodel.predict(x_test) == y_test).mean())
    row = {"batch": batch, "fp32_images_per_s": batch / fp32, "int8_images_per_s": batch / i8, "ratio": fp32 / i8,
           "fp32_accuracy": acc32, "int8_accuracy": acc8, "int8_path": "fused" if qmodel.fused else qmodel.path}
    print(f"  fp32 {row['fp32_images_per_s']:8.0f} images/s   int8 {row['int8_images_per_s']:8.0f} images/s   "
          f"int8 / fp32 = {row['ratio']:.2f} (target >= 1.5)")
    print(f"  top-1 on 2,000 held-out images: fp32 {acc32:.4f}, int8 {acc8:.4f} ({100 * (acc8 - acc32):+.2f} points;"
          f" target within 0.3)")
    if torch is None:
        print(f"  {why_no_torch}: no comparison with PyTorch's static int8 CNN")
        return row
    import numba

    torch.set_num_threads(numba.get_num_threads())
    as_input = lambda a: torch.from_numpy(a.astype(np.float32)[:, None] / 255.0)  # noqa: E731
    example = as_input(images)
    theirs = torch_int8_cnn(torch, params, as_input(x_train[:500]), example)
    with torch.no_grad():
        logits = theirs["x86"](as_input(x_test)) if "x86" in theirs else next(iter(theirs.values()))(as_input(x_test))
    row["torch_int8_accuracy"] = float((logits.numpy().argmax(1) == y_test).mean())
    ratios, best = [], {}
    for _ in range(rounds):  # alternate, so that both see the same load
        ours = batch / best_time(lambda: qmodel.logits(images), repeats)
        speeds = {}
        for backend, model in theirs.items():
            torch.backends.quantized.engine = backend
            with torch.no_grad():
                speeds[backend] = batch / best_time(lambda: model(example), repeats)
        ratios.append(ours / max(speeds.values()))
        best["ours"] = max(best.get("ours", 0), ours)
        for backend, speed in speeds.items():
            best[backend] = max(best.get(backend, 0), speed)
    row.update(torch_int8_images_per_s={k: v for k, v in best.items() if k != "ours"},
               int8_best_images_per_s=best["ours"], vs_torch_int8=float(np.median(ratios)),
               vs_torch_int8_rounds=ratios)
    print(f"  PyTorch {torch.__version__} static int8 (FX; "
          + ", ".join(f"{k} {v:.0f}" for k, v in row["torch_int8_images_per_s"].items())
          + f" images/s; top-1 {row['torch_int8_accuracy']:.4f})   ours {best['ours']:.0f} images/s")
    print(f"  ours / PyTorch static int8 = {row['vs_torch_int8']:.2f} (median of {rounds} rounds, "
          f"{min(ratios):.2f}..{max(ratios):.2f}; target >= 0.5, goal 1.0)")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds of ours vs PyTorch's int8 CNN and vs oneDNN's GEMM at 1024^3")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even when installed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import numba

    torch = None if args.no_torch else _torch()
    features = [f for f, present in sysinfo.cpu_features().items() if present]
    print(f"CPU: {sysinfo.cpu_model()} ({', '.join(features)}); int8 path: "
          f"{int8.vnni_isa() or 'portable (no VNNI)'}; {numba.get_num_threads()} threads"
          + (f"; PyTorch {torch.__version__}" if torch else "; PyTorch not installed"))
    cubes = [256, 512] if args.quick else [256, 512, 1024, 2048]
    shapes = [(s, s, s) for s in cubes] + ([(64, 3136, 1024)] if args.quick else [(64, 3136, 1024), (256, 3136, 1024)])
    print("GEMM (numpy float32 is the reference):")
    figures = {"gemm": gemm_rows(shapes, 2 if args.quick else args.repeats, torch, 1 if args.quick else args.rounds)}
    batch = 64 if args.quick else 256
    print("MNIST CNN inference, batch", batch)
    figures["cnn"] = cnn_row(batch, 2 if args.quick else args.repeats, 1 if args.quick else args.rounds, torch,
                             "--no-torch" if args.no_torch else "PyTorch is not installed")
    at_1024 = [r for r in figures["gemm"] if r["shape"] == [1024, 1024, 1024]]
    if at_1024:
        print(f"\nint8 GEMM at 1024^3 is {at_1024[0]['ratio']:.2f}x numpy's fp32 GEMM (target >= 2.0)"
              + (f" and {at_1024[0]['vs_onednn']:.2f}x oneDNN's int8 linear (target >= 0.8)"
                 if "vs_onednn" in at_1024[0] else ""))
    print_roof_fractions(figures, batch)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
