"""Fault injection for checkpoints: a process killed (SIGKILL) in the middle of a save, and
checkpoints truncated on disk.

Killed saves. A small model (two 256x256 nn.Linear: AdamW8bit keeps 8-bit state for the
weights, 32-bit for the biases) is trained a step and saved; it is trained another step and
saved again to the same place, and the process dies during that second save:

- a separate interpreter pauses half-way through the bytes of a chosen file (the DCP data
  file, DCP's .metadata file, a careful user's torch.save temporary file) and is killed
  there with SIGKILL by the test;
- forked children kill themselves (SIGKILL) at each step of save_checkpoint as it touches
  the file system: a write torn in half (eight writes spread over each file, its first and
  last included), every rename, every removal;
- an interpreter saving in a loop is killed after a random delay.

Afterwards the checkpoint at the path must load, bit for bit (model parameters, optimizer
state, step counts, param_groups, ``extra``), as one complete save: the previous one while
the new one's files are still being written, never an error or a mix of the two. A save that
then completes leaves only the checkpoint behind.

Truncated checkpoints (a torch.save file of a quantized model and its optimizer cut at 10%,
50%, 90% and one byte short; a save_checkpoint folder with its data file or its .metadata
cut or missing; single entries of a quantized layer's or the optimizer's state cut short or
missing) must fail to load with an ordinary, clear exception and leave the model and the
optimizer exactly as they were: parameters and quantization state, optimizer state tensors,
step counts and param_groups compared bit for bit (this found a cut nested absmax or quant_map
accepted at load, and an empty weight_format raising an error that named no entry). A
two-rank (gloo) save replacing a checkpoint checks the same mechanism under a process group.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import pytest
import torch
from torch.distributed.checkpoint import CheckpointException

import torch_ops
from torch_ops.distributed import load_checkpoint, save_checkpoint
from torch_ops.optim import QUANT_STATE_KEY, AdamW8bit

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGKILL") or sys.platform == "win32",
                       reason="POSIX signals and fork"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]


# --- models, training, exact comparison ---------------------------------------------------------

def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    return model, AdamW8bit(model.parameters(), lr=1e-2)


def _quantized_model_and_opt(seed: int = 0):
    """NF4 and int8 layers (quantized on the move to "cpu"; frozen weights, trainable
    biases) and a float layer, with AdamW8bit over the trainable parameters."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch_ops.LinearNF4(256, 256),
                                torch_ops.Linear8bitLt(256, 256, has_fp16_weights=False),
                                torch.nn.Linear(256, 256)).to("cpu")
    return model, AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _train(model, opt, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 256, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _exact(t: torch.Tensor) -> tuple:
    """(dtype, shape, bytes): equal exactly when the tensors are equal bit for bit."""
    t = t.detach().as_subclass(torch.Tensor).cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
    return str(t.dtype), tuple(t.shape), raw.numpy().tobytes()


def _plain(value):
    if isinstance(value, torch.Tensor):
        return _exact(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _normalized(sd: dict) -> dict:
    """{"model": model state_dict, "opt": optimizer state_dict} as comparable plain data:
    tensors as bytes, the optimizer's quantization state unwrapped."""
    state = {}
    for index, st in sd["opt"]["state"].items():
        st = dict(st)
        st.update(st.pop(QUANT_STATE_KEY, {}))
        state[int(index)] = _plain(st)
    return {"model": _plain(dict(sd["model"])), "opt_state": state,
            "param_groups": _plain(sd["opt"]["param_groups"])}


def _current(model, opt) -> dict:
    return _normalized({"model": model.state_dict(), "opt": opt.state_dict()})


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k} (only one side)" for k in set(a) ^ set(b)]
        for k in a.keys() & b.keys():
            out += _differences(a[k], b[k], f"{path}/{k}")
        return out
    return [] if a == b else [path or "/"]


def _assert_same(got: dict, want: dict, what: str) -> None:
    diff = _differences(got, want)
    assert not diff, f"{what}: differs at {sorted(diff)[:8]}"


def _load_fresh(path, **kwargs) -> tuple[dict, dict]:
    """load_checkpoint into a new model and optimizer (another seed, so nothing matches by
    accident); returns (their state, extra)."""
    model, opt = _model_and_opt(seed=99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = load_checkpoint(path, model, opt, **kwargs)
    return _current(model, opt), extra


def _quiet_save(path, model, opt, extra) -> None:
    with warnings.catch_warnings():  # DCP: "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        save_checkpoint(path, model, opt, extra=extra)


def _careful_save(obj, path: str, wrap=lambda f: f) -> None:
    """What a careful user does with torch.save: a temporary file, flushed and fsynced, then
    os.replace onto the path."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, wrap(f))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- fault injection ----------------------------------------------------------------------------

class _Faults:
    """Watches the file-system steps of a save (each write to a file that DCP opens or that
    ``wrap`` wraps, each rename and removal) and acts at the step that ``fire(index, step)``
    picks: a write is torn (its first half reaches the file, flushed; the rest never does),
    a rename or removal has been done; then ``action()`` runs (a pause to be killed in, or
    SIGKILL to itself). ``steps`` lists the steps seen, as tuples."""

    _OS = ("rename", "replace", "unlink", "remove", "rmdir")

    def __init__(self, fire, action):
        self.fire, self.action, self.steps = fire, action, []

    def step(self, *desc) -> bool:
        self.steps.append(desc)
        return bool(self.fire(len(self.steps) - 1, desc))

    def wrap(self, stream, name: str):
        return _TornStream(stream, name, self)

    @contextlib.contextmanager
    def installed(self):
        from torch.distributed.checkpoint import filesystem
        real_stream = filesystem.FileSystem.create_stream
        real_os = {n: getattr(os, n) for n in self._OS}
        faults = self

        @contextlib.contextmanager
        def create_stream(fs, path, mode):
            with real_stream(fs, path, mode) as stream:
                yield faults.wrap(stream, os.path.basename(str(path))) if "w" in mode else stream

        def watched(name):
            real = real_os[name]

            def op(*args, **kwargs):
                out = real(*args, **kwargs)
                names = [os.path.basename(os.fspath(a)) for a in args[:2]
                         if isinstance(a, (str, os.PathLike))]
                if faults.step(name, *names):
                    faults.action()
                return out
            return op

        filesystem.FileSystem.create_stream = create_stream
        for n in self._OS:
            setattr(os, n, watched(n))
        try:
            yield self
        finally:
            filesystem.FileSystem.create_stream = real_stream
            for n, f in real_os.items():
                setattr(os, n, f)


class _TornStream:
    """A writable file whose writes are steps of ``faults``."""

    def __init__(self, stream, name: str, faults: _Faults):
        self._stream, self._name, self._faults, self._written = stream, name, faults, 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self._faults.step("write", self._name, self._written, len(data)):
            self._stream.write(data[: len(data) // 2])
            self._stream.flush()
            self._faults.action()
        n = self._stream.write(data)
        self._written += len(data)
        return n

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _pause() -> None:
    print("PAUSED", flush=True)
    time.sleep(300)


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# --- the child interpreter ----------------------------------------------------------------------

_CHILD = f"import sys; sys.path.insert(0, {TESTS!r}); import test_fault_injection as t; " \
         "t._child_main(sys.argv[1:])"


def _child_main(argv: list[str]) -> None:
    """A separate interpreter: train a step, save the first checkpoint (reference first.pt,
    a careful torch.save plain.pt, the save_checkpoint folder ckpt), train a step, then
    ``mode`` "pause-<target>": save again with a pause half-way through the target file's
    bytes; "loop": save, train, save... forever, each save's state written first to
    ref<i>.pt (atomically)."""
    work, mode = argv
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model, opt = _model_and_opt()
    _train(model, opt, 1, seed=1)
    first = {"model": model.state_dict(), "opt": opt.state_dict()}
    torch.save(first, os.path.join(work, "first.pt"))
    _careful_save(first, os.path.join(work, "plain.pt"))
    save_checkpoint(os.path.join(work, "ckpt"), model, opt, extra={"save": 1})
    if mode == "loop":
        print("READY", flush=True)
        for i in range(2, 10_000):
            _train(model, opt, 1, seed=i)
            ref = os.path.join(work, f"ref{i}.pt")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, ref + ".tmp")
            os.replace(ref + ".tmp", ref)
            save_checkpoint(os.path.join(work, "ckpt"), model, opt, extra={"save": i})
            print(f"SAVED {i}", flush=True)
        return
    _train(model, opt, 1, seed=2)
    second = {"model": model.state_dict(), "opt": opt.state_dict()}
    torch.save(second, os.path.join(work, "second.pt"))
    target = mode[len("pause-"):]
    if target == "plain":
        name, half = "plain.pt.tmp", os.path.getsize(os.path.join(work, "plain.pt")) // 2
    elif target == "data":
        name = "__0_0.distcp"
        half = os.path.getsize(os.path.join(work, "ckpt", name)) // 2
    else:
        name, half = ".metadata.tmp", os.path.getsize(os.path.join(work, "ckpt", ".metadata")) // 2

    def fire(index, step):  # the write that crosses the middle of the target file
        return step[0] == "write" and step[1] == name and step[2] + step[3] > half

    faults = _Faults(fire, _pause)
    with faults.installed():
        if target == "plain":
            _careful_save(second, os.path.join(work, "plain.pt"),
                          wrap=lambda f: faults.wrap(f, "plain.pt.tmp"))
        else:
            save_checkpoint(os.path.join(work, "ckpt"), model, opt, extra={"save": 2})
    print("DONE", flush=True)


def _run_child(work, mode: str, kill_after, timeout: float = 60.0):
    """Runs _child_main(work, mode) in a new interpreter. When a line it prints makes
    ``kill_after(line)`` return a number, waits that many seconds and SIGKILLs it. Returns
    (every line it printed, its return code, its stderr)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(work), mode], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        lines: queue.Queue = queue.Queue()

        def read():
            for line in proc.stdout:
                lines.put(line.strip())
            lines.put(None)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        seen, deadline = [], time.monotonic() + timeout
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if line is None:
                    break
                seen.append(line)
                delay = kill_after(line)
                if delay is not None:
                    time.sleep(delay)
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        finally:
            if proc.poll() is None:
                proc.kill()  # timed out (or killed above, not yet reaped: the same signal)
            proc.wait(timeout=30)
            reader.join(timeout=10)
        while True:  # what it printed before it died
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                seen.append(line)
        err.seek(0)
        return seen, proc.returncode, err.read()


# --- killed saves -------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["data", "metadata", "plain"])
def test_sigkill_half_way_through_a_file_keeps_the_previous_checkpoint(tmp_path, target):
    """Killed (SIGKILL, by this process) while the second save had written half of a file:
    the DCP data file or .metadata of save_checkpoint, or the temporary file of a careful
    user's torch.save. Both checkpoints load as the first save, bit for bit."""
    lines, code, err = _run_child(tmp_path, f"pause-{target}",
                                  lambda line: 0.0 if line == "PAUSED" else None)
    assert lines and lines[-1] == "PAUSED", \
        f"the child never reached the pause: {lines}\n{err[-3000:]}"
    assert code == -signal.SIGKILL, (code, err[-3000:])
    first = _normalized(torch.load(tmp_path / "first.pt", weights_only=True))
    second = _normalized(torch.load(tmp_path / "second.pt", weights_only=True))
    assert _differences(first, second), "the two saves hold the same state: nothing is tested"

    got, extra = _load_fresh(tmp_path / "ckpt")
    _assert_same(got, first, "save_checkpoint folder after the kill")
    assert extra == {"save": 1}

    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    model, opt = _model_and_opt(seed=99)
    model.load_state_dict(plain["model"])
    opt.load_state_dict(plain["opt"])
    _assert_same(_current(model, opt), first, "torch.save file after the kill")

    # a save that completes afterwards replaces it and leaves nothing else behind
    model, opt = _model_and_opt(seed=5)
    _quiet_save(tmp_path / "ckpt", model, opt, extra={"save": 3})
    got, extra = _load_fresh(tmp_path / "ckpt")
    _assert_same(got, _current(model, opt), "the save after the kill")
    assert extra == {"save": 3}
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ckpt") and n != "ckpt"]


def _save_and_die(path: str, model, opt, at, log) -> None:
    """Forked child: save_checkpoint(path) (extra {"save": 2}), SIGKILLing itself at step
    ``at`` of _Faults; with ``log``, record the steps there."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    faults = _Faults(lambda index, step: index == at, _sigkill_self)
    with faults.installed():
        save_checkpoint(path, model, opt, extra={"save": 2})
    if log:
        with open(log, "w") as f:
            json.dump(faults.steps, f)


def _kill_points(steps: list, per_file: int = 8) -> list[int]:
    """Every rename and removal, and up to ``per_file`` writes of each file spread over it
    (its first and last included)."""
    points, writes = set(), {}
    for i, step in enumerate(steps):
        if step[0] == "write":
            writes.setdefault(step[1], []).append(i)
        else:
            points.add(i)
    for idx in writes.values():
        points.update(idx[round(j * (len(idx) - 1) / max(per_file - 1, 1))]
                      for j in range(min(per_file, len(idx))))
    return sorted(points)


def test_sigkill_at_each_step_of_save_checkpoint(tmp_path):
    """save_checkpoint killed at each of its file-system steps (a forked child SIGKILLs
    itself there). Each time the folder loads as one complete save (the first one until the
    second's files are written, the second one from some point on, never back), and a
    complete save afterwards replaces it and leaves no other folder behind."""
    model, opt = _model_and_opt()
    _train(model, opt, 1, seed=1)
    pristine = tmp_path / "first"
    _quiet_save(pristine, model, opt, extra={"save": 1})
    first = _current(model, opt)
    _train(model, opt, 1, seed=2)
    second = _current(model, opt)
    ctx = multiprocessing.get_context("fork")

    def run(at, work, log=None):
        shutil.copytree(pristine, work / "ckpt")
        proc = ctx.Process(target=_save_and_die, args=(str(work / "ckpt"), model, opt, at, log))
        proc.start()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return proc.exitcode

    log = tmp_path / "steps.json"
    assert run(None, tmp_path / "complete", str(log)) == 0
    steps = [tuple(s) for s in json.loads(log.read_text())]
    assert any(s[0] == "write" for s in steps), steps
    _assert_same(_load_fresh(tmp_path / "complete" / "ckpt")[0], second, "a complete save")

    problems, outcomes = [], []
    for at in _kill_points(steps):
        work = tmp_path / f"kill{at}"
        code = run(at, work)
        what = f"killed after step {at} {steps[at]}"
        if code != -signal.SIGKILL:
            problems.append(f"{what}: the child exited with {code}")
            continue
        if not (work / "ckpt").exists():  # killed between two renames: said, not hidden
            with pytest.warns(RuntimeWarning, match="interrupted"):
                load_checkpoint(work / "ckpt", *_model_and_opt(seed=99))
        try:
            got, extra = _load_fresh(work / "ckpt")
        except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
            problems.append(f"{what}: loading raised {type(exc).__name__}: {str(exc)[:200]}")
            outcomes.append(None)
        else:
            which = (1 if not _differences(got, first) and extra == {"save": 1} else
                     2 if not _differences(got, second) and extra == {"save": 2} else None)
            outcomes.append(which)
            if which is None:
                problems.append(f"{what}: loaded neither save (extra {extra})")
            elif steps[at][0] == "write" and which != 1:
                problems.append(f"{what}: a save still writing its files replaced the checkpoint")
            elif which == 1 and 2 in outcomes[:-1]:
                problems.append(f"{what}: the first save, after an earlier kill gave the second")
        _quiet_save(work / "ckpt", model, opt, extra={"save": 2})  # completes: replaces it
        got, extra = _load_fresh(work / "ckpt")
        if _differences(got, second) or extra != {"save": 2}:
            problems.append(f"{what}: the save after the kill did not load back")
        if sorted(os.listdir(work)) != ["ckpt"]:
            problems.append(f"{what}: left behind {sorted(os.listdir(work))}")
    assert not problems, "\n".join(problems)
    assert outcomes[0] == 1 and outcomes[-1] == 2, outcomes


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_of_repeated_saves(tmp_path, seed):
    """An interpreter saving a checkpoint after every step (its state written to ref<i>.pt
    before save i starts) is SIGKILLed after a random delay: the folder loads as the last
    save that completed or the one in flight, bit for bit as its reference."""
    delay = random.Random(seed).uniform(0.05, 1.2)
    lines, code, err = _run_child(tmp_path, "loop", lambda line: delay if line == "READY" else None)
    assert "READY" in lines, f"{lines}\n{err[-3000:]}"
    assert code == -signal.SIGKILL, (code, err[-3000:])
    done = max([int(line.split()[1]) for line in lines if line.startswith("SAVED")], default=1)
    got, extra = _load_fresh(tmp_path / "ckpt")
    i = extra["save"]
    assert i in (done, done + 1), (i, done)
    ref = tmp_path / ("first.pt" if i == 1 else f"ref{i}.pt")
    _assert_same(got, _normalized(torch.load(ref, weights_only=True)),
                 f"the folder (save {i}; delay {delay:.3f} s, last completed save {done})")


# --- truncated torch.save files -----------------------------------------------------------------

def _truncate(path, keep) -> None:
    size = os.path.getsize(path)
    n = size - 1 if keep == "all-but-1" else int(size * keep)
    with open(path, "r+b") as f:
        f.truncate(n)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, "all-but-1"])
def test_truncated_torch_save_file_of_a_quantized_model_fails_and_changes_nothing(tmp_path, keep):
    """torch.save({"model": quantized model, "opt": AdamW8bit}) cut short: torch.load raises
    (the file is corrupt), so model.load_state_dict / opt.load_state_dict are never given a
    partial state; the model and optimizer are as before. The whole file loads exactly."""
    saved_model, saved_opt = _quantized_model_and_opt(seed=0)
    _train(saved_model, saved_opt, 1, seed=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": saved_model.state_dict(), "opt": saved_opt.state_dict()}, path)
    saved = _current(saved_model, saved_opt)
    shutil.copy(path, tmp_path / "whole.pt")

    model, opt = _quantized_model_and_opt(seed=1)
    _train(model, opt, 2, seed=3)
    before = _current(model, opt)
    assert _differences(before, saved)
    _truncate(path, keep)
    # torch's reader: "PytorchStreamReader failed reading zip archive ... corrupted", or, for
    # a file cut early, a bare "OSError: [Errno 22] Invalid argument" from its seek
    with pytest.raises((RuntimeError, OSError)) as info:
        torch.load(path, weights_only=True)
    assert re.search(r"corrupt|zip archive|Invalid argument", str(info.value)), info.value
    _assert_same(_current(model, opt), before, "after the failed load")

    sd = torch.load(tmp_path / "whole.pt", weights_only=True)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["opt"])
    _assert_same(_current(model, opt), saved, "after loading the whole file")


def _cut(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)[: t.numel() // 2].clone()


def _layer(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = (torch_ops.LinearNF4(256, 256) if kind == "nf4"
             else torch_ops.Linear8bitLt(256, 256, has_fp16_weights=False))
    return torch.nn.Sequential(layer).to("cpu")


_NF4_KEYS = ("weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
             "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4")
_INT8_KEYS = ("weight", "bias", "SCB", "weight_format")
# found by this module; torch_ops/linear4bit.py, linear8bit.py and reference/fourbit.py are
# outside its remit, so these stay documented here until they are fixed there
def _entry_cases():
    for kind, keys in (("nf4", _NF4_KEYS), ("int8", _INT8_KEYS)):
        for key in keys:
            yield pytest.param(kind, key, id=f"{kind}-{key}")


@pytest.mark.parametrize("kind,key", list(_entry_cases()))
def test_quantized_layer_refuses_a_cut_entry_and_changes_nothing(kind, key):
    """One entry of a quantized layer's state_dict (packed weight, quantization state,
    bias) cut to half its elements: load_state_dict raises an error naming the layer's entry
    and the layer (state_dict, quantization state) is as before. The whole dict loads."""
    sd = _layer(kind, 0).state_dict()
    model = _layer(kind, 1)
    before = _plain(dict(model.state_dict()))
    bad = dict(sd)
    bad[f"0.{key}"] = _cut(sd[f"0.{key}"])
    with pytest.raises((RuntimeError, ValueError), match=r"\b0\.(weight|bias|SCB)"):
        model.load_state_dict(bad)
    _assert_same(_plain(dict(model.state_dict())), before, f"after the failed load ({key} cut)")
    model.load_state_dict(sd)  # the control
    _assert_same(_plain(dict(model.state_dict())), _plain(dict(sd)), "after loading the whole")


@pytest.mark.parametrize("kind,key", [(kind, key) for kind, keys in (("nf4", _NF4_KEYS),
                                                                      ("int8", _INT8_KEYS))
                                      for key in keys if key != "weight_format"])
def test_quantized_layer_refuses_a_missing_entry(kind, key):
    """One entry missing: load_state_dict raises naming it. (torch's strict loading copies
    the entries that are there before it raises: a layer given its bias but not its weight,
    or the reverse, takes the one it was given, as nn.Linear does; a missing quantization
    entry changes nothing.)"""
    sd = _layer(kind, 0).state_dict()
    model = _layer(kind, 1)
    before = _plain(dict(model.state_dict()))
    bad = dict(sd)
    del bad[f"0.{key}"]
    with pytest.raises(RuntimeError, match=r"\b0\.(weight|bias|SCB)"):
        model.load_state_dict(bad)
    if key not in ("weight", "bias"):
        _assert_same(_plain(dict(model.state_dict())), before,
                     f"after the failed load ({key} missing)")


def _opt_variants():
    """(name, how to damage a copy of a state_dict of _model_and_opt's optimizer: parameters
    0, 2 are 8-bit weights, 1, 3 32-bit biases)."""
    def q(sd, i):
        return sd["state"][i][QUANT_STATE_KEY]

    def cut(i, k):
        def f(sd):
            q(sd, i)[k] = _cut(q(sd, i)[k])
        return f

    def drop(i, k):
        def f(sd):
            if k in sd["state"][i]:
                del sd["state"][i][k]
            else:
                del q(sd, i)[k]
        return f

    def empty_step(sd):
        sd["state"][2]["step"] = torch.empty(0)

    def groups_cut(sd):
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:2]

    def groups_lost(sd):
        del sd["param_groups"]

    out = [(f"state {i} {k} cut", cut(i, k)) for i, k in
           ((0, "state1"), (2, "state1"), (2, "state2"), (2, "absmax1"), (2, "absmax2"),
            (2, "qmap1"), (2, "qmap2"), (3, "state1"), (3, "state2"))]
    out += [(f"state {i} {k} missing", drop(i, k)) for i, k in
            ((2, "step"), (2, "state2"), (2, "absmax1"), (2, "qmap2"), (3, "state2"))]
    out += [("state 2 step empty", empty_step), ("param_groups params cut", groups_cut),
            ("param_groups missing", groups_lost)]
    return out


@pytest.mark.parametrize("name,damage", _opt_variants(), ids=[n for n, _ in _opt_variants()])
def test_optimizer_load_state_dict_refuses_cut_state_and_changes_nothing(name, damage):
    """Optimizer8bit.load_state_dict given a state_dict with one entry cut short or missing
    (late in the dict, after entries that are fine, and with another learning rate in its
    param_groups): an error, and the optimizer's state tensors, steps and param_groups are
    exactly as before."""
    import copy
    model, opt = _model_and_opt(seed=0)
    _train(model, opt, 1, seed=1)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    bad = copy.deepcopy(sd)
    damage(bad)

    model2, opt2 = _model_and_opt(seed=1)
    _train(model2, opt2, 2, seed=3)
    before = _current(model2, opt2)
    with pytest.raises((ValueError, KeyError)) as info:
        opt2.load_state_dict(bad)
    assert str(info.value)
    _assert_same(_current(model2, opt2), before, f"after the failed load ({name})")
    opt2.load_state_dict(sd)  # the control
    assert opt2.param_groups[0]["lr"] == 0.5


# --- truncated save_checkpoint folders ----------------------------------------------------------

def _dcp_case(tmp_path, fresh_opt: bool = False):
    saved_model, saved_opt = _model_and_opt(seed=0)
    _train(saved_model, saved_opt, 1, seed=1)
    _quiet_save(tmp_path / "ckpt", saved_model, saved_opt, extra={"save": 1})
    model, opt = _model_and_opt(seed=1)
    if not fresh_opt:
        _train(model, opt, 2, seed=3)
    return model, opt, _current(saved_model, saved_opt)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, "all-but-1", "missing"])
@pytest.mark.parametrize("target", ["__0_0.distcp", ".metadata"])
def test_truncated_checkpoint_folder_fails_and_changes_nothing(tmp_path, target, keep):
    """A save_checkpoint folder whose data file or .metadata is cut short (or gone):
    load_checkpoint raises an ordinary exception naming the folder (a ValueError, not DCP's
    CheckpointException, a BaseException that `except Exception` misses) and the model's
    parameters and the optimizer's state and param_groups are exactly as before."""
    model, opt, saved = _dcp_case(tmp_path)
    before = _current(model, opt)
    path = tmp_path / "ckpt" / target
    if keep == "missing":
        path.unlink()
    else:
        _truncate(path, keep)
    try:
        load_checkpoint(tmp_path / "ckpt", model, opt)
    except BaseException as exc:
        error = exc
    else:
        error = None
    assert error is not None, "loaded without an error"
    if keep == "missing" and target == ".metadata":
        assert isinstance(error, FileNotFoundError), repr(error)
    else:
        assert isinstance(error, ValueError), f"{type(error).__name__}: {str(error)[-500:]}"
        assert str(tmp_path / "ckpt") in str(error), str(error)
    _assert_same(_current(model, opt), before, "after the failed load")


def test_failed_load_checkpoint_leaves_an_optimizer_without_state_without_state(tmp_path):
    """load_checkpoint makes the optimizer's state (zeros) to load into; when loading fails
    an optimizer that had none has none afterwards."""
    model, opt, saved = _dcp_case(tmp_path, fresh_opt=True)
    before = _current(model, opt)
    assert not opt.state
    _truncate(tmp_path / "ckpt" / "__0_0.distcp", 0.5)
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "ckpt", model, opt)
    assert not opt.state
    _assert_same(_current(model, opt), before, "after the failed load")


