"""Frozen-model baselines the fine-tuned result is printed next to.

``probe`` (classification): a multinomial logistic-regression probe on the *frozen* base model's mean-pooled
last hidden states (attention-mask weighted), features standardised on the training set, L2 penalty as
scikit-learn's default (C = 1: minimise the mean cross-entropy + ||W||² / (2·C·n)), solved with L-BFGS in
float64 (deterministic; no scikit-learn needed). Same tokenisation and train/test split as fine-tuning.

``zero-shot`` (generation): the base model's score without any fine-tuning (greedy generation).
"""

from __future__ import annotations

import sys
from typing import Any


def mean_pooled_features(backbone: Any, dataset: Any, collator: Any, batch_size: int, desc: str) -> Any:
    import torch
    from tqdm.auto import tqdm

    feats = []
    backbone.eval()
    items = dataset.items
    with torch.no_grad():
        for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", file=sys.stdout):
            batch = collator([{k: v for k, v in f.items() if k != "labels"} for f in items[start : start + batch_size]])
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            out = backbone(**batch)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            feats.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).to(torch.float64))
    return torch.cat(feats)


def logistic_regression_probe(
    x_train: Any, y_train: Any, x_test: Any, y_test: Any, num_classes: int, c: float = 1.0
) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression (see the module docstring)."""
    import torch

    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True).clamp_min(1e-8)
    xtr = (x_train - mean) / std
    xte = (x_test - mean) / std
    n, d = xtr.shape
    w = torch.zeros(d, num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    ytr = torch.as_tensor(y_train, dtype=torch.long)
    lam = 1.0 / (c * n)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xte @ w + b).argmax(-1)
    return float((pred == torch.as_tensor(y_test, dtype=torch.long)).double().mean())


def probe_accuracy(model: Any, train_ds: Any, test_ds: Any, collator: Any, batch_size: int, num_classes: int) -> float:
    """Probe accuracy of the frozen backbone of a (not yet adapted) sequence-classification model."""
    backbone = getattr(model, model.base_model_prefix, None) or model.base_model
    x_train = mean_pooled_features(backbone, train_ds, collator, batch_size, "baseline probe: train features")
    x_test = mean_pooled_features(backbone, test_ds, collator, batch_size, "baseline probe: test features")
    y_train = [f["labels"] for f in train_ds.items]
    y_test = [f["labels"] for f in test_ds.items]
    return logistic_regression_probe(x_train, y_train, x_test, y_test, num_classes)
