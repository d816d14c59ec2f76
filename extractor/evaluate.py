"""``python -m extractor.evaluate``: how much of MusicGen's behaviour an SAE keeps.

Over a store's codes (teacher forced, conditional stream), the decoder layer's output is
replaced by (a) itself, (b) the SAE reconstruction, (c) zeros, (d) its mean over the store. For
a transcoder, the replaced output is the layer's MLP output (its fc2), and (b) is the
transcoder's prediction from the MLP's live input (its final_layer_norm's output); (d) is the
mean of the store's mlp_out stream.
For each, the cross-entropy of the next codes is measured per codebook (position p predicts
codebook k of frame p - delay_k under the delay pattern; positions before a codebook starts are
skipped), with KL(clean || SAE) and

    loss recovered = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)

for zero and mean ablation: 1 means the SAE loses nothing, 0 means it is as bad as ablation.
Where an ablation costs about nothing, loss recovered is undefined: null, with a note
(``sae_core.eval_file`` owns the file).

The store's activations are read for one thing only, the mean of (d) (the SAE reconstructs the
model's live output, and the codes drive the model). NaN/Inf rows in them are skipped and
counted, not a reason to stop: a mean over the other rows is as good an ablation baseline, and
one broken frame would otherwise turn the whole mean, and every mean-ablation figure, into NaN.
eval.json records the count (``mean_ablation_nonfinite_rows``) and the run prints it in one
line; a layer with no finite row stops with one line.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .capture import layer_hook, mlp_module, model_inputs, module_hook, padded_input_ids
from sae_core.errors import UsageError
from sae_core.eval_file import MODES, summarize_losses, write_eval
from .models import load_model
from sae_core.store import StoreError, open_store
from .torch_sae import TorchSAE


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
            raise UsageError("--sae is required (an exported .pt file or SAELens directory)")
        if self.batch_size <= 0:
            raise UsageError("--batch_size must be positive")


def checked_layer(sae: TorchSAE, layer: int | None, loaded, model: str) -> int:
    """The decoder layer to splice ``sae`` into: ``layer``, else the SAE's own; checked against the model."""
    if layer is None:
        layer = sae.config.get("layer", sae.config.get("metadata", {}).get("hook_layer"))
    if layer is None or not 0 <= int(layer) < loaded.info.num_layers:
        raise UsageError(f"layer {layer} is not a decoder layer of {model} (0-{loaded.info.num_layers - 1}); "
                         "pass --layer")
    layer = int(layer)
    if sae.d_model != loaded.info.d_model:
        raise UsageError(f"the SAE is {sae.d_model} wide but layer {layer} of {model} is {loaded.info.d_model}")
    return layer


def _layer_mean(store, layer: int, d_model: int, stream: str = "cond") -> tuple[np.ndarray, np.ndarray]:
    """The mean of the layer's finite rows of ``stream`` in the store, and the global indices of the others."""
    total, count, skipped = np.zeros(d_model, np.float64), 0, []
    for x, rows in store.iter_rows_indexed(layer, 8192, stream=stream):
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            skipped.append(rows[~finite])
            x = x[finite]
        total += x.sum(axis=0)
        count += len(x)
    if count == 0 and store.n_rows:
        raise StoreError(f"every row of layer {layer} of {store.path} is non-finite (NaN/Inf), so it has no mean to "
                         "ablate with; re-extract the store")
    return (total / max(count, 1)).astype(np.float32), np.concatenate(skipped) if skipped else np.zeros(0, np.int64)


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
    """Summed cross-entropy per mode and codebook, summed KL and prediction counts."""

    def __init__(self, k: int):
        self.ce = {m: np.zeros(k) for m in MODES}
        self.kl = np.zeros(k)
        self.count = np.zeros(k)

    def add_sample(self, logprobs: dict[str, torch.Tensor], codes: np.ndarray, delays: tuple[int, ...]) -> None:
        """Add one sample: ``logprobs[mode]`` is [codebooks, positions, vocab], ``codes`` its [frames, codebooks]."""
        n = len(codes)
        target, valid = _targets(codes, n, delays)
        device = logprobs["clean"].device
        t = torch.from_numpy(target).to(device)
        v = torch.from_numpy(valid).to(device)
        for mode in MODES:
            nll = -logprobs[mode][:, :n].gather(-1, t[..., None])[..., 0]
            self.ce[mode] += (nll * v).sum(-1).cpu().numpy()
        clean, spliced = logprobs["clean"][:, :n], logprobs["sae"][:, :n]
        kl = (clean.exp() * (clean - spliced)).sum(-1)
        self.kl += (kl * v).sum(-1).cpu().numpy()
        self.count += v.sum(-1).cpu().numpy()

    def result(self) -> dict:
        n = np.maximum(self.count, 1)
        per_book = [summarize_losses({m: self.ce[m][b] / n[b] for m in MODES}, self.kl[b] / n[b])
                    for b in range(len(n))]
        total = max(self.count.sum(), 1)
        overall = summarize_losses({m: self.ce[m].sum() / total for m in MODES}, self.kl.sum() / total)
        return {"overall": overall, "per_codebook": per_book, "predictions": int(self.count.sum())}


