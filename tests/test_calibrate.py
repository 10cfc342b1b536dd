"""Site calibration end to end on real X-rays: a new version, the original untouched, refusals that say why."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from harness import dicom_files as D
from harness.payloads import sample_xrays
from harness.servers import start_server
from models_registry import production_tag as current_production
from models_registry import list_models, promote, read_card, rollback
from models_registry.calibrate import CalibrationRefused
from models_registry.calibrate import calibrate as run_calibration
from models_registry.store import stored_tags


def site_folder(root: Path, per_class: int, offset: int = 900) -> Path:
    """A labeled site folder of `per_class` distinct real X-rays per class (copies from the shared training folder,
    which holds a few byte-identical pairs: calibration counts such a pair once)."""
    seen: set[bytes] = set()
    for path in sample_xrays(per_class=per_class + 10, offset=offset):
        target = root / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(path.read_bytes()).digest()
        if digest not in seen and len(list(target.iterdir())) < per_class:
            seen.add(digest)
            shutil.copy(path, target / path.name)
    return root


def calibrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "models_registry", "calibrate", *args],
                          capture_output=True, text=True, timeout=600)


def test_calibration_saves_a_new_version_and_leaves_the_original(production_tag: str, tmp_path: Path) -> None:
    site = site_folder(tmp_path / "site", per_class=40)
    # DICOMs their own tags refuse (a CT, a lateral view) are left out, as the service refuses them; their blank
    # grids went into the fit with their labels, counted as the validity gate's refusals (a helper's find).
    normal, pneumonia = (np.asarray(Image.open(path).convert("L")) for path in sample_xrays(1, offset=700))
    (site / "NORMAL" / "ct.dcm").write_bytes(D.part10(normal, bits_stored=8, modality="CT"))
    (site / "PNEUMONIA" / "lateral.dcm").write_bytes(D.part10(pneumonia, bits_stored=8, view="LL"))
    original = read_card(production_tag)
    result = calibrate(production_tag, "--data", str(site), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "calibration.json").read_text())
    new_tag = report["model"]
    assert new_tag != production_tag and new_tag in result.stdout
    card = read_card(new_tag)
    record = card.site_calibration
    assert record["source_model"] == production_tag and record["images"] == {"NORMAL": 40, "PNEUMONIA": 40}
    assert (record["refused_by_dicom_tags"], record["refused_by_validity_gate"]) == (2, 0)
    assert len(record["data_fingerprint"]) == 64
    for side in ("before", "after_cross_validated"):
        figures = record[side]
        for metric in ("sensitivity", "specificity", "roc_auc", "ece"):
            low, high = figures["intervals_95"][metric]
            assert low <= figures[metric] <= high
    assert record["before"]["threshold"] == original.threshold
    assert (card.temperature, card.threshold) == (record["after_cross_validated"]["temperature"],
                                                  record["after_cross_validated"]["threshold"])
    assert card.weights_sha256 == original.weights_sha256 and card.validity == original.validity
    assert read_card(production_tag) == original  # untouched
    [listed] = [row for row in list_models() if row["tag"] == new_tag]  # figures measured at the new threshold
    assert listed["measured_on"] == f"site {record['data_fingerprint'][:8]}"
    assert listed["sensitivity"] == record["after_cross_validated"]["sensitivity"]
    assert (tmp_path / "report" / "calibration.png").stat().st_size > 10_000
    assert "after (5-fold cross-validated" in (tmp_path / "report" / "report.md").read_text()
    versions = stored_tags()  # the same command again (for its report): the same version, none added
    again = calibrate(production_tag, "--data", str(site), "--out", str(tmp_path / "again"))
    assert again.returncode == 0 and f"-> {new_tag} (stored before" in again.stdout, again.stdout + again.stderr
    assert stored_tags() == versions and (tmp_path / "again" / "report.md").is_file()

    # Promoted, a restarted service serves the site's threshold; rollback brings the original back.
    promote(new_tag)
    try:
        server = start_server(tmp_path / "server.log", PNEUMONIA_WORKERS="1")
        try:
            health = httpx.post(server.url + "/health", json={}, timeout=30).json()
            assert health["model"] == new_tag and health["threshold"] == pytest.approx(card.threshold)
            # The served threshold's own figures beside the source's validation figures (measured at the
            # source's threshold); /health showed only the latter, the client printed them as the served model's.
            shown = {key: value for key, value in record.items() if key != "data_dir"}
            assert health["site_calibration"] == json.loads(json.dumps(shown))
            assert health["validation_metrics"]["threshold"] == original.val_metrics["threshold"]
            printed = subprocess.run([sys.executable, "-m", "client", "health", "--grpc", "--url", server.grpc_target],
                                     capture_output=True, text=True, timeout=120)
            after = record["after_cross_validated"]
            assert printed.returncode == 0 and f"site-calibrated on 80 images (data {record['data_fingerprint'][:8]}): " \
                f"sensitivity {after['sensitivity']:.3f}, specificity {after['specificity']:.3f} at " \
                f"{after['threshold']:.4f}" in printed.stdout, printed.stdout + printed.stderr
            assert f"sensitivity {original.val_metrics['per_class']['PNEUMONIA']['recall']:.4f} at " \
                f"{original.val_metrics['threshold']:.4f}" in printed.stdout
            [answer] = httpx.post(server.url + "/classify", timeout=60,
                                  files=[("images", ("x.jpeg", sample_xrays(1, offset=10)[0].read_bytes()))]).json()
            assert answer["threshold"] == pytest.approx(card.threshold)
        finally:
            server.stop()
    finally:
        assert rollback() == production_tag
    assert current_production() == production_tag


def test_calibration_refuses_bad_arguments_and_leaves_no_version(production_tag: str, tmp_path: Path) -> None:
    """In process (the CLI's one-line answer to a RegistryError is checked below): each refusal, no new version."""
    site = site_folder(tmp_path / "site", per_class=35)  # good data: only the argument is wrong
    an_image = sorted((site / "NORMAL").iterdir())[0]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    versions = stored_tags()
    for options, expected in (({"target_sensitivity": 1.5}, "target sensitivity must be in (0, 1]"),
                              ({"target_sensitivity": float("nan")}, "target sensitivity must be in (0, 1]"),
                              ({"min_per_class": -5}, "at least 10 images of each class"),
                              ({"report_dir": a_file / "report"}, "cannot write the report"),
                              ({"report_dir": site / "NORMAL" / "report"}, "a class folder of --data")):
        with pytest.raises(CalibrationRefused, match=re.escape(expected)):
            run_calibration(production_tag, site, **options)
    with pytest.raises(CalibrationRefused, match="is not a folder"):
        run_calibration(production_tag, an_image)
    shutil.copy(an_image, site / "PNEUMONIA" / "relabelled.jpeg")  # one X-ray under both classes
    with pytest.raises(CalibrationRefused, match="same file under both classes: fix the labels"):
        run_calibration(production_tag, site)
    assert stored_tags() == versions


@pytest.mark.parametrize("problem", ["too few", "one class missing", "unreadable file", "copies"])
def test_calibration_refuses_data_it_cannot_trust(production_tag: str, tmp_path: Path, problem: str) -> None:
    """Each refusal is one line, exit 1, and leaves no new version behind."""
    if problem == "too few":
        site, expected = site_folder(tmp_path / "site", per_class=12), "too few usable images"
    elif problem == "one class missing":
        site = site_folder(tmp_path / "site", per_class=35)
        shutil.rmtree(site / "PNEUMONIA")
        expected = "missing class folder"
    elif problem == "unreadable file":
        site = site_folder(tmp_path / "site", per_class=35)
        (site / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        expected = "unreadable image(s)"
    else:  # a helper's find: 30 copies of one X-ray per class passed, with sensitivity and specificity 1.000
        site = tmp_path / "site"
        for label, source in zip(("NORMAL", "PNEUMONIA"), sample_xrays(1, offset=905)):
            (site / label).mkdir(parents=True)
            for k in range(35):
                shutil.copy(source, site / label / f"copy-{k}.jpeg")
        expected = "too few usable images to calibrate on: 1 NORMAL, 1 PNEUMONIA"
    versions = stored_tags()
    result = calibrate(production_tag, "--data", str(site), "--out", str(tmp_path / "reports" / "site"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    if problem == "unreadable file":
        assert "broken.jpeg" in result.stderr
    if problem == "copies":
        assert "68 copies left out" in result.stderr, result.stderr
    assert stored_tags() == versions
    assert not (tmp_path / "reports").exists()  # the report folder is made only for a report


def test_ctrl_c_during_a_calibration_is_one_line_and_saves_nothing(production_tag: str, tmp_path: Path) -> None:
    """Ctrl-C printed a traceback through torch (exit -2, killed by the signal); now one line and exit 130."""
    import signal
    import time

    from harness.servers import child_stderr, default_sigint

    site = site_folder(tmp_path / "site", per_class=40)
    versions = stored_tags()
    process = subprocess.Popen([sys.executable, "-m", "models_registry", "calibrate", production_tag, "--data",
                                str(site), "--out", str(tmp_path / "report")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    time.sleep(4)  # the model is loaded and the site images are being scored (a calibration takes 15 s or more)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    stderr = child_stderr(process.communicate(timeout=60)[1])
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == ["interrupted: see what the store holds with "
                                           "`python -m models_registry list`"], stderr[-2000:]
    assert stored_tags() == versions and not (tmp_path / "report").exists()


def test_a_threshold_that_misses_its_target_is_flagged_and_not_promoted(production_tag: str, tmp_path: Path) -> None:
    """Ten images a class and a target of 1.0: cross-validated on the site data the threshold reaches 0.9."""
    site = site_folder(tmp_path / "site", per_class=10, offset=0)
    result = calibrate(production_tag, "--data", str(site), "--target-sensitivity", "1.0", "--min-per-class", "10",
                       "--out", str(tmp_path / "report"), "--promote")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("warning: ") and "below the target 1.0" in warning
    assert error.startswith("error: ") and "not promoted" in error and "below the target 1.0" in error
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**Warning:**" in report and "Serve it" not in report and "Not promoted" in report
    assert current_production() == production_tag
    # Promoted by hand later, the version is refused too (plain `promote` served it without a word) ...
    tag = json.loads((tmp_path / "report" / "calibration.json").read_text())["model"]
    by_hand = subprocess.run([sys.executable, "-m", "models_registry", "promote", tag], capture_output=True, text=True)
    assert by_hand.returncode == 1 and "below the target 1.0" in by_hand.stderr, by_hand.stderr
    assert f"promote {tag} --force" in by_hand.stderr and current_production() == production_tag
    # ... unless forced, which is how a site that accepts the shortfall serves it.
    assert promote(tag, force=True) == tag
    assert rollback() == production_tag


def test_the_threshold_is_the_highest_that_reaches_the_target_and_sits_below_its_image() -> None:
    """A helper's finds: scikit-learn's `roc_curve` drops the points inside a vertical stretch of the curve, so the
    'highest threshold reaching the target' was the lowest of that stretch (here 0.1, sensitivity 1.0, where 0.1228
    reaches 0.975); and the threshold sat exactly on one image's probability, which the served engine's float32
    arithmetic put a millionth lower: that image was called NORMAL."""
    import numpy as np

    from core.calibration import THRESHOLD_MARGIN, choose_threshold

    labels = np.array([0] * 5 + [1] * 40)
    probs = np.concatenate([np.linspace(0.01, 0.05, 5), np.linspace(0.1, 0.99, 40)])
    threshold = choose_threshold(labels, probs, 0.97)
    boundary = probs[6]  # the 40 pneumonia scores rise from 0.1; 39 of them (0.975) start at the second
    assert boundary - THRESHOLD_MARGIN == pytest.approx(threshold) and threshold < boundary
    assert (probs[labels == 1] >= threshold).mean() >= 0.97 and (probs[labels == 1] >= threshold + 2e-4).mean() < 0.97
    # a close neighbour below: half-way to it, so neither image is near the threshold
    assert choose_threshold(np.array([0, 1, 1]), np.array([0.29996, 0.3, 0.5]), 1.0) == pytest.approx(0.29998)
