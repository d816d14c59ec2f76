"""SynthSAEBench's scores of an SAE against the true features of a synthetic model.

The definitions are the benchmark's (SAELens ``sae_lens.synthetic.evals``):

- MCC: decoder rows matched one to one to true directions (Hungarian, on |cos|), the mean matched |cos|.
- uniqueness: distinct best-matching true features (argmax |cos| per latent) over latents.
- precision / recall / F1 per latent, against the firing of its best-matching true feature (by
  decoder cosine), over the evaluation samples; the unweighted mean over all latents, a dead
  latent counting 0.
- explained variance: 1 - mean squared error / total variance (centred), pooled over samples.
- shrinkage: mean over samples of |x_hat| / |x|. L0 and the true L0: mean firing per sample.
- dead: latents that never fire on the evaluation samples.

Beyond the benchmark's scores, two that say what its uniqueness is made of (uniqueness counts dead
latents too, and a latent that never learned points somewhere random, usually at a feature of its
own): ``uniqueness_live``, distinct best matches of the latents that fire over their number, and
``dead_max_cos``, the dead latents' mean best |cos| (near the random level, about 0.17 for 768
dimensions, where they never learned; high where they learned a feature and then stopped firing).
``surplus`` and its medians (see ``surplus``) say what the live duplicates are.

Evaluation samples are fresh ones from their own stream of the model (``EVAL_STREAM``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_sae import model as M

from .build import SynthModel
from .sample import key, samples

EVAL_STREAM = 2
"""The key stream of evaluation samples (training draws stream 0, validation 1, the scan 3)."""


def cosines(W_dec_HD, directions_ND) -> np.ndarray:
    """[H, N] |cos| between decoder rows and true directions."""
    W = W_dec_HD / jnp.maximum(jnp.linalg.norm(W_dec_HD, axis=1, keepdims=True), 1e-8)
    E = directions_ND / jnp.maximum(jnp.linalg.norm(directions_ND, axis=1, keepdims=True), 1e-8)
    return np.array(jnp.abs(W @ E.T))


def matching(cos_HN: np.ndarray) -> dict:
    """MCC (one-to-one Hungarian matching) and uniqueness from the |cos| matrix."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cos_HN, maximize=True)
    best = np.argmax(cos_HN, axis=1)
    return {"mcc": float(cos_HN[rows, cols].mean()), "uniqueness": len(np.unique(best)) / cos_HN.shape[0],
            "best_match": best, "best_cos": cos_HN.max(axis=1)}


@jax.jit
def batch_sums(x, a, f, x_hat, best_H):
    """One batch's contribution to every score: samples x, their true magnitudes a, the SAE's
    latents f and reconstruction x_hat, and each latent's best-matching true feature."""
    fires, truth = f != 0, jnp.take(a, best_H, axis=1) > 0
    norm, norm_hat = jnp.linalg.norm(x, axis=1), jnp.linalg.norm(x_hat, axis=1)
    counted = norm > 1e-6
    return {
        "tp": jnp.sum(fires & truth, axis=0), "fp": jnp.sum(fires & ~truth, axis=0),
        "fn": jnp.sum(~fires & truth, axis=0), "fires": jnp.sum(fires, axis=0),
        "sq_err": jnp.sum((x - x_hat) ** 2), "sum_x": jnp.sum(x, axis=0), "sum_sq_x": jnp.sum(x * x),
        "shrink": jnp.sum(jnp.where(counted, norm_hat / jnp.where(counted, norm, 1.0), 0.0)),
        "shrink_n": jnp.sum(counted), "l0": jnp.sum(fires), "true_l0": jnp.sum(a > 0), "n": x.shape[0],
    }


@functools.partial(jax.jit, static_argnums=(0, 5))
def _sae_batch(cfg, params, threshold, scale, model: SynthModel, batch: int, k: jax.Array):
    x, a, overflow = samples(model, k, batch)
    f = M.encode_infer(cfg, params, threshold, x * scale)
    return x, a, f, M.decode(params, f) / scale, overflow


def _per_latent(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    precision = np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(len(tp)), where=(tp + fn) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(tp)), where=(precision + recall) > 0)
    return precision, recall, f1