# --- the same replacement on two ranks ----------------------------------------------------------

def _two_ranks(rank: int, port: int, folder: str) -> None:
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        model, opt = _model_and_opt()   # the same on both ranks (replicated: DDP's layout)
        _train(model, opt, 1, seed=1)
        ckpt = os.path.join(folder, "ckpt")
        save_checkpoint(ckpt, model, opt, extra={"save": 1})
        if rank == 0:  # what a save killed earlier left: a partial folder
            os.makedirs(ckpt + ".save_checkpoint-partial")
            with open(os.path.join(ckpt + ".save_checkpoint-partial", "__1_0.distcp"), "wb") as f:
                f.write(b"junk")
        dist.barrier()
        _train(model, opt, 1, seed=2)
        save_checkpoint(ckpt, model, opt, extra={"save": 2})
        if rank == 0:
            got, extra = _load_fresh(ckpt, no_dist=True)  # this process alone
            _assert_same(got, _current(model, opt), "the second 2-rank save")
            assert extra == {"save": 2}
            assert sorted(os.listdir(folder)) == ["ckpt"], os.listdir(folder)
            for name in os.listdir(ckpt):
                with open(os.path.join(ckpt, name), "rb") as f:
                    assert f.read() != b"junk", f"{name}: the killed save's file was kept"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_replace_a_checkpoint(tmp_path):
    """save_checkpoint on two gloo ranks, twice to the same folder, a partial folder of a
    killed save lying beside: rank 0 clears it, every rank writes, rank 0 moves the complete
    checkpoint into place; the folder loads as the second save and nothing else is left."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_ranks, args=(port, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
