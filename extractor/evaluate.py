"""``python -m extractor.evaluate``: how much of MusicGen's behaviour an SAE keeps.

Over a store's codes (teacher forced, conditional stream), the decoder layer's output is
replaced by (a) itself, (b) the SAE reconstruction, (c) zeros, (d) its mean over the store.
For each, the cross-entropy of the next codes is measured per codebook (position p predicts
codebook k of frame p - delay_k under the delay pattern; positions before a codebook starts are
skipped), with KL(clean || SAE) and

    loss recovered = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)

for zero and mean ablation: 1 means the SAE loses nothing, 0 means it is as bad as ablation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .capture import layer_hook, model_inputs, padded_input_ids
from .models import ModelError, load_model
from .saelens import SAEFormatError
from .store import StoreError, open_store
from .torch_sae import TorchSAE

MODES = ("clean", "sae", "zero", "mean")


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``python -m extractor.evaluate``."""

    model: str = "facebook/musicgen-small"
    """The MusicGen the store was extracted from."""
    sae: str | None = None
    """Exported SAE: a torch .pt file or a SAELens directory."""
    store: str = "data/activations"
    """Store whose codes and prompts are evaluated."""
    layer: int | None = None
    """Decoder layer to splice (default: the SAE's layer)."""
    out: str = "eval.json"
    """Where to write the results."""
    batch_size: int = 8
    """Samples per forward pass."""
    max_samples: int | None = None
    """Evaluate only the first N samples."""
    device: str = "auto"
    """auto | cpu | cuda."""
    model_dtype: str = "auto"
    """Compute dtype (auto: float16 on CUDA, float32 on CPU)."""
    progress: bool = True
    """Show progress."""

    def __post_init__(self) -> None:
        if not self.sae:
            raise ValueError("--sae is required (an exported .pt file or SAELens directory)")
        if self.batch_size <= 0:
            raise ValueError("--batch_size must be positive")


def _layer_mean(store, layer: int, d_model: int) -> np.ndarray:
    total, count = np.zeros(d_model, np.float64), 0
    for x in store.iter_rows(layer, 8192):
        total += x.sum(axis=0)
        count += len(x)
    return (total / max(count, 1)).astype(np.float32)


