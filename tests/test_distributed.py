"""8-bit optimizers under torch.distributed on CPU (gloo, 2 processes): the distributed check
at its tiny size (DDP, FSDP2, checkpoints resharded, QLoRA), and the bad inputs: ranks with
different configurations, 8-bit state loaded where the configuration says 32-bit, sharded
8-bit state that cannot be saved."""
import datetime
import gc
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    """Run fn(rank, port, *args) on 2 gloo ranks; re-raises the first rank's failure. Forked,
    not spawned: the ranks inherit the imported torch instead of importing it again (~30 s
    here); each runs single-threaded (see _init), so no OpenMP pool crosses the fork."""
    from torch.distributed.fsdp import fully_shard  # noqa: F401  imported before the fork
    mp.start_processes(fn, args=(_free_port(), *args), nprocs=2, join=True, start_method="fork")


def _init(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))


def test_the_distributed_check_passes_on_two_cpu_ranks(tmp_path):
    """benchmarks/distributed.py under torchrun exits 0 only when every check passed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "benchmarks.distributed", "--size", "tiny",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (tmp_path / "distributed-cpu-tiny.md").read_text()
    assert "FAIL" not in report
    for part in ("ddp: final parameters", "fsdp2: optimizer state per rank", "resumed on 2 ranks",
                 "resumed on 1 process", "qlora: only the"):
        assert part in report, report


def _bad_inputs(rank, port, folder):
    """Both bad inputs in one spawn (each spawn costs two torch imports)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torch_ops.distributed import check_same_config, save_checkpoint
    from torch_ops.optim import AdamW8bit
    _init(rank, port)
    try:
        # ranks given different configurations: a ValueError on every rank, naming the key
        try:
            check_same_config({"d": 256, "layers": 2 + rank}, "model configuration")
        except ValueError as exc:
            assert "layers: rank 0 2 vs rank 1 3" in str(exc), str(exc)
        else:
            raise AssertionError("no error for different configurations")
        check_same_config({"d": 256, "layers": 2}, "model configuration")  # equal: passes

        # sharded 8-bit state whose blocks do not follow the rows: warned, then refused at save
        torch.manual_seed(0)
        layer = torch.nn.Linear(300, 100, bias=False)   # rows of 300: not whole 256-blocks
        fully_shard(layer, mesh=init_device_mesh("cpu", (2,)))
        opt = AdamW8bit(layer.parameters())
        layer(torch.randn(4, 300)).sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        assert any("not whole 256-element blocks" in str(w.message) for w in caught)
        try:
            save_checkpoint(folder, layer, opt)
        except ValueError as exc:
            assert "cannot be saved sharded" in str(exc), str(exc)
        else:
            raise AssertionError("sharded 8-bit state with unaligned blocks was saved")
    finally:
        dist.destroy_process_group()


def test_different_configs_and_unsaveable_sharded_state_raise_on_every_rank(tmp_path):
    _spawn(_bad_inputs, str(tmp_path / "ckpt"))


def test_checkpoint_precision_mismatch_is_named(tmp_path):
    """8-bit state saved, then loaded where GlobalOptimManager says 32-bit: a clear error
    from load_checkpoint (before reading) and from load_state_dict."""
    from torch_ops.distributed import load_checkpoint, save_checkpoint
    from torch_ops.optim import AdamW8bit, GlobalOptimManager

    def model_and_opt(override):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 256))
        mng = GlobalOptimManager.get_instance()
        mng.initialize()
        if override:
            mng.register_parameters(model.parameters())
            mng.override_config(model[0].weight, "optim_bits", 32)
        return model, AdamW8bit(model.parameters(), lr=1e-3)

    model, opt = model_and_opt(False)
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt", model, opt, extra={"steps": 1})
    saved = opt.state_dict()

    model, opt = model_and_opt(False)      # same configuration: loads, equal state
    assert load_checkpoint(tmp_path / "ckpt", model, opt) == {"steps": 1}
    assert torch.equal(opt.state[model[0].weight]["state1"], saved["state"][0][
        "__bnb_optimizer_quant_state__"]["state1"])

    model, opt = model_and_opt(True)
    with pytest.raises(ValueError, match=r"parameter '0.weight'.*saved 8-bit.*gives it 32-bit"):
        load_checkpoint(tmp_path / "ckpt", model, opt)
    model, opt = model_and_opt(True)
    with pytest.raises(ValueError, match=r"saved 8-bit but.*gives it 32-bit"):
        opt.load_state_dict(saved)
    GlobalOptimManager.get_instance().initialize()


