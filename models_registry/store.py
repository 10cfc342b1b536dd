"""The BentoML model store plus a small promotion record (production pointer and its history).

Promotion lives in `<BENTOML_HOME>/model_registry/<model>.json`, beside the
store it describes, so a freshly started service sees a promotion without any
code change. It stays outside `<BENTOML_HOME>/models/`: BentoML reads every
entry there as a model name, and a stray folder makes `bentoml models list`
fail. A store that holds no promotion record but exactly one model (for
example the store packed inside a Bento or container image) serves that model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bentoml
import torch
from bentoml.exceptions import NotFound
from torch import nn

from core.card import MODEL_NAME, WEIGHTS_FILE, ModelCard
from core.validity import VALIDITY_FILE

PRODUCTION = "production"
# How far below the validation ROC-AUC of the best model promoted so far a model may be and still be promoted
# without `force`: seeds of one recipe differ by about 0.001 (docs/model.md); 0.01 worse is another kind of model.
PROMOTE_MAX_ROC_AUC_DROP = 0.01
_FORCE_HINT = "to promote it anyway: python -m models_registry promote {tag} --force"  # whichever command refused


class RegistryError(Exception):
    """A registry operation that cannot be carried out; the message says what to do."""


def check_home() -> None:
    """Raise RegistryError, naming BENTOML_HOME, if BentoML cannot use its home folder (it makes the folders on
    first use): its own NotADirectoryError or FileNotFoundError named no setting to change."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        BentoMLContainer.bentoml_home.get()
    except OSError as exc:
        detail = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror or str(exc)
        where = f"BENTOML_HOME={os.environ['BENTOML_HOME']}" if os.environ.get("BENTOML_HOME") else "~/bentoml"
        raise RegistryError(f"the BentoML store cannot be used ({where}): {detail}; point BENTOML_HOME at a "
                            "folder this user can write") from None


def _model_store_dir() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    store = BentoMLContainer.model_store.get()
    return Path(store._path)


def _registry_dir() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get()) / "model_registry"


def _move_legacy_records() -> None:
    """Earlier versions kept records in `<store>/.registry`, which broke `bentoml models list`; move them out."""
    legacy = _model_store_dir() / ".registry"
    if not legacy.is_dir():
        return
    target = _registry_dir()
    target.mkdir(parents=True, exist_ok=True)
    for record in legacy.glob("*.json"):
        if not (target / record.name).exists():
            shutil.move(record, target / record.name)
    shutil.rmtree(legacy)  # what is left: half-written .tmp files only this module ever made


def _record_path(name: str) -> Path:
    _move_legacy_records()
    return _registry_dir() / f"{name}.json"


def _read_record(name: str) -> dict[str, Any]:
    path = _record_path(name)
    if not path.exists():
        return {"production": None, "history": []}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"promotion record {path} is unreadable ({exc}); fix or delete it") from None
    shape_ok = (isinstance(record, dict) and isinstance(record.get("production"), (str, type(None)))
                and isinstance(record.get("history", []), list) and all(isinstance(t, str) for t in record.get("history", []))
                and isinstance(record.get("log", []), list))
    if not shape_ok:
        raise RegistryError(f"promotion record {path} is unreadable (not an object with 'production': a tag or null, "
                            "'history': a list of tags and 'log': a list); fix or delete it")
    record.setdefault("history", [])
    return record


