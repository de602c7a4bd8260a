"""Serving-style adapter swaps in an eval-mode model: load a file under a name, use it, delete it, load the next.

The inference caches (the folded W + s·ΔW per layer, the ΔW per operator) were keyed on each parameter's storage
address and version counter. A deleted adapter's parameters are freed, and the allocator often places the next
adapter's parameters at the same addresses with the same version (zero init, then one copy from the file), so the
layer returned the deleted adapter's folded weight (11 of 40 swaps with circulant on the dense path). The cache
entries now also hold weak references to the very tensors they were built from.
"""

from __future__ import annotations

import gc

import pytest
import torch
from peft import PeftModel, get_peft_model

import structpeft
from testkit import tiny_bert_cls

CASES = {
    "circulant-dense": lambda: structpeft.SurmConfig(
        structure="circulant", target_modules=["query", "value"], compute="dense"
    ),
    "circulant-fast-fold": lambda: structpeft.SurmConfig(
        structure="circulant", target_modules=["query", "value"], compute="fast", fold_inference=True
    ),
    "pmss-hybrid": lambda: structpeft.PmssConfig(target_modules=["query", "value"], budget=64, compute="hybrid"),
}


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_bert_cls().eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_swapped_adapters_never_reuse_a_deleted_adapters_cache(case, tmp_path):
    for i in (1, 2):
        model = get_peft_model(_base(), CASES[case]())
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 1.0)
        model.save_pretrained(str(tmp_path / f"ad{i}"))
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(7))

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids).logits.clone()

    expected = {i: logits(PeftModel.from_pretrained(_base(), str(tmp_path / f"ad{i}")).eval()) for i in (1, 2)}
    assert not torch.allclose(expected[1], expected[2])
    model = PeftModel.from_pretrained(_base(), str(tmp_path / "ad1"), adapter_name="keep").eval()
    for swap in range(24):
        i = 1 + swap % 2
        model.load_adapter(str(tmp_path / f"ad{i}"), adapter_name="x")
        model.set_adapter("x")
        torch.testing.assert_close(logits(model), expected[i], rtol=0, atol=1e-6, msg=f"swap {swap}: ad{i}")
        model.set_adapter("keep")
        model.delete_adapter("x")
        gc.collect()
