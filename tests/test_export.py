"""to_lora: a structured adapter exported as a plain PEFT LoRA checkpoint loads without structpeft."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers  # noqa: F401 - the test extra's: the bases below are transformers models
from peft import get_peft_model

import structpeft
import testkit
from structpeft.errors import ConfigError


def _base():
    torch.manual_seed(0)
    return testkit.tiny_bert_cls().eval()


CONFIGS = {
    "surm-circulant": lambda: structpeft.SurmConfig(
        structure="circulant", target_modules=["query", "value"], modules_to_save=["classifier"], init_weights=False
    ),
    "surm-kronecker": lambda: structpeft.SurmConfig(
        structure="kronecker", target_modules=["query", "intermediate.dense"], init_weights=False, alpha=0.5
    ),
    # alpha: the random core's effect on the logits was 5e-6, below the 1e-5 the outputs were compared at
    "pmss": lambda: structpeft.PmssConfig(
        target_modules=["query", "value"], k_in=5, k_out=4, init_weights=False, alpha=300.0
    ),
}

# the bases as expressions (evaluated here and in the child process that never imports structpeft, with torch,
# testkit and transformers in scope) and how to read their output
BERT = ("testkit.tiny_bert_cls()", "logits", lambda g: {"input_ids": torch.randint(0, 64, (2, 7), generator=g)})
GPT2 = ("testkit.tiny_gpt2()", "last_hidden_state", lambda g: {"input_ids": torch.randint(0, 50, (2, 9), generator=g)})
CONVNET = ("testkit.TinyConvNet()", None, lambda g: {"x": torch.randn(2, 3, 8, 8, generator=g)})
# a linear SURM-Adapter exports only on layers without a bias (the adapter block then has none)
NO_BIAS_MLP = (
    "torch.nn.Sequential(torch.nn.Linear(10, 12, bias=False), torch.nn.Tanh(), torch.nn.Linear(12, 5, bias=False))",
    None,
    lambda g: {"input": torch.randn(4, 10, generator=g)},
)

# name -> (base, config factory): every layer type and placement export.py supports
EXPORT_CASES = {
    **{name: (BERT, config) for name, config in CONFIGS.items()},
    "surm-toeplitz": (
        BERT,
        lambda: structpeft.SurmConfig(structure="toeplitz", target_modules=["query", "value"], init_weights=False),
    ),
    "surm-ldr": (
        BERT,
        lambda: structpeft.SurmConfig(
            structure="ldr",
            block_size=8,
            displacement_rank=2,
            target_modules=["key", "output.dense"],
            init_weights=False,
        ),
    ),
    "surm-adapter-placement": (
        NO_BIAS_MLP,
        lambda: structpeft.SurmConfig(placement="adapter", target_modules=["0", "2"], init_weights=False, alpha=0.5),
    ),
    "surm-gpt2-conv1d": (
        GPT2,
        lambda: structpeft.SurmConfig(structure="circulant", target_modules=["c_attn", "c_fc"], init_weights=False),
    ),
    "surm-conv2d": (  # conv0: groups = 1 (conv1 has groups = 2, which LoRA cannot express)
        CONVNET,
        lambda: structpeft.SurmConfig(structure="kronecker", target_modules=["conv0"], init_weights=False),
    ),
    "pmss-gpt2-conv1d": (
        GPT2,
        lambda: structpeft.PmssConfig(target_modules=["c_attn"], k_in=6, k_out=6, init_weights=False),
    ),
}

LOAD_WITHOUT_STRUCTPEFT = """
import torch
torch.set_num_threads(1)
import transformers
from peft import PeftModel
import testkit