def test_ddp_checkpoint_loads_into_a_plain_model(tmp_path):
    """Names are the model's own (DDP's ``module.`` dropped): a checkpoint written from a DDP
    model (one gloo rank) loads into the plain model in a process without a process group,
    parameters and 8-bit state equal."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from torch_ops.distributed import load_checkpoint, save_checkpoint
    from torch_ops.optim import AdamW8bit

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 256))

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        ddp = DDP(model())
        opt = AdamW8bit(ddp.parameters(), lr=1e-2)
        for _ in range(2):
            ddp(torch.randn(3, 256)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        save_checkpoint(tmp_path / "ckpt", ddp, opt)
        trained = ddp.module
    finally:
        # DDP's reducer goes before its process group: freeing it after destroy_process_group
        # can deadlock in ProcessGroupGloo's destructor (seen here: a suite that hung)
        ddp = None
        gc.collect()
        dist.destroy_process_group()
    plain = model()
    opt2 = AdamW8bit(plain.parameters(), lr=1e-2)
    load_checkpoint(tmp_path / "ckpt", plain, opt2)
    for a, b in zip(trained.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(trained.parameters(), plain.parameters()):
        sa, sb = opt.state[pa], opt2.state[pb]
        assert sa["step"] == sb["step"] == 2 and sa.keys() == sb.keys()
        assert (sa["state1"].dtype == torch.uint8) == (pa.numel() >= 4096)  # weights 8-bit
        for k in ("state1", "state2", "absmax1", "absmax2"):
            if k in sa:
                assert torch.equal(sa[k], sb[k]), k


# --- loading never runs code stored in a checkpoint ------------------------------------------

class _OpensAFile:
    """Pickles as ``open(path, "w")``: unpickling it with plain pickle creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4)


def test_load_checkpoint_refuses_code_in_non_tensor_items(tmp_path):
    """A checkpoint written by someone else (here: DCP directly, past save_checkpoint's check)
    whose ``extra`` holds an object with a malicious __reduce__: loading raises a ValueError
    naming the item and the file is never created."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dcp_sd

    from torch_ops.distributed import load_checkpoint
    marker = tmp_path / "planted"
    model = _small_model()
    sd = {"model": dcp_sd.get_model_state_dict(model),
          "extra": {"steps": 3, "payload": _OpensAFile(marker)}}
    dcp.save(sd, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"'extra.payload'.*not plain data"):
        load_checkpoint(tmp_path / "ckpt", _small_model())
    assert not marker.exists()


def test_load_checkpoint_refuses_code_in_the_metadata_file(tmp_path):
    """DCP's .metadata file is a pickle too: a planted one is refused, not executed."""
    import pickle

    from torch_ops.distributed import load_checkpoint, save_checkpoint
    save_checkpoint(tmp_path / "ckpt", _small_model(), extra={"steps": 1})
    marker = tmp_path / "planted"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_OpensAFile(marker)))
    with pytest.raises(ValueError, match=r"\.metadata.*refusing.*io\.open|\.metadata.*refusing"):
        load_checkpoint(tmp_path / "ckpt", _small_model())
    assert not marker.exists()


def test_extra_round_trips_plain_data_and_save_refuses_other_objects(tmp_path):
    from torch_ops.distributed import load_checkpoint, save_checkpoint
    extra = {"steps": 7, "lr": 1e-3, "name": "run-1", "done": False, "none": None,
             "sizes": [1, 2.5, "x", None], "pair": (3, 4)}
    save_checkpoint(tmp_path / "ckpt", _small_model(), extra=extra)
    assert load_checkpoint(tmp_path / "ckpt", _small_model()) == extra
    with pytest.raises(TypeError, match=r"extra\['payload'\]\[1\] .*got _OpensAFile"):
        save_checkpoint(tmp_path / "bad", _small_model(),
                        extra={"payload": [1, _OpensAFile(tmp_path / "x")]})
    assert not (tmp_path / "x").exists()
    import numpy as np
    with pytest.raises(TypeError, match=r"extra\['loss'\] .*got float64 \(a NumPy scalar"):
        save_checkpoint(tmp_path / "bad", _small_model(), extra={"loss": np.float64(0.5)})