def score(sae, model: SynthModel, *, n_samples: int = 500_000, batch: int = 1024, seed: int = 0,
          progress: bool = False) -> dict:
    """The benchmark's scores of ``sae`` (a ``jax_sae.api.SAE``) on ``n_samples`` evaluation samples."""
    from tqdm import tqdm

    stream = jax.random.fold_in(key(seed), EVAL_STREAM)
    overflow = []

    def batches():
        for i in tqdm(range(-(-n_samples // batch)), desc="synthetic eval", unit="batch", disable=not progress,
                      leave=False):
            *arrays, over = _sae_batch(sae.cfg, sae.params, sae.threshold, sae.input_scale, model, batch,
                                       jax.random.fold_in(stream, i))
            overflow.append(over)
            yield arrays

    scores = score_batches(sae.params.W_dec_HD, model.directions, batches())
    return scores | {"events_over_cap": int(sum(int(o) for o in overflow))}


def score_batches(W_dec_HD, directions_ND, batches) -> dict:
    """The scores from the decoder, the true directions and batches of (x, a, f, x_hat)."""
    match = matching(cosines(W_dec_HD, directions_ND))
    best_np, best_cos = match.pop("best_match"), match.pop("best_cos")
    best = jnp.asarray(best_np)
    totals: dict = {}
    for x, a, f, x_hat in batches:
        for name, value in jax.device_get(batch_sums(x, a, f, x_hat, best)).items():
            value = np.asarray(value, np.float64 if value.dtype.kind == "f" else np.int64)
            totals[name] = value if name not in totals else totals[name] + value
    n, hidden = int(totals["n"]), len(totals["tp"])
    precision, recall, f1 = _per_latent(totals["tp"], totals["fp"], totals["fn"])
    mean_x = totals["sum_x"] / n
    live = totals["fires"] > 0
    variance = totals["sum_sq_x"] / n - float(mean_x @ mean_x)
    return match | {
        "f1": float(f1.mean()), "precision": float(precision.mean()), "recall": float(recall.mean()),
        "explained_variance": float(1.0 - (totals["sq_err"] / n) / variance) if variance > 1e-10 else float("nan"),
        "shrinkage": float(totals["shrink"] / max(1, totals["shrink_n"])),
        "l0": float(totals["l0"] / n), "true_l0": float(totals["true_l0"] / n),
        "dead": int(hidden - live.sum()), "hidden_dim": hidden, "samples": n,
        "uniqueness_live": len(np.unique(best_np[live])) / max(1, int(live.sum())),
        "dead_max_cos": float(best_cos[~live].mean()) if (~live).any() else float("nan"),
        **surplus(best_np, best_cos, totals["fires"] / n),
    }


def surplus(best_H: np.ndarray, best_cos_H: np.ndarray, rate_H: np.ndarray) -> dict:
    """The live latents that uniqueness counts as duplicates: those whose best-matching feature is
    also the best match of a live latent with a higher |cos| (``surplus``), with their median best
    |cos| and firing rate per sample beside the other live latents' (``kept_cos``, ``kept_rate``).
    A surplus latent near the random |cos| that fires rarely never learned a feature; one near 1
    that fires often is a second copy of one."""
    live = np.flatnonzero(rate_H > 0)
    order = live[np.lexsort((-best_cos_H[live], best_H[live]))]  # by feature, the best |cos| first
    first = np.ones(len(order), bool)
    first[1:] = best_H[order][1:] != best_H[order][:-1]
    extra, kept = order[~first], order[first]

    def median(values):
        return float(np.median(values)) if len(values) else float("nan")

    return {"surplus": int(len(extra)), "surplus_cos": median(best_cos_H[extra]), "surplus_rate": median(rate_H[extra]),
            "kept_cos": median(best_cos_H[kept]), "kept_rate": median(rate_H[kept])}


def generator_stats(model: SynthModel, *, n_samples: int = 100_000, batch: int = 1024, seed: int = 0) -> dict:
    """What the generator draws, to set beside another implementation's: the true L0 (all features,
    and the most frequent quarter), each hierarchy level's firing against its Zipfian target, how often
    a child fires without its parent or beside a sibling (never, by construction), each feature's
    firing rate against its target in ten frequency bins, and the directions' overlap."""
    from .build import parents, zipf_probabilities

    cfg = model.cfg
    parent = jnp.asarray(np.maximum(parents(cfg), 0))
    has_parent = jnp.asarray(parents(cfg) >= 0)

    @jax.jit
    def sums(k):
        _, a, _ = samples(model, k, batch)
        fires = a > 0
        orphan = jnp.sum(fires & has_parent & ~jnp.take(fires, parent, axis=1))
        tree = fires[:, cfg.level_starts()[1]:cfg.tree_features] if cfg.roots and cfg.depth else fires[:, :0]
        families = tree.reshape(batch, -1, cfg.branching).sum(axis=2)
        return jnp.sum(fires, axis=0), orphan, jnp.sum(families > 1)

    stream = jax.random.fold_in(key(seed), EVAL_STREAM + 1)
    batches = -(-n_samples // batch)
    count, orphans, crowded, per_batch = np.zeros(cfg.n_features), 0, 0, []
    for i in range(batches):
        c, o, m = jax.device_get(sums(jax.random.fold_in(stream, i)))
        count, orphans, crowded = count + c, orphans + int(o), crowded + int(m)
        per_batch.append(c.sum() / batch)
    n = batches * batch
    rate, target = count / n, zipf_probabilities(cfg)
    starts = cfg.level_starts() if cfg.roots else [0]
    levels = {f"level {lv}": float(rate[starts[lv]:starts[lv + 1]].sum() / target[starts[lv]:starts[lv + 1]].sum())
              for lv in range(cfg.depth + 1) if cfg.roots}
    bins = np.array_split(np.arange(cfg.n_features), 10)
    cos = cosines(model.directions, model.directions)
    np.fill_diagonal(cos, 0.0)
    return {
        "samples": n, "true_l0": float(rate.sum()),
        "true_l0_standard_error": float(np.std(per_batch, ddof=1) / np.sqrt(batches)) if batches > 1 else float("nan"),
        "true_l0_top_quarter": float(rate[: cfg.n_features // 4].sum()),
        "realised_over_zipf": levels | ({"outside the trees": float(rate[cfg.tree_features:].sum()
                                                                  / target[cfg.tree_features:].sum())}
                                        if cfg.tree_features < cfg.n_features else {}),
        "rate_by_decile": [float(rate[b].mean()) for b in bins],
        "children_without_parent": orphans, "families_with_two_children": crowded,
        "mean_max_cos": float(cos.max(axis=1).mean()), "mean_abs_cos": float(cos.sum() / (len(cos) * (len(cos) - 1))),
    }