def _replacements(sae: TorchSAE, mean: torch.Tensor) -> dict:
    """What each mode puts in place of the replaced output (None: leave it); each takes that output
    and the transcoder's input (the MLP's, seen in the same pass; None for an SAE)."""
    return {"clean": lambda h, x: None, "sae": lambda h, x: sae(h.float() if x is None else x.float()),
            "zero": lambda h, x: torch.zeros_like(h), "mean": lambda h, x: mean.expand_as(h)}


@contextmanager
def spliced(loaded, layer: int, transcoder: bool, replace):
    """Within the block, ``replace(output, input)`` takes the place of decoder layer ``layer``'s output
    (input None), or for a transcoder of that layer's MLP output, given the MLP's input of the same
    pass (its final_layer_norm's output, which the replacement leaves unchanged)."""
    if not transcoder:
        with layer_hook(loaded, layer, lambda hidden, _start: replace(hidden, None)):
            yield
        return
    seen = {}

    def keep(hidden, _start):
        seen["x"] = hidden

    with module_hook(loaded, mlp_module(loaded, layer, "mlp_in"), keep), \
            module_hook(loaded, mlp_module(loaded, layer, "mlp_out"), lambda hidden, _start: replace(hidden, seen["x"])):
        yield


def _spliced_logprobs(loaded, store, layer: int, replacements: dict, idx: range, codes: list,
                      transcoder: bool = False) -> dict:
    """Per mode, next-code log-probabilities [samples, codebooks, positions, vocab] of samples ``idx``."""
    k, n = loaded.info.num_codebooks, max(len(c) for c in codes)
    ids = padded_input_ids(loaded, codes)
    inputs = model_inputs(loaded, [store.samples[i]["prompt"] for i in idx],
                          [store.samples[i].get("melody_chroma") for i in idx],
                          store.meta.generation.get("text_length"))
    logprobs = {}
    for mode, replacement in replacements.items():
        with spliced(loaded, layer, transcoder, replacement):
            logits = loaded.model(**inputs, decoder_input_ids=ids).logits.float()
        # melody checkpoints also return logits for their conditioning positions, in front
        logprobs[mode] = torch.log_softmax(logits.reshape(len(codes), k, -1, logits.shape[-1])[:, :, -n:], dim=-1)
    return logprobs


def _ablation_mean(loaded, store, layer: int, cfg: EvaluateConfig,
                   stream: str = "cond") -> tuple[torch.Tensor, str, np.ndarray]:
    """The mean of the replaced output (the layer's, or its MLP's: ``stream`` mlp_out), on the model's
    device, where it came from, and the store rows it skipped as non-finite."""
    if layer in store.layers and stream in store.meta.streams:
        mean, skipped = _layer_mean(store, layer, loaded.info.d_model, stream)
        return torch.from_numpy(mean).to(loaded.device), "store", skipped
    return _clean_mean(loaded, store, layer, cfg, stream).to(loaded.device), "clean pass", np.zeros(0, np.int64)


