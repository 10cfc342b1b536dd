"""The default architecture (core/mobilenet.py) is torchvision's MobileNetV3-Small, and serving runs without torchvision."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from core import mobilenet
from core.preprocess import load_file, to_tensor
from harness.paths import ROOT
from harness.payloads import sample_xrays
from harness.servers import HANG_S, server_env
from models_registry import load_model


@pytest.mark.parametrize("dropout", [0.2, 0.35])
def test_seeded_build_draws_torchvisions_modules_and_initial_weights(dropout: float) -> None:
    """Same modules, names and initial weights from the same seed: training reproduces runs made with torchvision."""
    torch.manual_seed(7)
    theirs = torchvision.models.mobilenet_v3_small(weights=None, dropout=dropout)
    next_after_theirs = torch.rand(1)
    torch.manual_seed(7)
    ours = mobilenet.mobilenet_v3_small(dropout=dropout)
    next_after_ours = torch.rand(1)
    assert repr(ours) == repr(theirs)
    expected = theirs.state_dict()
    assert list(ours.state_dict()) == list(expected)
    assert all(torch.equal(value, expected[name]) for name, value in ours.state_dict().items())
    assert torch.equal(next_after_ours, next_after_theirs)  # the same number of draws: what follows is unchanged


def test_trained_weights_give_torchvisions_answers_on_real_xrays(production_tag: str, data_dir) -> None:
    """The shipped model's weights in torchvision's module and in ours: the same logits on real X-rays."""
    model = load_model(production_tag)
    ours = model.module.backbone.eval()
    theirs = torchvision.models.mobilenet_v3_small(weights=None)
    theirs.features[0][0] = nn.Conv2d(1, 16, 3, 2, 1, bias=False)  # one grey channel, one pneumonia logit
    theirs.classifier[3] = nn.Linear(1024, 1)
    theirs.load_state_dict(ours.state_dict())
    config = model.card.preprocess
    batch = to_tensor(np.stack([load_file(p, config).pixels for p in sample_xrays(per_class=4, offset=60)]), config)
    with torch.inference_mode():
        expected, logits = theirs.eval()(batch), ours(batch)
    assert expected.std() > 1.0  # the X-rays get different answers, so equality below is not a constant
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_serving_imports_neither_torchvision_nor_torch_dynamo(production_tag: str) -> None:
    """Importing torchvision costs a serving process 6.5 s of CPU (torch._dynamo, sympy) at every start; pydicom
    waits for the first DICOM file."""
    script = (
        "import sys, numpy as np, service, models_registry\n"
        "for engine in ('eager', 'folded', 'torchscript', 'onnxruntime'):\n"
        f"    models_registry.load_model({production_tag!r}, engine=engine).probabilities(np.zeros((1, 224, 224), np.uint8))\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'sympy', 'pydicom') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=server_env(), capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