@contextlib.contextmanager
def _record_lock(name: str) -> Iterator[None]:
    """Hold the promotion record of `name` for one read-modify-write: two promotes at once each read the record
    before the other wrote it, and one promotion was lost from the history `rollback` follows. Not re-entrant."""
    path = _record_path(name).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pin_implicit_production(name: str) -> None:
    """Record the only stored model as production when nothing was promoted, before a second model is stored:
    the store's single model is served without a record, and a second one would have left no production model.
    Best effort: a record that cannot be read or written never stops a model from being stored (after a training
    run); it is reported, and every command that reads the record says how to mend it."""
    try:
        with _record_lock(name):
            record = _read_record(name)
            never_promoted = record.get("production") is None and not _promoted_once(record)
            if never_promoted and len(versions := _versions(name)) == 1:
                record["production"] = str(versions[0].tag)
                record.setdefault("log", []).append({"at": datetime.now(timezone.utc).isoformat(),
                                                     "promoted": record["production"], "why": "the only stored model"})
                _write_record(name, record)
    except (RegistryError, OSError) as exc:
        print(f"warning: the promotion record could not be read or written ({' '.join(str(exc).split())}); if the "
              f"store held one {name} model and nothing promoted, it is not production once another is stored: "
              "fix or delete the record, then promote the model to serve", file=sys.stderr)


def _write_record(name: str, record: dict[str, Any]) -> None:
    path = _record_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(record, handle, indent=2)
    os.replace(handle.name, path)  # atomic: a reader never sees half a record


def weights_to_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    torch.save(state, buffer)
    return buffer.getvalue()


