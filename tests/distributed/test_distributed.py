"""DDP, FSDP1 and FSDP2 on CPU (gloo, 2 processes launched with torchrun) against a single-process run.

One ``torchrun --standalone --nproc_per_node 2 dist_worker.py`` launch (module fixture) trains every case of
``dist_cases.CASES`` — SURM circulant / Kronecker (LoRA placement) on nn.Linear, a bottleneck SURM-Adapter, PMSS,
SURM LDR on GPT-2's Conv1D, and three with ``keep_folded_weight`` (W_eff held from the forward to the backward,
across FSDP's reshard: Kronecker "hybrid", PMSS and LDR "dense") — with DDP, with FSDP1
(``FullyShardedDataParallel``, one unit per block + root, ``use_orig_params=True``: frozen base weights and
trainable structured parameters in one flat parameter) and with FSDP2 (``fully_shard`` per block + root: frozen base
weights and trainable structured parameters sharded side by side). Each test compares one (case, mode) with the
single-process reference of ``dist_cases.reference_run`` computed here.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_cases import CASES, reference_run
from safetensors.torch import load_file

from testkit import subprocess_env

HERE = Path(__file__).resolve().parent
WORLD = 2
MODES = ("ddp", "fsdp1", "fsdp2")
PARAMS = [pytest.param(c, m, id=f"{c.id}-{m}") for c in CASES for m in MODES]
_REFERENCES: dict[str, tuple[dict, Path]] = {}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Run the worker once with torchrun (2 gloo processes, a free port); return its output folder."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on localhost with a free port
        "--nproc_per_node",
        str(WORLD),
        str(HERE / "dist_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=HERE)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


def reference(case, tmp_path_factory) -> tuple[dict, Path]:
    """The single-process run of ``case`` (computed once, with one intra-op thread like the workers)."""
    if case.id not in _REFERENCES:
        folder = tmp_path_factory.mktemp(f"ref-{case.id}")
        _REFERENCES[case.id] = (reference_run(case, WORLD, str(folder)), folder)
    return _REFERENCES[case.id]


def reference_for(case, mode: str):
    """The case whose single-process run ``mode`` must match bit for bit. Under FSDP1 a "hybrid" layer trains by
    the folded "dense" path: FSDP1 hands the layer its frozen base weight as a view of a flat parameter that
    requires grad (the unit also holds the adapter), and the hybrid path is for frozen base weights only
    (``StructuredLayer._trains_hybrid``); both paths give the same gradients up to float rounding."""
    if mode == "fsdp1" and case.options.get("compute") == "hybrid":
        return dataclasses.replace(case, id=f"{case.id}-as-dense", options={**case.options, "compute": "dense"})
    return case


def _result(launched: Path, case, mode: str) -> dict:
    return torch.load(launched / case.id / mode / "result.pt")


@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_adapter_gradients_equal_single_process(launched, tmp_path_factory, case, mode):
    """First-step gradients of every trainable parameter after DDP's all-reduce / FSDP1's and FSDP2's
    reduce-scatter (gathered) equal the single-process gradients of the same global batch:

    * to 1e-6 (absolute; gradients here are at most ~0.2 in float32, so this is ~40 float32 ulps of the largest
      entry; measured ≤ 2e-8) against ONE backward of the global-batch loss;
    * bit for bit against the same gradient assembled as the collectives do, (g_0 + g_1) / 2 from the two halves.
    """
    ref, _ = reference(reference_for(case, mode), tmp_path_factory)
    got = _result(launched, case, mode)
    prefix = case.config().param_prefix
    assert got["grads"].keys() == ref["grads"].keys() == set(got["trainable"])
    assert all(prefix in name for name in got["grads"]), sorted(got["grads"])
    assert all(torch.count_nonzero(g) for g in got["grads"].values())
    for name, grad in got["grads"].items():
        torch.testing.assert_close(grad, ref["full_grads"][name], atol=1e-6, rtol=0, msg=name)
        assert torch.equal(grad, ref["grads"][name]), (name, (grad - ref["grads"][name]).abs().max())
    assert got["frozen_changed"] == []  # the frozen base weights are untouched after the training steps
    if mode == "fsdp1":
        # FSDP1 computes (and reduces) the gradient of its whole flat parameter, frozen parts included (its
        # documented cost of mixing frozen and trainable parameters in one unit); the optimiser never sees them
        assert got["frozen_with_grad"]
    else:
        assert got["frozen_with_grad"] == []  # frozen base weights get no gradient (and no all-reduce)


@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_saved_adapter_identical_to_single_process(launched, tmp_path_factory, case, mode):
    """After 3 AdamW steps the adapter saved by rank 0 is byte-identical to the single-process one, and the loss
    curve (mean of the rank losses) is the single-process global-batch loss curve."""
    ref, ref_folder = reference(reference_for(case, mode), tmp_path_factory)
    got = _result(launched, case, mode)
    assert got["world"] == WORLD
    assert got["losses"] == ref["losses"]
    folder = launched / case.id / mode / "adapter"
    weights = "adapter_model.safetensors"
    assert (folder / weights).read_bytes() == (ref_folder / weights).read_bytes()
    tensors = load_file(folder / "adapter_model.safetensors")
    assert set(tensors) and all(case.config().param_prefix in k for k in tensors)  # the adapter only
    # the configs agree except for the order in which a set (target_modules) was written, which follows the
    # per-process string hash seed
    configs = [json.loads((f / "adapter_config.json").read_text()) for f in (folder, ref_folder)]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])
    if reference_for(case, mode) is not case:  # the reference ran as "dense": the saved config keeps "hybrid"
        assert configs[0]["compute"] == case.options["compute"]
        for config in configs:
            config.pop("compute")
            for layer in config["layer_options"].values():
                layer.pop("compute")
    assert configs[0] == configs[1]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fsdp2_shards_frozen_base_and_trainable_structured_parameters(launched, case):
    """Under FSDP2 every parameter, frozen base weight or trainable structured one, is a sharded DTensor; the
    structured ones train (see the gradient test), the frozen ones do not."""
    got = _result(launched, case, "fsdp2")
    prefix = case.config().param_prefix
    assert set(got["trainable"]) <= set(got["sharded"])
    assert any("base_layer" in n for n in got["sharded"])
    assert any(prefix in n for n in got["sharded"])
    assert not _result(launched, case, "ddp")["sharded"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fsdp1_shards_frozen_base_and_trainable_structured_parameters(launched, case):
    """Under FSDP1 (``use_orig_params=True``) rank 0 holds only part of the parameters, frozen base weights and
    trainable structured ones alike: their local views of the flat parameter's shard have fewer elements than the
    full parameters, and the trainable ones are exactly the adapter's."""
    got = _result(launched, case, "fsdp1")
    prefix = case.config().param_prefix
    assert got["trainable"] and all(prefix in n for n in got["trainable"])
    assert any("base_layer" in n for n in got["sharded"])
    assert any(prefix in n for n in got["sharded"])