def _targets(codes: np.ndarray, n: int, delays: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Target code and validity for every (codebook, position): position p predicts frame p - delay_k."""
    k = len(delays)
    target = np.zeros((k, n), np.int64)
    valid = np.zeros((k, n), bool)
    for book, delay in enumerate(delays):
        frames = np.arange(n) - delay
        ok = (frames >= 0) & (frames < len(codes))
        target[book, ok] = codes[frames[ok], book]
        valid[book, ok] = True
    return target, valid


class _Sums:
    def __init__(self, k: int):
        self.ce = {m: np.zeros(k) for m in MODES}
        self.kl = np.zeros(k)
        self.count = np.zeros(k)

    def result(self) -> dict:
        def summary(ce: dict, kl: float) -> dict:
            out = {f"ce_{m}": float(ce[m]) for m in MODES} | {"kl_sae": float(kl)}
            for ablation in ("zero", "mean"):
                gap = ce[ablation] - ce["clean"]
                out[f"loss_recovered_{ablation}"] = float((ce[ablation] - ce["sae"]) / gap) if abs(gap) > 1e-12 else None
            return out

        n = np.maximum(self.count, 1)
        per_book = [summary({m: self.ce[m][b] / n[b] for m in MODES}, self.kl[b] / n[b]) for b in range(len(n))]
        total = max(self.count.sum(), 1)
        overall = summary({m: self.ce[m].sum() / total for m in MODES}, self.kl.sum() / total)
        return {"overall": overall, "per_codebook": per_book, "predictions": int(self.count.sum())}


@torch.no_grad()
def evaluate(cfg: EvaluateConfig) -> dict:
    from tqdm import tqdm

    sae = TorchSAE.from_pretrained(cfg.sae)
    store = open_store(cfg.store)
    loaded = load_model(cfg.model, cfg.device, cfg.model_dtype)
    layer = cfg.layer if cfg.layer is not None else (sae.config.get("layer") or sae.config.get("metadata", {}).get(
        "hook_layer"))
    if layer is None or not 0 <= int(layer) < loaded.info.num_layers:
        raise ValueError(f"layer {layer} is not a decoder layer of {cfg.model} (0-{loaded.info.num_layers - 1}); "
                         "pass --layer")
    layer = int(layer)
    if sae.d_model != loaded.info.d_model:
        raise ValueError(f"the SAE is {sae.d_model} wide but layer {layer} of {cfg.model} is {loaded.info.d_model}")
    if store.meta.n_codebooks != loaded.info.num_codebooks:
        raise StoreError(f"store {store.path} has {store.meta.n_codebooks} codebooks, {cfg.model} has "
                         f"{loaded.info.num_codebooks}: it was made with another model")
    sae = sae.to(loaded.device)
    if layer in store.layers:
        mean, mean_source = torch.from_numpy(_layer_mean(store, layer, loaded.info.d_model)), "store"
    else:
        mean, mean_source = _clean_mean(loaded, store, layer, cfg), "clean pass"
    mean = mean.to(loaded.device)
    replacements = {"clean": lambda h: None, "sae": lambda h: sae(h.float()), "zero": lambda h: torch.zeros_like(h),
                    "mean": lambda h: mean.expand_as(h)}
    k = loaded.info.num_codebooks
    sums = _Sums(k)
    n_samples = min(store.n_samples, cfg.max_samples or store.n_samples)
    for lo in tqdm(range(0, n_samples, cfg.batch_size), desc="spliced evaluation", disable=not cfg.progress):
        idx = range(lo, min(n_samples, lo + cfg.batch_size))
        codes = [store.sample_codes(i) for i in idx]
        n = max(len(c) for c in codes)
        ids = padded_input_ids(loaded, codes)
        inputs = model_inputs(loaded, [store.samples[i]["prompt"] for i in idx],
                              [store.samples[i].get("melody_chroma") for i in idx],
                              store.meta.generation.get("text_length"))
        logprobs = {}
        for mode, replacement in replacements.items():
            with layer_hook(loaded, layer, lambda hidden, _start, replacement=replacement: replacement(hidden)):
                logits = loaded.model(**inputs, decoder_input_ids=ids).logits.float()
            # melody checkpoints also return logits for their conditioning positions, in front
            logprobs[mode] = torch.log_softmax(logits.reshape(len(codes), k, -1, logits.shape[-1])[:, :, -n:], dim=-1)
        for i, c in enumerate(codes):
            target, valid = _targets(c, len(c), loaded.info.delays)
            t = torch.from_numpy(target).to(loaded.device)
            v = torch.from_numpy(valid).to(loaded.device)
            for mode in MODES:
                lp = logprobs[mode][i, :, : len(c)]
                nll = -lp.gather(-1, t[..., None])[..., 0]
                sums.ce[mode] += (nll * v).sum(-1).cpu().numpy()
            clean, spliced = logprobs["clean"][i, :, : len(c)], logprobs["sae"][i, :, : len(c)]
            kl = (clean.exp() * (clean - spliced)).sum(-1)
            sums.kl += (kl * v).sum(-1).cpu().numpy()
            sums.count += v.sum(-1).cpu().numpy()
    result = {"model": cfg.model, "sae": str(cfg.sae), "store": str(store.path), "layer": layer,
              "samples": n_samples, "stream": "cond", "mean_ablation_from": mean_source, **sums.result()}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    o = result["overall"]
    print(f"{cfg.out}: CE clean {o['ce_clean']:.4f}, SAE {o['ce_sae']:.4f}, zero {o['ce_zero']:.4f}, mean "
          f"{o['ce_mean']:.4f}; loss recovered {o['loss_recovered_zero']:.3f} (zero), "
          f"{o['loss_recovered_mean']:.3f} (mean); KL {o['kl_sae']:.4f}")
    return result


def _clean_mean(loaded, store, layer: int, cfg: EvaluateConfig) -> torch.Tensor:
    """The layer's mean output over the evaluated samples when the store does not hold the layer."""
    from .capture import teacher_forced_batch

    total, count = None, 0
    n_samples = min(store.n_samples, cfg.max_samples or store.n_samples)
    for lo in range(0, n_samples, cfg.batch_size):
        idx = range(lo, min(n_samples, lo + cfg.batch_size))
        acts = teacher_forced_batch(loaded, [store.samples[i]["prompt"] for i in idx],
                                    [store.sample_codes(i) for i in idx], [layer],
                                    [store.samples[i].get("melody_chroma") for i in idx],
                                    store.meta.generation.get("text_length"))[layer]
        rows = np.concatenate(acts)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += len(rows)
    return torch.from_numpy((total / count).astype(np.float32))


def main(argv: list[str] | None = None):
    from .cli import run_main

    return run_main(EvaluateConfig, argv, prog="python -m extractor.evaluate",
                    description="Spliced-in evaluation of an SAE inside MusicGen.", run=evaluate,
                    errors=(ValueError, StoreError, ModelError, SAEFormatError))


if __name__ == "__main__":
    main()
