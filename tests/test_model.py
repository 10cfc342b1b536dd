"""The default architecture (core/mobilenet.py) is torchvision's MobileNetV3-Small, and serving runs without torchvision."""

from __future__ import annotations

import copy
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


def test_an_ensemble_averages_its_members_logits_and_is_gated_and_explained_as_one_model(production_tag: str) -> None:
    """`spec.members` > 1 (training.ensemble): the logit is the mean of the members' (each with or without its
    mirror view), the gate reads the first member's features, every engine runs it, and its heatmap is the mean of
    the members' maps."""
    from core.engines import build_runner
    from core.explain import Explainer
    from core.inference import LoadedModel
    from core.model import PneumoniaNet, WithFeatures

    model = load_model(production_tag)
    other = copy.deepcopy(model.module.backbone)  # a second member that reads the evidence the other way round
    with torch.no_grad():
        other.classifier[3].weight.neg_()
    config = model.card.preprocess
    pixels = np.stack([load_file(p, config).pixels for p in sample_xrays(per_class=3, offset=60)])
    batch = to_tensor(pixels, config)

    def ensemble(*members: nn.Module, tta: bool) -> PneumoniaNet:
        net = PneumoniaNet(model.card.spec.model_copy(update={"members": len(members), "tta_hflip": tta})).eval()
        for target, member in zip(net.networks(), members):
            target.load_state_dict(member.state_dict())
        return net

    for tta in (True, False):
        singles = [ensemble(member, tta=tta) for member in (model.module.backbone, other)]
        pair = ensemble(model.module.backbone, other, tta=tta)
        with torch.inference_mode():
            expected = (singles[0](batch) + singles[1](batch)) / 2
            logits, features = WithFeatures(pair)(batch)
            _, first_features = WithFeatures(singles[0])(batch)
        assert (singles[0](batch) - singles[1](batch)).abs().min() > 1e-3  # the members disagree on every image
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(features, first_features, rtol=0, atol=1e-6)
    assert set(pair.state_dict()) >= {f"others.0.{name}" for name in other.state_dict()}
    with torch.inference_mode():
        reference = pair(batch)
    for engine in ("folded", "torchscript", "onnxruntime"):
        engine_logits, _ = build_runner(pair, engine, config.image_size)(batch)
        torch.testing.assert_close(engine_logits.float(), reference, rtol=0, atol=1e-4)

    def explained(net: PneumoniaNet) -> np.ndarray:
        card = model.card.model_copy(update={"spec": net.spec})
        loaded = LoadedModel(tag="t:1", module=net, card=card, engine="eager", runner=build_runner(net, "eager", 224),
                             gate=None)
        return Explainer(loaded).grid(pixels[-1], "PNEUMONIA")

    alone = explained(ensemble(model.module.backbone, tta=True))
    np.testing.assert_allclose(explained(ensemble(model.module.backbone, model.module.backbone, tta=True)), alone,
                               atol=1e-6)  # the mean of one map with itself is that map
    assert np.abs(explained(ensemble(model.module.backbone, other, tta=True)) - alone).max() > 0.05  # both count