jobs = torch.load(sys.argv[1])
results = {}
for name, job in jobs.items():
    try:
        base = eval(job["base"], {"torch": torch, "testkit": testkit, "transformers": transformers}).eval()
        base.load_state_dict(job["state"])
        with torch.no_grad():
            plain = base(**job["inputs"])
        model = PeftModel.from_pretrained(base, job["lora"]).eval()
        with torch.no_grad():
            out = model(**job["inputs"])
        read = (lambda o: o) if job["output"] is None else (lambda o: getattr(o, job["output"]))
        results[name] = {"output": read(out), "plain": read(plain)}
    except Exception as err:
        results[name] = {"error": f"{type(err).__name__}: {err}"}
assert "structpeft" not in sys.modules
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case of EXPORT_CASES exported at full rank, then loaded by PEFT alone in ONE fresh interpreter that
    never imports structpeft: {name: (reports, structured model's output, the child's result)}."""
    root = tmp_path_factory.mktemp("export")
    jobs, expected = {}, {}
    for i, (name, ((base_expr, output, make_inputs), config)) in enumerate(sorted(EXPORT_CASES.items())):
        torch.manual_seed(0)
        base = eval(base_expr, {"torch": torch, "testkit": testkit}).eval()
        state = {k: v.clone() for k, v in base.state_dict().items()}
        model = get_peft_model(base, config()).eval()
        inputs = make_inputs(torch.Generator().manual_seed(i))
        with torch.no_grad():
            out = model(**inputs)
        reports = structpeft.to_lora(model, str(root / name), rank=64)
        expected[name] = (reports, out if output is None else getattr(out, output))
        jobs[name] = {"base": base_expr, "output": output, "state": state, "inputs": inputs, "lora": str(root / name)}
    torch.save(jobs, root / "jobs.pt")
    testkit.run_python(LOAD_WITHOUT_STRUCTPEFT, str(root / "jobs.pt"), str(root / "results.pt"), path=testkit.TESTS_DIR)
    results = torch.load(root / "results.pt")
    return {name: (*expected[name], results[name]) for name in EXPORT_CASES}


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_full_rank_export_reproduces_outputs_without_structpeft(name, exported):
    reports, expected, loaded = exported[name]
    assert "error" not in loaded, loaded.get("error")
    assert reports and all(r.relative_error < 1e-6 for r in reports), reports
    # the adapter changes the output by more than 1 % of its scale (so that a LoRA loaded as zeros fails), and the
    # LoRA reproduces that change to 1e-3 of it (at most 1.1e-5 here)
    effect = float((loaded["plain"] - expected).abs().max())
    assert effect > 1e-2 * float(expected.abs().max())
    assert float((loaded["output"] - expected).abs().max()) <= 1e-3 * effect


def test_energy_truncation_reports_the_error_it_makes(tmp_path):
    model = get_peft_model(_base(), CONFIGS["surm-circulant"]())
    reports = structpeft.to_lora(model, str(tmp_path / "lora"), energy=0.5)
    saved = json.load(open(tmp_path / "lora" / "export_report.json"))
    assert [r["rank"] for r in saved] == [r.rank for r in reports]
    for r in reports:
        assert 1 <= r.rank < min(r.shape)
        assert 0 < r.relative_error < 1
        # energy 0.5 keeps half of sum(sigma^2): the relative Frobenius error is at most sqrt(0.5)
        assert r.relative_error <= 0.5**0.5 + 1e-9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"rank=None, energy=None: give exactly one"),
        ({"rank": 2, "energy": 0.9}, r"rank=2, energy=0\.9: give exactly one"),
        ({"rank": 0}, r"rank=0 is invalid"),
        ({"rank": 2.0}, r"rank=2\.0 is invalid"),
        ({"energy": 1.5}, r"energy=1\.5 is invalid"),
        ({"energy": 0}, r"energy=0 is invalid"),
    ],
)
def test_bad_arguments_raise_before_writing(kwargs, message, tmp_path):
    model = get_peft_model(_base(), CONFIGS["surm-circulant"]())
    with pytest.raises(ConfigError, match=message):
        structpeft.to_lora(model, str(tmp_path / "lora"), **kwargs)
    assert not os.path.exists(tmp_path / "lora")


def test_unknown_adapter_name_names_the_valid_ones_before_writing(tmp_path):
    model = get_peft_model(_base(), CONFIGS["surm-circulant"]())
    with pytest.raises(ConfigError, match=r"adapter_name='other'.*\['default'\]"):
        structpeft.to_lora(model, str(tmp_path / "lora"), adapter_name="other", rank=2)
    assert not os.path.exists(tmp_path / "lora")


def _listing(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_a_folder_with_other_files_is_refused_and_kept(tmp_path):
    """Exporting into the folder of the structured adapter itself (or any folder with other files) must not replace
    it: ConfigError naming the folder, every file kept byte for byte, nothing else written next to it."""
    model = get_peft_model(_base(), CONFIGS["surm-circulant"]())
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    (folder / "notes.txt").write_text("mine")
    before = _listing(folder)
    with pytest.raises(ConfigError, match=r"output_dir=.*adapter.*not empty.*notes\.txt"):
        structpeft.to_lora(model, str(folder), rank=2)
    assert _listing(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folder left behind


def test_a_file_as_output_dir_is_refused(tmp_path):
    model = get_peft_model(_base(), CONFIGS["surm-circulant"]())
    path = tmp_path / "lora"
    path.write_text("a file")
    with pytest.raises(ConfigError, match="not a folder"):
        structpeft.to_lora(model, str(path), rank=2)
    assert path.read_text() == "a file"


def test_an_earlier_export_or_an_empty_folder_is_replaced(tmp_path):
    model = get_peft_model(_base(), CONFIGS["surm-circulant"]())
    out = tmp_path / "lora"
    out.mkdir()
    structpeft.to_lora(model, str(out), rank=1)  # an empty folder
    first = json.loads((out / "export_report.json").read_text())
    structpeft.to_lora(model, str(out), rank=3)  # an earlier export: replaced as a whole
    assert {r["rank"] for r in json.loads((out / "export_report.json").read_text())} == {3}
    assert {r["rank"] for r in first} == {1}
    assert sorted(os.listdir(tmp_path)) == ["lora"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)  # a normal folder, not a private temporary one


def test_a_non_finite_adapter_names_the_layer_and_writes_nothing(tmp_path):
    from structpeft.errors import MergeError

    model = get_peft_model(_base(), CONFIGS["pmss"]())
    core = next(p for n, p in model.named_parameters() if "layer.1.attention.self.value" in n and "pmss_" in n)
    with torch.no_grad():
        core.view(-1)[0] = float("nan")
    with pytest.raises(MergeError, match=r"layer\.1\.attention\.self\.value.*non-finite"):
        structpeft.to_lora(model, str(tmp_path / "lora"), rank=2)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ audit cases
class _ConvNet(torch.nn.Module):
    def __init__(self, **conv: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, **conv)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        ({"dilation": 2}, r"dilation=\(2, 2\)"),
        ({"padding_mode": "reflect"}, "padding_mode='reflect'"),
        ({"groups": 3}, "groups=3"),
    ],
    ids=["dilation", "reflect", "groups"],
)
def test_conv2d_that_lora_cannot_express_is_refused_naming_the_layer(conv, message, tmp_path):
    """PEFT's LoRA Conv2d keeps kernel size, stride and padding only: with dilation 2 the export did not load, with
    reflect padding it loaded and gave other outputs (2.6 off); grouped convolutions have no LoRA form either."""
    from structpeft.errors import UnsupportedLayerError

    model = get_peft_model(_ConvNet(**conv), structpeft.SurmConfig(target_modules=["conv"], init_weights=False))
    with pytest.raises(UnsupportedLayerError, match=rf"'conv'.*{message}"):
        structpeft.to_lora(model, str(tmp_path / "lora"), rank=4)
    assert not (tmp_path / "lora").exists()


def test_a_non_linear_adapter_is_refused_naming_the_layer(tmp_path):
    from structpeft.errors import UnsupportedLayerError

    config = structpeft.SurmConfig(
        placement="adapter", activation="gelu", target_modules=["attention.output.dense"], init_weights=False
    )
    model = get_peft_model(_base(), config)
    with pytest.raises(UnsupportedLayerError, match=r"attention\.output\.dense.*activation='gelu'"):
        structpeft.to_lora(model, str(tmp_path / "lora"), rank=4)


def test_an_adapter_block_with_a_bias_is_refused_naming_the_layer(tmp_path):
    """A linear (identity) SURM-Adapter on a layer with a bias has a bias of its own, which LoRA cannot hold."""
    from structpeft.errors import UnsupportedLayerError

    config = structpeft.SurmConfig(placement="adapter", target_modules=["attention.output.dense"], init_weights=False)
    model = get_peft_model(_base(), config)
    with pytest.raises(
        UnsupportedLayerError, match=r"layer '[\w.]*attention\.output\.dense'.*adapter block with a bias"
    ):
        structpeft.to_lora(model, str(tmp_path / "lora"), rank=4)
    assert not (tmp_path / "lora").exists()


def test_the_exported_targets_are_exactly_the_adapted_layers(tmp_path):
    """A top-level 'proj' adapted by a regex: the list ['proj'] matched 'blk.proj' too (by suffix), which got an
    untrained LoRA and a missing-keys warning on load."""
    from peft import PeftModel

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.blk = torch.nn.Sequential()
            self.blk.add_module("proj", torch.nn.Linear(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blk.proj(self.proj(x))

    torch.manual_seed(0)
    model = get_peft_model(Net(), structpeft.SurmConfig(target_modules="^proj$", init_weights=False))
    structpeft.to_lora(model, str(tmp_path / "lora"), rank=8)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Net(), str(tmp_path / "lora"))
    wrapped = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")]
    assert wrapped == ["base_model.model.proj"]


def test_energy_one_keeps_the_numerical_rank():
    """PMSS with k = 3: ΔW has rank 3, its other singular values are float32 noise; energy=1.0 kept all 24."""
    config = structpeft.PmssConfig(target_modules=["query"], k_in=3, k_out=3, init_weights=False)
    model = get_peft_model(_base(), config)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        reports = structpeft.to_lora(model, os.path.join(d, "lora"), energy=1.0)
    assert [r.rank for r in reports] == [3, 3] and all(r.relative_error < 1e-6 for r in reports)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_exports_report_the_error_of_what_is_stored(dtype, tmp_path):
    """The factors were cast to the base's half dtype after the error was computed (reported 2e-15, actual 2e-3
    for bf16); they are float32 now, as PEFT keeps LoRA weights on half-precision models, and the report is of them."""
    from safetensors.torch import load_file

    model = get_peft_model(_base().to(dtype), CONFIGS["surm-circulant"]())
    reports = structpeft.to_lora(model, str(tmp_path / "lora"), rank=64)
    stored = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for k, t in stored.items() if "lora_" in k)
    for r in reports:
        layer = dict(model.base_model.model.named_modules())[r.module]
        with torch.no_grad():
            delta = layer.get_delta_weight("default", exact=True)
        key = f"base_model.model.{r.module}"
        ba = stored[f"{key}.lora_B.weight"].double() @ stored[f"{key}.lora_A.weight"].double()
        actual = float(torch.linalg.norm(delta - ba) / torch.linalg.norm(delta))
        assert actual < 1e-6 and r.relative_error == pytest.approx(actual, rel=1e-3, abs=1e-12)


def test_the_export_folder_and_its_files_are_readable_by_others(tmp_path):
    """Like a run folder: safetensors wrote the weights file 0o600 while the other files were 0o644."""
    model = get_peft_model(_base(), CONFIGS["surm-circulant"]())
    structpeft.to_lora(model, str(tmp_path / "lora"), rank=2)
    assert os.stat(tmp_path / "lora").st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "lora").iterdir()} == {
        "adapter_config.json": 0o644,
        "adapter_model.safetensors": 0o644,
        "export_report.json": 0o644,
    }