def _without_none(value: Any) -> Any:
    """BentoML metadata refuses None; absent keys read back as the card's defaults."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


def save_model(module: nn.Module, card: ModelCard, name: str = MODEL_NAME, validity: bytes | None = None) -> str:
    """Store weights, card and (when the card has a gate) the validity arrays as a new version of `name`."""
    if (card.validity is None) != (validity is None):
        raise RegistryError("a validity gate needs both its configuration in the card and its arrays")
    if validity is not None and hashlib.sha256(validity).hexdigest() != card.validity.arrays_sha256:
        raise RegistryError("the validity arrays do not match the sha256 in the card")
    return _create(name, card, weights_to_bytes(module), validity)


def derive_model(source: str, updates: dict[str, Any], name: str = MODEL_NAME) -> str:
    """A new version with the weights (and validity gate) of `source` and its card changed by `updates`.

    For re-fits that leave the weights alone (site calibration); the source stays untouched.
    """
    tag = resolve_tag(source, name)
    card = ModelCard.model_validate({**read_card(tag).model_dump(), **updates})  # the updates must make a valid card
    folder = store_path_of(tag)
    payload = (folder / WEIGHTS_FILE).read_bytes()
    if hashlib.sha256(payload).hexdigest() != card.weights_sha256:
        raise RegistryError(f"model {tag}: weights do not match their sha256; delete it "
                            f"(python -m models_registry delete {tag} --force) and import its archive again before "
                            "deriving from it")
    validity = (folder / VALIDITY_FILE).read_bytes() if card.validity is not None else None
    return _create(name, card, payload, validity, derived_from=tag)


def _create(name: str, card: ModelCard, payload: bytes, validity: bytes | None, derived_from: str | None = None) -> str:
    """One new version in the BentoML store: weights, optional validity arrays, and the card as metadata."""
    card = card.model_copy(update={"weights_sha256": hashlib.sha256(payload).hexdigest()})
    pin_implicit_production(name)
    labels = {"arch": card.spec.arch, "image_size": str(card.preprocess.image_size), "data": card.data_fingerprint[:12]}
    if derived_from:
        labels["derived_from"] = derived_from.split(":")[-1]
    with bentoml.models.create(name, labels=labels, metadata=_without_none(card.model_dump(mode="json"))) as ref:
        Path(ref.path_of(WEIGHTS_FILE)).write_bytes(payload)
        if validity is not None:
            Path(ref.path_of(VALIDITY_FILE)).write_bytes(validity)
        Path(ref.path_of("model_card.json")).write_text(card.model_dump_json(indent=2))
    return str(ref.tag)


def _versions(name: str) -> list[Any]:
    """The loadable stored versions of `name`, oldest first (`_scan` also says which folders are damaged)."""
    return _scan(name)[0]


def _scan(name: str) -> tuple[list[Any], dict[str, str]]:
    """The loadable versions of `name`, oldest first, and the version folders BentoML cannot read, with why
    (one of them must not hide the others)."""
    models: list[Any] = []
    broken: dict[str, str] = {}
    try:
        models = bentoml.models.list(name)
    except NotFound:
        pass
    except Exception:  # noqa: BLE001 - one unreadable version folder (missing model.yaml, invalid YAML) fails
        # BentoML's whole listing: read them one by one
        for folder in sorted(p for p in (_model_store_dir() / name).iterdir() if p.is_dir()):
            try:
                models.append(bentoml.models.get(f"{name}:{folder.name}"))
            except Exception as exc:  # noqa: BLE001 - BentoML's errors and the YAML parser's alike
                broken[f"{name}:{folder.name}"] = " ".join(str(exc).split()) or type(exc).__name__
    return sorted(models, key=lambda m: m.info.creation_time), broken


def stored_tags(name: str = MODEL_NAME) -> list[str]:
    """Every stored version of `name`, oldest first."""
    return [str(model.tag) for model in _versions(name)]


def _promoted_once(record: dict[str, Any]) -> bool:
    """Whether the record logs a promotion (or a pin): from then on only a promotion makes production."""
    return bool(record.get("log"))


def ever_promoted(name: str = MODEL_NAME) -> bool:
    """Whether a model of `name` was ever promoted (or pinned): from then on only a promotion makes production."""
    return _promoted_once(_read_record(name))


def production_tag(name: str = MODEL_NAME) -> str | None:
    """The promoted tag, or the only model in the store when nothing was ever promoted.

    Once a model was promoted, only a promotion makes production: after `delete production --force` the one
    model left, which `promote` may refuse (a site calibration that misses its target), went into service,
    unchecked, and `ensure-default` kept it (a helper's find)."""
    record = _read_record(name)
    if record.get("production"):
        return record["production"]
    if _promoted_once(record):
        return None
    versions = _versions(name)
    if len(versions) == 1:
        return str(versions[0].tag)
    return None


def _unreadable() -> tuple[type[BaseException], ...]:
    """What BentoML raises for a version folder it cannot read, or a tag it cannot parse (not OSError: a transient
    failure to read the store is no reason to call a model damaged and advise deleting it)."""
    import yaml
    from bentoml.exceptions import BentoMLException

    # cattrs' ClassValidationError (a model.yaml that is YAML but not a model's) is an ExceptionGroup; a model.yaml
    # that is a folder, or a file where a folder belongs, is damage of the folder, not of the file system.
    return (BentoMLException, yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, ExceptionGroup,
            IsADirectoryError, NotADirectoryError)


_UNREADABLE = _unreadable()


def names_production(ref: str) -> bool:
    """Whether `ref` is the alias 'production', in any case ('PRODUCTION' was read as a version: versions are lower
    case)."""
    return ref.strip().lower() == PRODUCTION


def resolve_tag(ref: str = PRODUCTION, name: str = MODEL_NAME) -> str:
    """'production', 'latest', a version or a full tag -> an existing full tag."""
    if not ref.strip() or ref.strip().endswith(":"):
        raise RegistryError(f"{ref!r} names no model: give 'production', 'latest', a version or {name}:VERSION")
    if ref.strip() == name:  # BentoML would read it as the version 'pneumonia-classifier' of the model
        raise RegistryError(f"{ref!r} is the model's name, not one of its versions: give 'production', 'latest', a "
                            f"version or {name}:VERSION (python -m models_registry list)")
    if names_production(ref):
        tag = production_tag(name)
        if tag is None:
            versions = _versions(name)
            hint = (
                "the store has no model: run `./dev.sh serve` (imports the shipped default model) "
                "or `python -m models_registry import-default`"
                if not versions
                else (f"{len(versions)} model{' is' if len(versions) == 1 else 's are'} stored but none is promoted: "
                      "run `python -m models_registry promote TAG`")
            )
            raise RegistryError(f"no production model; {hint}")
        if not is_stored(tag):
            raise RegistryError(
                f"the production model {tag} is no longer in the store ({_model_store_dir()}); it was deleted "
                "outside `models_registry`: promote a stored model (`python -m models_registry list`, then "
                "`promote TAG`) or restore the shipped one (`python -m models_registry import-default`)"
            )
        ref = tag
    if ":" not in ref:
        ref = f"{name}:{ref}"
    try:
        return str(bentoml.models.get(ref).tag)
    except NotFound:
        raise RegistryError(f"model {ref} is not in the store ({_model_store_dir()})") from None
    except _UNREADABLE as exc:  # BentoML's Tag ('a:b:c', '../x'), a prefix of several versions, or a version folder
        # whose model.yaml is missing or not YAML; an OSError (too many open files, a network store) is no damage
        message = " ".join(str(exc).split())
        if (damaged := folder_in_store(ref)) is not None:
            raise DamagedModel(f"model {ref} is damaged and cannot be read ({message}); remove it with "
                               f"`python -m models_registry delete {ref} --force`, then import it again",
                               folder=damaged) from None
        if "Multiple" in message:
            raise RegistryError(f"{ref} matches several stored versions; give more of the version "
                                f"(python -m models_registry list)") from None
        raise RegistryError(f"{ref!r} is not a model tag ({message}); give 'production', 'latest', a version "
                            f"or {name}:VERSION") from None


class DamagedModel(RegistryError):
    """A version folder is in the store but BentoML cannot read it (its model.yaml is missing or broken)."""

    def __init__(self, message: str, folder: Path) -> None:
        super().__init__(message)
        self.folder = folder


# BentoML's own rule for a name and a version (bentoml._internal.tag): nothing else names a folder of the store.
_TAG_PART = re.compile(r"[a-z0-9](?:[-._a-z0-9]*[a-z0-9])?")


def folder_in_store(tag: str) -> Path | None:
    """The store folder of `tag` (a full tag) when it exists, else None: where BentoML could not read a model,
    whether there is a damaged one to name or remove. Only a tag BentoML could have written names a folder: a
    path normalised into one ('VERSION/', 'VERSION/../OTHER') called a healthy model damaged, and `delete
    --force` removed it, even a model of another name (a helper's find)."""
    name, _, version = tag.partition(":")
    if not (_TAG_PART.fullmatch(name.lower()) and _TAG_PART.fullmatch(version.lower())):
        return None
    folder = _model_store_dir() / name / version
    return folder if folder.is_dir() else None


def is_stored(tag: str) -> bool:
    """Whether `tag` is in the store (a promotion record can outlive its model: `bentoml models delete`)."""
    try:
        bentoml.models.get(tag)
    except NotFound:
        return False
    except _UNREADABLE:  # its folder is there but damaged: stored (resolve_tag says how to mend it)
        return folder_in_store(tag) is not None
    return True


def list_models(name: str = MODEL_NAME) -> list[dict[str, Any]]:
    """Every stored version, oldest first, with the key metrics measured at its own threshold.

    Those are the validation figures of a trained model, and the site's cross-validated figures of a
    site-calibrated one (its source's validation figures belong to another threshold).
    """
    production = production_tag(name)
    versions, broken = _scan(name)
    rows = []
    for model in versions:
        meta = model.info.metadata
        try:
            ModelCard.model_validate(meta)
        except ValueError as exc:  # the service refuses to load it: its figures must not read as a usable model's
            broken[str(model.tag)] = "unusable metadata: " + " ".join(str(exc).split()[:40])
            continue
        val = meta.get("val_metrics", {})
        figures = {"roc_auc": val.get("roc_auc"), "accuracy": val.get("accuracy"),
                   "sensitivity": val.get("per_class", {}).get("PNEUMONIA", {}).get("recall"),
                   "specificity": val.get("per_class", {}).get("NORMAL", {}).get("recall"), "measured_on": "validation"}
        if site := meta.get("site_calibration"):
            after = site.get("after_cross_validated", {})
            figures = {**{k: after.get(k) for k in ("roc_auc", "accuracy", "sensitivity", "specificity")},
                       "measured_on": f"site {str(site.get('data_fingerprint', ''))[:8]}"}
        rows.append(
            {
                "tag": str(model.tag),
                "production": str(model.tag) == production,
                "created": model.info.creation_time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "arch": meta.get("spec", {}).get("arch"),
                "image_size": meta.get("preprocess", {}).get("image_size"),
                **figures,
                "threshold": meta.get("threshold"),
                "size_mb": round(sum(f.stat().st_size for f in Path(model.path).rglob("*") if f.is_file()) / 1e6, 2),
            }
        )
    rows += [{"tag": tag, "production": tag == production, "broken": why} for tag, why in broken.items()]
    return rows


def show(ref: str = PRODUCTION, name: str = MODEL_NAME) -> dict[str, Any]:
    tag = resolve_tag(ref, name)
    model = bentoml.models.get(tag)
    return {"tag": tag, "path": str(model.path), "labels": dict(model.info.labels), **model.info.metadata}


def promote(ref: str, name: str = MODEL_NAME, force: bool = False) -> str:
    """Make `ref` the production model; the previous one is kept for `rollback`.

    The model is loaded first (card, weights sha256, architecture, gate): a model the service could not load
    is refused here, not discovered at the next start. A model whose validation ROC-AUC is clearly below the
    best model promoted so far is refused unless `force` (`_check_not_worse`; a one-epoch smoke run was promoted
    without a word).
    """
    tag = resolve_tag(ref, name)
    _check_loads(tag, name, "cannot promote")  # also when it is production already: the answer says it loads
    with _record_lock(name):
        record = _read_record(name)
        if record.get("production") == tag:
            return tag
        if not is_stored(tag):
            raise RegistryError(f"cannot promote {tag}: it was deleted meanwhile")
        if not force:
            card = read_card(tag)
            _check_site_target(tag, card)
            _check_not_worse(tag, card, record)
        if record.get("production"):
            record["history"].append(record["production"])
        record["production"] = tag
        record.setdefault("log", []).append({"at": datetime.now(timezone.utc).isoformat(), "promoted": tag})
        _write_record(name, record)
    return tag


def _check_site_target(tag: str, card: ModelCard) -> None:
    """Refuse a site-calibrated version whose threshold missed its sensitivity target on the site's own data
    (cross-validated): `calibrate --promote` refused it, and a plain `promote` of it did so without a word."""
    warning = (card.site_calibration or {}).get("warning")
    if warning:
        raise RegistryError(f"cannot promote {tag}: {warning}; {_FORCE_HINT.format(tag=tag)}")


def _check_not_worse(tag: str, card: ModelCard, record: dict[str, Any]) -> None:
    """Refuse `tag` when its validation ROC-AUC is more than PROMOTE_MAX_ROC_AUC_DROP below the best of the models
    promoted so far (production and its history, those still stored and readable), so that steps each just inside
    the margin cannot walk production down; or when it has none to compare. A model that cannot be read is no
    reference: replacing a damaged production model is the point. Validation figures of models trained on other
    folders are not strictly comparable; the message names the command that promotes anyway."""
    references: dict[str, float] = {}
    for promoted in dict.fromkeys([record.get("production"), *record["history"]]):
        try:
            auc = validation_roc_auc(read_card(promoted)) if promoted else None
        except Exception:  # noqa: BLE001 - deleted, or damaged in any way BentoML or pydantic can fail
            continue
        if auc is not None:
            references[promoted] = auc  # type: ignore[index]
    if not references:
        return
    best = max(references, key=references.__getitem__)
    new = validation_roc_auc(card)
    if new is None:
        raise RegistryError(f"cannot promote {tag}: its card has no validation ROC-AUC to compare with {best}'s "
                            f"{references[best]:.4f}; {_FORCE_HINT.format(tag=tag)}")
    if new < references[best] - PROMOTE_MAX_ROC_AUC_DROP:
        raise RegistryError(f"cannot promote {tag}: its validation ROC-AUC {new:.4f} is {references[best] - new:.4f} "
                            f"below {best}'s {references[best]:.4f}, the best model promoted so far (each on its own "
                            f"validation split); {_FORCE_HINT.format(tag=tag)}")


def validation_roc_auc(card: ModelCard) -> float | None:
    """The card's validation ROC-AUC when it is a number in [0, 1] (`val_metrics` is free-form: a `true` there
    counted as 1.0 and became every later model's reference)."""
    value = card.val_metrics.get("roc_auc")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return None
    return float(value)


def rollback(name: str = MODEL_NAME) -> str:
    """Re-promote the model that was production before the current one, after loading it as `promote` does: a
    model damaged since it was production is refused, not served."""
    with _record_lock(name):
        record = _read_record(name)
        while record["history"]:
            previous = record["history"].pop()
            if not is_stored(previous) or previous == record.get("production"):
                continue  # deleted since, or the model already in production: skip to the one before
            try:
                _check_loads(previous, name, "cannot roll back to")
            except RegistryError as exc:
                raise RegistryError(f"{exc}; promote a stored model instead (python -m models_registry list, then "
                                    "promote TAG)") from None
            record["production"] = previous
            record.setdefault("log", []).append({"at": datetime.now(timezone.utc).isoformat(), "rolled_back_to": previous})
            _write_record(name, record)
            return previous
    raise RegistryError("nothing to roll back to: no earlier production model is recorded")


def delete_model(ref: str, name: str = MODEL_NAME, force: bool = False) -> str:
    """Remove a version from the store (the production one only with `force`); a damaged one with `force`
    (BentoML cannot read it, so cannot delete it either: its folder is removed)."""
    with _record_lock(name):  # a promotion between reading production and deleting would lose its check
        production = production_tag(name)  # also the only stored model, served without a promotion record
        try:
            tag = resolve_tag(ref, name)
        except DamagedModel as damaged:
            if damaged.folder.parent.name != name:
                raise RegistryError(f"cannot delete {ref}: it is not a {name} model") from None
            if not force:
                raise RegistryError(f"{damaged}; --force removes its folder {damaged.folder}") from None
            shutil.rmtree(damaged.folder)
            tag = f"{name}:{damaged.folder.name}"
        else:
            if not tag.startswith(f"{name}:"):
                raise RegistryError(f"cannot delete {tag}: it is not a {name} model")
            if production == tag and not force:
                raise RegistryError(f"{tag} is the production model; promote another first or pass --force")
            try:
                bentoml.models.delete(tag)
            except Exception as exc:  # noqa: BLE001 - BentoML removes the folder, then may fail re-reading the others
                if folder_in_store(tag) is not None:  # still there: nothing was deleted
                    raise RegistryError(f"could not delete {tag}: {' '.join(str(exc).split())}") from None
        record = _read_record(name)  # the record never names a deleted model
        if record.get("production") == tag:
            record["production"] = None
        record["history"] = [t for t in record["history"] if t != tag]
        _write_record(name, record)
    return tag


# The archive formats BentoML writes, by file name ending; any other name gets `.bentomodel` (xz-compressed tar)
# appended, as `bentoml models export` does.
ARCHIVE_ENDINGS = (".bentomodel", ".gz", ".xz", ".bz2", ".tar", ".zip")


def export_model(ref: str, path: str | Path, name: str = MODEL_NAME, overwrite: bool = False) -> Path:
    """Write a `.bentomodel` archive (the format of `bentoml models export`), or `.zip`/`.tar[.gz|.xz|.bz2]` by
    the name's ending. An existing file is kept unless it already holds the same files or `overwrite`; the archive
    is written beside the target and moved into place, so an interrupted export never leaves half an archive."""
    if not str(path).strip():
        raise RegistryError("no path to export to: give an archive file or a folder")
    tag = resolve_tag(ref, name)
    _check_loads(tag, name, "cannot export")  # an archive of a model that does not load would fail only on import
    out = Path(path).expanduser().resolve()  # BentoML resolves relative paths against "/"
    # 'newdir/' names a folder even before it exists: it wrote 'newdir.bentomodel' (resolve drops the slash)
    if out.is_dir() or str(path).endswith(("/", os.sep)):
        out = out / f"{tag.replace(':', '-')}.bentomodel"
    elif not out.name.endswith(ARCHIVE_ENDINGS):
        out = out.with_name(out.name + ".bentomodel")
    if out.is_file() and _archive_matches(out, store_path_of(tag)):
        return out  # the same files: rewriting would only change tar times and compression bytes (churn in git)
    if out.exists() and not overwrite:
        raise RegistryError(f"cannot export to {out}: it exists and holds something else (another model's archive?); "
                            "give another path, or --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as scratch:
            written = Path(bentoml.models.export_model(tag, str(Path(scratch) / out.name)))
            os.replace(written, out)
    except OSError as exc:
        from core.cli import unwritable_reason

        raise RegistryError(f"cannot write {out}: {unwritable_reason(out, exc)}") from None
    return out


def _archive_files(archive: Path, only: str = "") -> dict[str, bytes]:
    """The files in a tar (any compression) or zip archive, by normalised path (`only`: those whose path ends so,
    the others not read); ValueError when it is neither."""
    import tarfile
    import zipfile

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as packed:
                return {os.path.normpath(i.filename): packed.read(i) for i in packed.infolist()
                        if not i.is_dir() and i.filename.endswith(only)}
        with tarfile.open(archive) as tar:
            return {os.path.normpath(m.name): tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers() if m.isfile() and m.name.endswith(only)}
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"not a readable archive ({type(exc).__name__}: {exc})") from None


def _archive_matches(archive: Path, model_dir: Path) -> bool:
    """Whether `archive` holds exactly the files of the stored model at `model_dir`, byte for byte."""
    stored = {str(p.relative_to(model_dir)): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    try:
        return _archive_files(archive) == stored
    except ValueError:
        return False


def _check_loads(tag: str, name: str, doing: str, importing: bool = False) -> None:
    """Raise a RegistryError saying why `tag` is not a model of `name` that the service can load."""
    from models_registry.loader import ModelIntegrityError, load_model

    if not tag.startswith(f"{name}:"):
        raise RegistryError(f"{doing} {tag}: it is not a {name} model")
    try:
        load_model(tag, name)
    except ModelIntegrityError as exc:
        if importing:  # its advice (delete, import again) is for a stored model: this one is not kept
            cause = ("the archive is damaged and nothing was imported: export it again from where it came"
                     if exc.damaged else "nothing was imported")
            raise RegistryError(f"{doing} {tag}: {exc.problem}; {cause}") from None
        raise RegistryError(f"{doing} {tag}: {exc}") from None
    except RegistryError as exc:
        raise RegistryError(f"{doing} {tag}: {exc}") from None


def import_model(path: str | Path, promote_if_none: bool = False, name: str = MODEL_NAME) -> str:
    """Import a `.bentomodel` archive of a loadable `name` model; optionally promote it when none is in production.

    An archive whose tag is already stored is accepted only when its files are the stored ones, and a model
    that does not load (foreign card, corrupt weights) is removed again: the store never keeps what it cannot serve.
    """
    archive = Path(path).expanduser().resolve()  # BentoML resolves relative paths against "/"
    if not archive.is_file():
        raise RegistryError(f"{path} does not exist" if not archive.exists() else f"{path} is not a file")
    from bentoml.exceptions import BentoMLException

    try:
        packed: str | None = _tag_in_archive(archive)
    except Exception:  # noqa: BLE001 - no model.yaml, not YAML, not an archive: BentoML's import below says why
        packed = None
    was_stored = packed is not None and folder_in_store(packed) is not None
    if packed is not None and not was_stored:  # a new model is about to be stored
        pin_implicit_production(name)
    try:
        tag = str(bentoml.models.import_model(str(archive)).tag)
    except KeyboardInterrupt:  # BentoML removes a half-copied model on errors only: remove it on Ctrl-C too
        if packed is not None and not was_stored and (half := folder_in_store(packed)) is not None:
            shutil.rmtree(half, ignore_errors=True)
        raise
    except BentoMLException as exc:
        if "already exists" not in str(exc) or packed is None:
            raise RegistryError(f"could not import {path}: {exc}") from None
        tag = packed
        if not tag.startswith(f"{name}:"):
            raise RegistryError(f"could not import {tag}: it is not a {name} model") from None
        try:
            stored_at = store_path_of(tag)
        except _UNREADABLE:  # a damaged folder holds the tag (a half-copied import of an earlier version)
            raise RegistryError(f"could not import {path}: {tag} is in the store but damaged ({folder_in_store(tag)}); "
                                f"remove it with `python -m models_registry delete {tag} --force`, then import "
                                "again") from None
        if not _archive_matches(archive, stored_at):
            raise RegistryError(f"could not import {path}: {tag} is already in the store with other files; "
                                "the stored model was kept (delete it first to replace it)")
    except Exception as exc:  # noqa: BLE001 - not an archive: tarfile, yaml and OS errors of all kinds
        raise RegistryError(f"could not import {path}: it is not a .bentomodel archive ({type(exc).__name__}: {exc})") from None
    else:
        try:
            _check_loads(tag, name, "could not import", importing=True)
        except BaseException:  # a model that does not load, or Ctrl-C before it was checked: not kept
            bentoml.models.delete(tag)
            raise
    if promote_if_none and _read_record(name).get("production") is None:
        try:
            promote(tag, name)
        except RegistryError as exc:
            raise RegistryError(f"imported {tag}, not promoted: {exc}") from None
    return tag


def _tag_in_archive(archive: Path) -> str:
    import yaml

    info = yaml.safe_load(next(iter(_archive_files(archive, only="model.yaml").values())))
    return f"{info['name']}:{info['version']}"


def store_path_of(tag: str) -> Path:
    """Folder of a stored model (for the loader and integrity checks)."""
    return Path(bentoml.models.get(tag).path)


def read_card(tag: str) -> ModelCard:
    """The stored card of `tag`, without loading weights (cheap; used at service import)."""
    try:
        return ModelCard.model_validate(bentoml.models.get(tag).info.metadata)
    except NotFound:
        raise RegistryError(f"model {tag} is not in the store ({_model_store_dir()})") from None
    except ValueError as exc:
        raise RegistryError(f"model {tag} has unusable metadata: {exc}") from None


def resolve_service_tag(ref: str, service_dir: Path, name: str = MODEL_NAME) -> str:
    """The tag a service should serve.

    Inside a built Bento (its `bento.yaml` sits one level above the service
    code) 'production' means the model packed at build time, so a Bento always
    serves what it was built with; elsewhere it is the store's promoted model.
    """
    manifest = service_dir.parent / "bento.yaml"
    if names_production(ref) and manifest.is_file():
        import yaml

        info = yaml.safe_load(manifest.read_text())
        # BentoML 1.4 lists a service's models under services[].models (older: top-level models).
        listed = list(info.get("models") or []) + [m for svc in info.get("services") or [] for m in svc.get("models") or []]
        packed = sorted({str(m["tag"]) for m in listed if str(m.get("tag", "")).startswith(f"{name}:")})
        if len(packed) == 1:
            return packed[0]
    return resolve_tag(ref, name)
