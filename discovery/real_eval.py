"""``python -m discovery.real_eval``: an SAE judged on real activations, SAEBench-style.

- **Sparse probing.** For each tag of the store's samples (MusicCaps aspects) with enough support,
  the latents are ranked on the training samples by how much more they fire, pooled over each
  sample's frames (mean), on samples with the tag than without; a logistic probe on the 1, 2 and 5
  best of them is set against one on the dense activations (pooled the same way), by held-out
  accuracy and F1. A good dictionary has single latents that carry a concept.
- **Absorption.** Some tags nest: an electric or acoustic guitar is a guitar (``FAMILIES``: the
  MusicCaps aspects guitar, drums, bass and piano and their kinds). The parent's latent is the one
  that best separates samples tagged with the parent alone from samples of no kind of it; the
  child's, the one that best separates the child's samples from the parent's. On held-out samples
  with the child tag where the child's latent fires, absorption is how often the parent's latent
  stays silent, above how often it is silent on the parent's own samples anyway: a child latent
  that fires in the parent's place has absorbed it.

Writes ``<checkpoint>.real_eval.json`` beside the SAE checkpoint (``best/`` -> ``best.real_eval.json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sae_core.errors import UsageError

FAMILIES = {
    # parent concept: the MusicCaps aspects that are kinds of it (each a child; the parent's own tag too)
    "guitar": ("electric guitar", "acoustic guitar"),
    "drums": ("acoustic drums", "electronic drums"),
    "bass": ("bass guitar", "e-bass", "electric bass"),
    "piano": ("electric piano", "e-piano"),
}
PROBE_SIZES = (1, 2, 5)


@dataclass(frozen=True)
class RealEvalConfig:
    """Options of ``python -m discovery.real_eval``."""

    sae_path: str | None = None
    """SAE checkpoint (a run's best/ or final/, a .pt export or a SAELens directory)."""
    store: str = "data/activations"
    """Activation store with tagged samples (MusicCaps prompts)."""
    layer_idx: int | None = None
    """Store layer (default: the layer the SAE was trained on)."""
    test_fraction: float = 0.25
    """Samples held out for the probes' and absorption's scores."""
    min_positives: int = 8
    """A tag is probed when it has at least this many samples on each side of the split, and without it."""
    seed: int = 0
    """Seed of the train/test split of samples."""
    output: str | None = None
    """The JSON (default: beside the checkpoint, <checkpoint>.real_eval.json)."""
    progress: bool = True
    """Show progress."""

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"--test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.min_positives < 2:
            raise UsageError(f"--min_positives must be at least 2, got {self.min_positives}")


def pooled(sae, store, layer: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: the mean of its activations [S, D], and the mean and max of its latents [S, H]."""
    from tqdm import tqdm

    S, D, H = store.n_samples, store.d_model, sae.cfg.hidden_dim
    dense, mean, peak = np.zeros((S, D), np.float32), np.zeros((S, H), np.float32), np.zeros((S, H), np.float32)
    offsets = store.offsets
    with tqdm(total=store.n_rows, desc="pooling", unit="row", disable=not progress, leave=False) as bar:
        for samples, x in store.iter_sample_blocks(layer, 8192, stream=sae.cfg.input_stream):
            lengths = (offsets[samples + 1] - offsets[samples]).astype(np.int64)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            f = np.asarray(sae.encode(x))
            dense[samples] = np.add.reduceat(x, starts) / lengths[:, None]
            mean[samples] = np.add.reduceat(f, starts) / lengths[:, None]
            peak[samples] = np.maximum.reduceat(f, starts)
            bar.update(len(x))
    return dense, mean, peak


def fit_probe(x_NF: np.ndarray, y_N: np.ndarray, l2: float = 1e-2):
    """An L2-regularised logistic regression on standardised features: (predict, weights)."""
    logit, w = fit_logit(x_NF, y_N, l2)
    return (lambda x: logit(x) > 0), w


def fit_logit(x_NF: np.ndarray, y_N: np.ndarray, l2: float = 1e-2):
    """``fit_probe``'s regression returning its logit: (logit, weights)."""
    from scipy.optimize import minimize

    mu, sd = x_NF.mean(axis=0), x_NF.std(axis=0) + 1e-6
    z = (x_NF - mu) / sd
    y = y_N.astype(np.float64)

    def loss(w):
        logits = z @ w[:-1] + w[-1]
        p = 1.0 / (1.0 + np.exp(-logits))
        value = np.mean(np.logaddexp(0.0, logits) - y * logits) + l2 * np.sum(w[:-1] ** 2)
        grad = np.concatenate([z.T @ (p - y) / len(y) + 2 * l2 * w[:-1], [np.mean(p - y)]])
        return value, grad

    w = minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B").x
    return (lambda x: ((x - mu) / sd) @ w[:-1] + w[-1]), w


def _scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    tp = int(np.sum(predicted & truth))
    precision = tp / max(1, int(predicted.sum()))
    recall = tp / max(1, int(truth.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float(np.mean(predicted == truth)), "f1": f1}


def separation(values_NH: np.ndarray, positive_N: np.ndarray, negative_N: np.ndarray) -> np.ndarray:
    """Per latent: mean pooled activation on the positives minus on the negatives."""
    return values_NH[positive_N].mean(axis=0) - values_NH[negative_N].mean(axis=0)


def probe_tags(dense, mean, presence, tags, train, min_positives: int) -> dict:
    """Per tag: dense and 1/2/5-latent probes, held-out accuracy and F1 (and the majority baseline)."""
    test = ~train
    out = {}
    for t, tag in enumerate(tags):
        y = presence[:, t]
        if min(y[train].sum(), y[test].sum(), (~y[train]).sum(), (~y[test]).sum()) < min_positives:
            continue
        order = np.argsort(-separation(mean[train], y[train], ~y[train]), kind="stable")
        row = {"positives": int(y.sum()), "majority_accuracy": float(max(y[test].mean(), 1 - y[test].mean()))}
        predict, _ = fit_probe(dense[train], y[train])
        row["dense"] = _scores(predict(dense[test]), y[test])
        for k in PROBE_SIZES:
            latents = order[:k]
            predict, _ = fit_probe(mean[train][:, latents], y[train])
            row[f"top{k}"] = _scores(predict(mean[test][:, latents]), y[test]) | {"latents": latents.tolist()}
        out[tag] = row
    return out


def absorption(mean, peak, presence, tags, train, min_positives: int) -> list[dict]:
    """Per (parent, child) pair of ``FAMILIES`` whose tags the store carries: the parent latent (the
    one that best separates samples tagged with the parent alone from samples of no kind of it)
    silent where the child's latent (the one that best separates the child's samples from the
    parent's) fires, above its silence on the parent's own samples."""
    index = {tag: i for i, tag in enumerate(tags)}
    test, rows = ~train, []
    for parent, children in FAMILIES.items():
        present = [c for c in children if c in index]
        if parent not in index or not present:
            continue
        any_child = presence[:, [index[c] for c in present]].any(axis=1)
        parent_only = presence[:, index[parent]] & ~any_child
        unrelated = ~presence[:, index[parent]] & ~any_child
        for child in present:
            is_child = presence[:, index[child]]
            if min((parent_only & train).sum(), (parent_only & test).sum(), (is_child & train).sum(),
                   (is_child & test).sum()) < min_positives:
                continue
            p = int(np.argmax(separation(mean[train], parent_only[train], unrelated[train])))
            c = int(np.argmax(separation(mean[train], is_child[train], parent_only[train])))
            child_fires = is_child & test & (peak[:, c] > 0)
            silent_child = float(np.mean(peak[child_fires, p] <= 0)) if child_fires.any() else 0.0
            silent_parent = float(np.mean(peak[parent_only & test, p] <= 0))
            rows.append({"parent": parent, "child": child, "parent_latent": p, "child_latent": c,
                         "samples_child_latent_fires": int(child_fires.sum()), "parent_silent_there": silent_child,
                         "parent_silent_on_its_own_samples": silent_parent,
                         "absorption": max(0.0, silent_child - silent_parent)})
    return rows


def evaluate(sae, store, layer: int, cfg: RealEvalConfig) -> dict:
    """Probing and absorption of ``sae`` on ``layer`` of ``store`` (a dict, as written to the JSON)."""
    from .align import tag_matrix

    tags, presence = tag_matrix(store.samples, cfg.min_positives)
    if not tags:
        raise UsageError(f"no tag of {store.path} has {cfg.min_positives} samples with it and without it: "
                         "extract from tagged prompts (--csv with MusicCaps) or lower --min_positives")
    train = np.random.default_rng(cfg.seed).random(store.n_samples) >= cfg.test_fraction
    dense, mean, peak = pooled(sae, store, layer, cfg.progress)
    probes = probe_tags(dense, mean, presence, tags, train, cfg.min_positives)
    pairs = absorption(mean, peak, presence, tags, train, cfg.min_positives)

    def averaged(key: str) -> dict:
        rows = [r[key] for r in probes.values()]
        return {m: float(np.mean([r[m] for r in rows])) for m in ("accuracy", "f1")} if rows else {}

    return {"config": asdict(cfg), "layer": layer, "samples": {"train": int(train.sum()), "test": int((~train).sum())},
            "probing": {"tags": probes, "mean": {k: averaged(k) for k in ("dense", *(f"top{k}" for k in PROBE_SIZES))}},
            "absorption": {"pairs": pairs, "mean": float(np.mean([r["absorption"] for r in pairs])) if pairs else None}}


def output_path(sae_path: str | Path, output: str | None = None) -> Path:
    path = Path(sae_path)
    return Path(output) if output else path.with_name(path.name + ".real_eval.json")


def read_result(path: str | Path) -> dict:
    """A ``.real_eval.json`` as ``run`` wrote it; a damaged one is named with the command that rewrites it."""
    import json

    try:
        result = json.loads(Path(path).read_text())
        result["probing"]["mean"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UsageError(f"{path} is not a readable real-activation evaluation ({type(err).__name__}); rerun "
                         "python -m discovery.real_eval on its checkpoint") from None
    return result


def run(cfg: RealEvalConfig) -> dict:
    from sae_core.files import write_json
    from sae_core.store import open_store

    from jax_sae.api import SAE

    if not cfg.sae_path:
        raise UsageError("--sae_path is required: a checkpoint such as models/batch_topk/layer12/dim6144/best")
    store = open_store(cfg.store)
    sae = SAE.load(cfg.sae_path)
    layer = cfg.layer_idx if cfg.layer_idx is not None else sae.cfg.layer
    if layer is None:
        raise UsageError("the SAE does not record its layer; pass --layer_idx")
    store.check_layer(layer, sae.cfg.input_stream)
    if store.d_model != sae.cfg.d_model:
        raise UsageError(f"store width {store.d_model} does not match the SAE's d_model {sae.cfg.d_model}")
    result = {"sae_path": str(cfg.sae_path), "store": str(cfg.store)} | evaluate(sae, store, layer, cfg)
    out = output_path(cfg.sae_path, cfg.output)
    write_json(out, result)
    mean = result["probing"]["mean"]
    print(f"{out}: {len(result['probing']['tags'])} tags probed, F1 dense {mean['dense'].get('f1', float('nan')):.3f}, "
          + ", ".join(f"top-{k} {mean[f'top{k}'].get('f1', float('nan')):.3f}" for k in PROBE_SIZES)
          + f"; absorption over {len(result['absorption']['pairs'])} pairs: {result['absorption']['mean']}")
    return result


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(RealEvalConfig, argv, prog="python -m discovery.real_eval",
                    description="Sparse probing and absorption of an SAE on real (tagged) activations.", run=run)


if __name__ == "__main__":
    main()