@torch.no_grad()
def evaluate(cfg: EvaluateConfig) -> dict:
    from tqdm import tqdm

    sae = TorchSAE.from_pretrained(cfg.sae)
    store = open_store(cfg.store)
    loaded = load_model(cfg.model, cfg.device, cfg.model_dtype)
    layer = checked_layer(sae, cfg.layer, loaded, cfg.model)
    if store.meta.n_codebooks != loaded.info.num_codebooks:
        raise StoreError(f"store {store.path} has {store.meta.n_codebooks} codebooks, {cfg.model} has "
                         f"{loaded.info.num_codebooks}: it was made with another model")
    sae = sae.to(loaded.device)
    stream = "mlp_out" if sae.is_transcoder else "cond"
    mean, mean_source, skipped = _ablation_mean(loaded, store, layer, cfg, stream)
    if len(skipped):
        print(f"mean ablation: skipped {len(skipped)} non-finite (NaN/Inf) rows of layer {layer} of {store.path} "
              f"(first: row {skipped[0]}); the mean is over the other {store.n_rows - len(skipped)} rows")
    replacements = _replacements(sae, mean)
    sums = _Sums(loaded.info.num_codebooks)
    n_samples = min(store.n_samples, cfg.max_samples or store.n_samples)
    for lo in tqdm(range(0, n_samples, cfg.batch_size), desc="spliced evaluation", disable=not cfg.progress):
        idx = range(lo, min(n_samples, lo + cfg.batch_size))
        codes = [store.sample_codes(i) for i in idx]
        logprobs = _spliced_logprobs(loaded, store, layer, replacements, idx, codes, sae.is_transcoder)
        for i, c in enumerate(codes):
            sums.add_sample({mode: lp[i] for mode, lp in logprobs.items()}, c, loaded.info.delays)
    result = {"model": cfg.model, "sae": str(cfg.sae), "store": str(store.path), "layer": layer,
              "samples": n_samples, "stream": "cond", "replaced": "mlp_out" if sae.is_transcoder else "layer_out",
              "transcoder": sae.transcoder, "mean_ablation_from": mean_source,
              "mean_ablation_nonfinite_rows": len(skipped), **sums.result()}
    write_eval(cfg.out, result)
    print(_summary_line(cfg.out, result["overall"]))
    return result


def _summary_line(out: str, overall: dict) -> str:
    def figure(name: str, digits: int) -> str:
        return "undefined" if overall[name] is None else f"{overall[name]:.{digits}f}"

    return (f"{out}: CE clean {figure('ce_clean', 4)}, SAE {figure('ce_sae', 4)}, zero {figure('ce_zero', 4)}, "
            f"mean {figure('ce_mean', 4)}; loss recovered {figure('loss_recovered_zero', 3)} (zero), "
            f"{figure('loss_recovered_mean', 3)} (mean); KL {figure('kl_sae', 4)}")


def _clean_mean(loaded, store, layer: int, cfg: EvaluateConfig, stream: str = "cond") -> torch.Tensor:
    """The mean of the layer's output (``stream`` cond) or its MLP's (mlp_out) over the evaluated
    samples when the store does not hold it."""
    from .capture import teacher_forced_streams

    total, count = None, 0
    n_samples = min(store.n_samples, cfg.max_samples or store.n_samples)
    for lo in range(0, n_samples, cfg.batch_size):
        idx = range(lo, min(n_samples, lo + cfg.batch_size))
        acts = teacher_forced_streams(loaded, [store.samples[i]["prompt"] for i in idx],
                                      [store.sample_codes(i) for i in idx], [layer],
                                      [store.samples[i].get("melody_chroma") for i in idx],
                                      store.meta.generation.get("text_length"), mlp=stream != "cond")[stream][layer]
        rows = np.concatenate(acts)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += len(rows)
    return torch.from_numpy((total / count).astype(np.float32))


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(EvaluateConfig, argv, prog="python -m extractor.evaluate",
                    description="Spliced-in evaluation of an SAE inside MusicGen.", run=evaluate)


if __name__ == "__main__":
    main()
