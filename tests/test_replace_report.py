"""replace_linear's memory line: sizes in MiB and the ratio for a model with storage, and
"sizes unknown" (never a ratio) when any tensor is on the meta device, as in a model built
under torch.device("meta") for big-model loading."""
import pytest
import torch
from torch import nn

from torch_ops import replace_linear


def _model():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


@pytest.mark.parametrize("kind", ["nf4", "int8", "switchback"])
def test_meta_model_memory_line_says_unknown(kind, capsys):
    with torch.device("meta"):
        model = _model()
    report = replace_linear(model, kind)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert report.meta and line == str(report)
    assert line.endswith("model memory: sizes unknown (tensors on the meta device)")
    assert "smaller" not in line and "MiB" not in line


def test_partly_meta_model_memory_line_says_unknown(capsys):
    """A real embedding beside meta linears: counting only the real tensors would give a
    ratio of 1.00x; the line says the sizes are unknown instead."""
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 64))
    with torch.device("meta"):
        model.append(nn.Linear(64, 64))
    report = replace_linear(model, "nf4", skip=("1",))
    assert report.meta and "sizes unknown" in str(report) and "smaller" not in str(report)


def test_real_model_memory_line_has_sizes(capsys):
    model = _model()
    report = replace_linear(model, "nf4")
    assert not report.meta and report.bytes_after < report.bytes_before
    line = capsys.readouterr().err.strip().splitlines()[-1]
    ratio = report.bytes_before / report.bytes_after
    assert line.endswith(f"MiB ({ratio:.2f}x smaller)") and "unknown" not in line
