"""``eval.json``, what ``python -m extractor.evaluate`` writes: its one writer and its one reader.

Top level: ``model``, ``sae``, ``store``, ``layer``, ``samples``, ``stream``,
``mean_ablation_from``, ``predictions``, ``overall`` (a summary) and ``per_codebook`` (a summary
per codebook); newer files also hold ``mean_ablation_nonfinite_rows``, the NaN/Inf rows of the
store left out of the ablation mean. A summary holds ``ce_{clean,sae,zero,mean}``, ``kl_sae`` and
``loss_recovered_{zero,mean}`` = (CE_ablation - CE_sae) / (CE_ablation - CE_clean); a value that
is undefined (an ablation that changes the cross-entropy by about nothing, or a non-finite
figure) is null and explained in the summary's ``notes``. The file is strict JSON: never NaN or
Infinity. Torch-free, so the report and the JAX side read it without PyTorch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import UsageError
from .files import write_json

MODES = ("clean", "sae", "zero", "mean")
ABLATIONS = ("zero", "mean")
TOP_LEVEL_FIELDS = ("model", "sae", "store", "layer", "samples", "stream", "mean_ablation_from", "predictions",
                    "overall", "per_codebook")
SUMMARY_FIELDS = tuple(f"ce_{m}" for m in MODES) + ("kl_sae",) + tuple(f"loss_recovered_{a}" for a in ABLATIONS)
# Cross-entropies come from float32 log-probabilities, good to about 1e-6 nats: an ablation gap
# below that is noise, and a ratio over it would be too.
UNDEFINED_GAP = 1e-6


class EvalFileError(UsageError):
    """An eval.json that is missing, not JSON, or lacks a field its readers need."""


def summarize_losses(ce: Mapping[str, float], kl: float) -> dict:
    """A summary from mean cross-entropies per mode (``MODES``) and the mean KL(clean || SAE)."""
    notes = []
    out = {}
    for name, value in [(f"ce_{m}", ce[m]) for m in MODES] + [("kl_sae", kl)]:
        out[name] = _finite_or_none(value, name, notes)
    for ablation in ABLATIONS:
        name = f"loss_recovered_{ablation}"
        gap = ce[ablation] - ce["clean"]
        if not math.isfinite(gap) or abs(gap) <= UNDEFINED_GAP:
            out[name] = None
            if math.isfinite(gap):
                notes.append(f"{name} is undefined: {ablation} ablation changes the cross-entropy by "
                             f"{gap:.2g} nats (at most {UNDEFINED_GAP:g}), so there is no loss to recover")
        else:
            out[name] = _finite_or_none((ce[ablation] - ce["sae"]) / gap, name, notes)
    if notes:
        out["notes"] = notes
    return out


def _finite_or_none(value: float, name: str, notes: list[str]) -> float | None:
    value = float(value)
    if math.isfinite(value):
        return value
    notes.append(f"{name} is undefined: it came out {value} (the model or the SAE produced non-finite values)")
    return None


def write_eval(path: str | os.PathLike, result: Mapping) -> None:
    """Write ``result`` (as ``extractor.evaluate`` builds it) to ``path`` atomically, as strict JSON."""
    _check(result, path)
    write_json(path, result, allow_nan=False)


def read_eval(path: str | os.PathLike) -> dict:
    """The contents of an eval.json, its fields checked; every summary gets ``notes`` (maybe empty)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvalFileError(f"no evaluation file at {path}; run python -m extractor.evaluate first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalFileError(f"{path} is not an evaluation file: {err}") from None
    _check(result, path)
    for summary in [result["overall"], *result["per_codebook"]]:
        summary.setdefault("notes", [])
    return result


def _check(result, path) -> None:
    if not isinstance(result, Mapping):
        raise EvalFileError(f"{path} is not an evaluation file: it holds {type(result).__name__}, not an object")
    missing = [f for f in TOP_LEVEL_FIELDS if f not in result]
    if missing:
        raise EvalFileError(f"{path} lacks the field {missing[0]!r} (an eval.json from python -m extractor.evaluate "
                            f"has {', '.join(TOP_LEVEL_FIELDS)})")
    if not isinstance(result["per_codebook"], list):
        raise EvalFileError(f"{path}: 'per_codebook' is not a list")
    for where, summary in [("overall", result["overall"])] + [
            (f"per_codebook[{i}]", s) for i, s in enumerate(result["per_codebook"])]:
        _check_summary(summary, f"{where}", path)


def _check_summary(summary, where: str, path) -> None:
    if not isinstance(summary, Mapping):
        raise EvalFileError(f"{path}: {where!r} is not an object")
    for field in SUMMARY_FIELDS:
        if field not in summary:
            raise EvalFileError(f"{path} lacks the field '{where}.{field}'")
        value = summary[field]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise EvalFileError(f"{path}: '{where}.{field}' is {value!r}, not a number or null")
