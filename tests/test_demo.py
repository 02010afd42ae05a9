"""``qkernels demo`` at its tiny size: the table's shape, every configuration's loss
going down, and one clear line (no traceback) for each bad option."""
import json

import pytest

CONFIGS = ["fp32 Linear + AdamW", "SwitchBack + AdamW8bit", "LinearFP8Mixed + Adam8bit",
           "baseline -> Linear8bitLt", "baseline -> LinearNF4"]


def test_tiny_demo_table_and_losses(tmp_path, capsys):
    from torch_ops import demo
    assert demo.main(["--tiny", "--steps", "30", "--out", str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "demo.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| configuration | held-out loss | perplexity | vs baseline |")
    body = rows[1:]
    assert [r.split(" | ")[0].lstrip("| ") for r in body] == CONFIGS
    assert all(r.count("|") == 9 for r in body)          # 8 cells each
    assert table.split("\n\n")[1] in printed               # the printed table is the saved one
    assert (tmp_path / "demo_loss.png").stat().st_size > 0

    numbers = json.loads((tmp_path / "demo.json").read_text())
    results = {r["name"]: r for r in numbers["results"]}
    start = results[CONFIGS[0]]["first_loss"]              # mean loss of the first 5 steps
    for name in CONFIGS[:3]:                               # trained: the curve went down
        curve = results[name]["curve"]
        assert len(curve) == 30
        assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3, (name, curve[:5], curve[-5:])
        assert results[name]["held_out_loss"] < results[name]["first_loss"]
        assert results[name]["state_bytes"] > 0
    for name in CONFIGS[3:]:                               # converted: below the untrained start
        assert results[name]["held_out_loss"] < start - 0.3, (name, results[name], start)
        assert results[name]["weight_bytes"] < results[CONFIGS[0]]["weight_bytes"]


@pytest.mark.parametrize("argv, says", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--backend", "tpu"], "invalid choice: 'tpu'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--out", "/proc/qkernels-demo"], "is not writable"),
])
def test_bad_options_exit_with_one_line(argv, says, capsys):
    from torch_ops import demo
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert says in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_cuda_without_a_gpu_is_one_line(capsys):
    import torch
    from torch_ops import demo
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda"])
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible" in err and err.count("\n") == 1, err
