"""Serving engines (core/engines.py) must give the eager model's answers on real X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from models_registry import load_model
from core.engines import ENGINES, build_runner
from settings import ServingSettings
from harness.payloads import sample_xrays
from core.preprocess import load_file


@pytest.fixture(scope="module")
def xray_pixels(production_tag: str, data_dir) -> np.ndarray:
    config = load_model(production_tag).card.preprocess
    return np.stack([load_file(path, config).pixels for path in sample_xrays(per_class=12, offset=40)])


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "eager"])
def test_engine_matches_eager_on_real_xrays(engine: str, production_tag: str, xray_pixels: np.ndarray) -> None:
    eager = load_model(production_tag, engine="eager")
    other = load_model(production_tag, engine=engine)
    assert other.engine == engine and other.runner is not eager.module
    for batch in (xray_pixels[:1], xray_pixels):  # the traced graph must not be tied to its example batch size
        reference, probabilities = eager.probabilities(batch), other.probabilities(batch)
        assert np.abs(probabilities - reference).max() < 1e-4
        assert eager.labels(reference) == other.labels(probabilities)
        # the validity gate reads the pooled features of the same pass
        features, expected = other.forward(batch)[1].numpy(), eager.forward(batch)[1].numpy()
        assert np.abs(features - expected).max() < 1e-4 * np.abs(expected).max()
    # Both classes are present, so equal labels are not a constant answer.
    assert len(set(eager.labels(eager.probabilities(xray_pixels)))) == 2


def test_unknown_engine_is_refused_clearly(production_tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown inference engine 'onnx'"):
        build_runner(load_model(production_tag).module, "onnx", 224)  # type: ignore[arg-type]
    monkeypatch.setenv("PNEUMONIA_ENGINE", "onnx")
    with pytest.raises(ValidationError, match="engine"):
        ServingSettings()


@pytest.mark.parametrize("setting", [None, "0"])
def test_onnxruntime_records_no_telemetry_unless_the_operator_asks(setting: str | None, tmp_path: Path) -> None:
    """ONNX Runtime's Linux wheels record usage events with a device id under ~/.cache/Microsoft for upload; the
    service's engine turns that off before the library reads the variable, and an operator's explicit
    ORT_DISABLE_TELEMETRY=0 stands. Whether the library then records depends on the machine (here it writes a device
    id and an event database; on the CI machine of stop 38 it wrote nothing), so the test checks the variable as it
    was when the library was first imported, and the default case also that no file was written."""
    import os
    import subprocess
    import sys

    from harness.paths import ROOT

    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / ".cache"), PYTHONPATH=str(ROOT))
    if setting is not None:
        env["ORT_DISABLE_TELEMETRY"] = setting
    # The variable as it was when onnxruntime was first imported (a finder that records it and finds nothing):
    # what the library reads when it initialises, whatever the code does with the variable afterwards.
    script = ("import os, sys, torch\n"
              "seen = []\n"
              "class Record:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'onnxruntime' and not seen:\n"
              "            seen.append(os.environ.get('ORT_DISABLE_TELEMETRY'))\n"
              "        return None\n"
              "sys.meta_path.insert(0, Record())\n"
              "from core.engines import build_runner\n"
              "from core.model import ModelSpec, PneumoniaNet\n"
              "assert 'onnxruntime' not in sys.modules\n"
              "logits, _ = build_runner(PneumoniaNet(ModelSpec()).eval(), 'onnxruntime', 64)(torch.zeros(1, 1, 64, 64))\n"
              "assert logits.shape == (1,), logits.shape\n"
              "print(seen[0])\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1" if setting is None else setting]
    if setting is None:
        assert [str(p) for p in (tmp_path / ".cache").rglob("*") if p.is_file()] == []
