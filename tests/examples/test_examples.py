"""The examples ``examples/train_trainer.py`` and ``examples/train_accelerate.py``, run as scripts (subprocesses)
with ``--tiny`` (a random 2-layer BERT and synthetic data, SURM circulant at LoRA r=8's budget).

Each example runs once uninterrupted for 6 steps with a checkpoint every 3 (module fixtures), then once resumed
from ``checkpoint-3`` into another folder. Checked: training runs and writes a loadable adapter; checkpoints hold
the adapter (plus optimizer / scheduler / RNG state) and no full-model weights; the resumed run's step losses are
exactly those of the uninterrupted run (dropout is on, so the RNG state must be restored too).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from testkit import subprocess_env

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = {"trainer": EXAMPLES / "train_trainer.py", "accelerate": EXAMPLES / "train_accelerate.py"}
# one compute path in every process: "auto" times the paths per process, and a run that picked another path would
# round its gradients differently (the resume and launch tests compare runs bit for bit)
TINY = ["--tiny", "--max-steps", "6", "--save-steps", "3", "--batch-size", "8", "--lr", "2e-2", "--compute", "hybrid"]
FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_RUNS: dict[str, Path] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def uninterrupted(name: str, tmp_path_factory) -> Path:
    """The 6-step run of example ``name`` (run once per session)."""
    if name not in _RUNS:
        out = tmp_path_factory.mktemp(f"{name}-full")
        run_script([sys.executable, str(SCRIPTS[name]), "--output-dir", str(out), *TINY])
        _RUNS[name] = out
    return _RUNS[name]


def losses(folder: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in json.loads((folder / "losses.json").read_text())}


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_trains_and_saves_a_loadable_adapter(name, tmp_path_factory):
    from peft import PeftModel
    from transformers import BertConfig, BertForSequenceClassification

    import structpeft  # noqa: F401  (registers SURM for PeftModel.from_pretrained)

    out = uninterrupted(name, tmp_path_factory)
    curve = losses(out)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert all(0 < v < 10 for v in curve.values())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SURM" and config["structure"] == "circulant"
    # the trained adapter loads onto the same tiny base (rebuilt from the examples' config) and changes it
    cfg = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=12,
        num_labels=4,
    )
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(out / "adapter"))
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)
    deltas = [layer.surm_op["default"].to_dense() for _, layer in model.base_model.structured_layers()]
    assert len(deltas) == 4 and all(torch.count_nonzero(d) for d in deltas)


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_checkpoints_hold_the_adapter_only(name, tmp_path_factory):
    out = uninterrupted(name, tmp_path_factory)
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    for ckpt in checkpoints:
        files = {p.name for p in (out / ckpt).iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files, files
        assert not files & set(FULL_MODEL_FILES), files
        assert any(f.startswith(("optimizer", "scheduler")) for f in files), files
        with safe_open(str(out / ckpt / "adapter_model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
        # structured tensors plus the classification head (PEFT's modules_to_save for SEQ_CLS), nothing else
        assert keys and all(".surm_op." in k or ".classifier." in k for k in keys), keys
        assert any(".surm_op." in k for k in keys)
        assert not any("base_layer" in k or "embeddings" in k for k in keys)


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_resume_continues_the_same_loss_curve(name, tmp_path_factory):
    full = uninterrupted(name, tmp_path_factory)
    resumed = tmp_path_factory.mktemp(f"{name}-resumed")
    # the resumed process leaves the path to "auto": it must take the one the checkpoint recorded ("hybrid"), not
    # time the paths again (config.for_resume)
    tiny = [*TINY[:-1], "auto"]
    cmd = [sys.executable, str(SCRIPTS[name]), "--output-dir", str(resumed), *tiny]
    run_script([*cmd, "--resume-from-checkpoint", str(full / "checkpoint-3")])
    recorded = json.loads((resumed / "adapter" / "adapter_config.json").read_text())["layer_options"]
    assert recorded and all(rec["compute"] == {"delta": "hybrid"} for rec in recorded.values())
    expected = {step: loss for step, loss in losses(full).items() if step > 3}
    assert losses(resumed) == expected
    # the final adapters agree as well
    from safetensors.torch import load_file

    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _launch(name: str) -> list[str]:
    """The 2-process launch command of example ``name``: torchrun for the Trainer one, ``accelerate launch``
    (torchrun underneath; gloo on a CPU-only machine) for the accelerate one."""
    if name == "trainer":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "--main_process_port", str(free_port())]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_two_process_launch_matches_one_process(name, tmp_path):
    """The example launched as 2 CPU processes (DDP over gloo; batch 4 each) follows the 1-process run with batch
    8: both see the same global batches, so the loss curves and the final adapters agree to float32 rounding
    (dropout off: two ranks draw other dropout masks than one process). About 60 s."""
    args = ["--tiny", "--tiny-dropout", "0", "--max-steps", "4", "--save-steps", "2", "--lr", "2e-2"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_script([sys.executable, str(SCRIPTS[name]), "--output-dir", str(single), *args, "--batch-size", "8"])
    run_script([*_launch(name), str(SCRIPTS[name]), "--output-dir", str(ddp), *args, "--batch-size", "4"])
    rng_files = {p.name for p in (ddp / "checkpoint-2").iterdir() if p.name.startswith(("rng_state", "random_states"))}
    assert len(rng_files) == 2, rng_files  # one per process: really two processes
    one, two = losses(single), losses(ddp)
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    from safetensors.torch import load_file

    a = load_file(single / "adapter" / "adapter_model.safetensors")
    b = load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
