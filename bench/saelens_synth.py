"""SAELens's own SynthSAEBench generator and metrics, measured the way ``bench.synthbench
--generator`` measures ours: the other side of the generator check of issue 26.

Runs in a separate environment that has SAELens (it pins its own torch), and reads the
configuration from our side's results, so both build the same process:

    python -m bench.synthbench --generator --model synthsaebench-4k       # ours; writes the config
    python -m venv /tmp/saelens && /tmp/saelens/bin/pip install torch==2.13.0 sae-lens==6.54.12
    PYTHONPATH=. /tmp/saelens/bin/python -m bench.saelens_synth \\
        --ours bench/results/synthbench_generator-synthsaebench-4k.json
    python -m bench.synthbench --compare bench/results/saelens_synth-synthsaebench-4k.json --model synthsaebench-4k

With ``--train TYPE`` it trains one SAE with SAELens's ``SyntheticSAERunner`` instead and saves its
evaluation arrays for ``bench.synthbench --saelens_runs``. ``--our_dictionary`` builds SAELens's
model on our cached directions and bias (the file ``--ours`` names) and skips its
orthogonalisation, which takes about 2 hours for the 16k model on 2 cores; firing, hierarchy,
correlation and magnitudes are still drawn by SAELens's code:

    PYTHONPATH=. /tmp/saelens/bin/python -m bench.saelens_synth --our_dictionary --train batch_topk \\
        --ours bench/results/synthbench_generator-synthsaebench-16k.json --hidden_dim 4096 --top_k 25 \\
        --samples 1000000 --lr 3e-3 --dead_window 100

Statistics mode writes (1) the generator statistics (true L0, each hierarchy level's firing over
its Zipfian target, children firing without their parent or beside a sibling, firing by frequency decile,
overlap of the directions), computed with the same definitions as ours; (2) SAELens's scores of a
fixed SAE built from the true directions (decoder: the first H directions, encoder their transpose,
top-k), which ours must match within sampling noise on our own generator; and (3) an ``.npz`` of
samples, that SAE's latents and reconstructions and the dictionary, with SAELens's metrics on
exactly those arrays, which ours must reproduce to float precision. Imports nothing of this project
(its environment has no JAX)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build(synth: dict, dictionary: str = ""):
    """SAELens's model of ``synth``; with ``dictionary`` (our cached model's ``.npz``), our directions
    and bias instead of its own orthogonalisation (the 16k model's takes about 2 hours on 2 cores):
    the sampling (Zipfian firing, hierarchy, correlation, magnitudes) stays SAELens's."""
    import torch

    if dictionary:
        synth = {**synth, "ortho_steps": 0}
    model = _build(synth)
    if dictionary:
        with np.load(dictionary) as ours:
            directions, bias = ours["directions"], ours["bias"]
        if directions.shape != tuple(model.feature_dict.feature_vectors.shape):
            fail(f"{dictionary} holds {directions.shape} directions and the model "
                 f"{tuple(model.feature_dict.feature_vectors.shape)}; pass the --ours file of the same model")
        with torch.no_grad():
            model.feature_dict.feature_vectors.copy_(torch.from_numpy(directions))
            model.feature_dict.bias.copy_(torch.from_numpy(bias))
    return model


def _build(synth: dict):
    from sae_lens.synthetic.firing_magnitudes import FoldedNormalMagnitudeConfig, LinearMagnitudeConfig
    from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
    from sae_lens.synthetic.hierarchy.config import HierarchyConfig
    from sae_lens.synthetic.synthetic_model import (
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModel,
        SyntheticModelConfig,
    )

    cfg = SyntheticModelConfig(
        num_features=synth["n_features"], hidden_dim=synth["d_model"],
        firing_probability=ZipfianFiringProbabilityConfig(exponent=synth["zipf_exponent"], max_prob=synth["p_max"],
                                                          min_prob=synth["p_min"]),
        hierarchy=HierarchyConfig(total_root_nodes=synth["roots"], branching_factor=synth["branching"],
                                  max_depth=synth["depth"], mutually_exclusive_portion=1.0,
                                  compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=OrthogonalizationConfig(num_steps=synth["ortho_steps"], lr=synth["ortho_lr"]),
        correlation=LowRankCorrelationConfig(rank=synth["corr_rank"], correlation_scale=synth["corr_scale"]),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=synth["mean_first"], end=synth["mean_last"]),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=synth["std_mean"], std=synth["std_std"]),
        bias=synth["bias_norm"], seed=synth["seed"])
    return SyntheticModel(cfg)


def level_starts(synth: dict) -> list[int]:
    starts, start = [], 0
    for level in range(synth["depth"] + 1):
        starts.append(start)
        start += synth["roots"] * synth["branching"] ** level
    return starts + [start]


def zipf(synth: dict) -> np.ndarray:
    q = np.arange(1, synth["n_features"] + 1, dtype=np.float64) ** -synth["zipf_exponent"]
    return synth["p_min"] + (synth["p_max"] - synth["p_min"]) * (q - q[-1]) / (q[0] - q[-1])


def generator_stats(model, synth: dict, n_samples: int, batch: int) -> dict:
    """The same figures as ``jax_sae.synthetic.metrics.generator_stats``, on SAELens's generator, with
    the trees laid out breadth-first over consecutive features (orphans > 0 would say otherwise)."""
    import torch

    n, starts, b = synth["n_features"], level_starts(synth), synth["branching"]
    parent = np.full(n, -1)
    for level in range(1, synth["depth"] + 1):
        children = np.arange(starts[level], starts[level + 1])
        parent[children] = starts[level - 1] + (children - starts[level]) // b
    has_parent = parent >= 0
    count, orphans, crowded, drawn = np.zeros(n), 0, 0, 0
    while drawn < n_samples:
        fires = (model.activation_generator.sample(batch) > 0).cpu().numpy()
        count += fires.sum(axis=0)
        orphans += int(np.sum(fires[:, has_parent] & ~fires[:, parent[has_parent]]))
        tree = fires[:, starts[1]:starts[-1]]
        crowded += int(np.sum(tree.reshape(batch, -1, b).sum(axis=2) > 1))
        drawn += batch
    rate, target = count / drawn, zipf(synth)
    levels = {f"level {lv}": float(rate[starts[lv]:starts[lv + 1]].sum() / target[starts[lv]:starts[lv + 1]].sum())
              for lv in range(synth["depth"] + 1)}
    if starts[-1] < n:
        levels["outside the trees"] = float(rate[starts[-1]:].sum() / target[starts[-1]:].sum())
    E = model.feature_dict.feature_vectors.detach().double()
    cos = (E @ E.T).abs().numpy()
    np.fill_diagonal(cos, 0.0)
    del torch
    return {"samples": drawn, "true_l0": float(rate.sum()), "true_l0_top_quarter": float(rate[: n // 4].sum()),
            "realised_over_zipf": levels, "rate_by_decile": [float(rate[i].mean()) for i in np.array_split(np.arange(n), 10)],
            "children_without_parent": orphans, "families_with_two_children": crowded,
            "mean_max_cos": float(cos.max(axis=1).mean()), "mean_abs_cos": float(cos.sum() / (n * (n - 1)))}


def fixed_sae(model, hidden: int, k: int):
    """A TopK SAE reading the ``hidden`` most frequent features by their own directions."""
    import torch
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    E = model.feature_dict.feature_vectors.detach()[:hidden].float()
    sae = TopKSAE(TopKSAEConfig(d_in=E.shape[1], d_sae=hidden, k=k, device="cpu"))
    with torch.no_grad():
        sae.W_enc.copy_(E.T)
        sae.W_dec.copy_(E)
        sae.b_enc.zero_()
        sae.b_dec.copy_(model.feature_dict.bias.detach().float())
    return sae


class Replay:
    """An activation generator that hands out saved true activations, in order."""

    def __init__(self, acts):
        self.acts, self.at = acts, 0

    def sample(self, batch_size: int):
        out = self.acts[self.at:self.at + batch_size]
        self.at += batch_size
        return out


def scores(result) -> dict:
    out = {k: v for k, v in dataclasses.asdict(result).items() if not isinstance(v, dict)}
    out.update({k: v for k, v in dataclasses.asdict(result).get("classification", {}).items()
                if isinstance(v, (int, float))})
    return out


def cached_model(synth: dict, name: str, dictionary: str = ""):
    """SAELens's model of ``synth``, built once and kept under /tmp (the 16k build takes hours on a CPU)."""
    import hashlib

    from sae_lens.synthetic.synthetic_model import SyntheticModel

    key = hashlib.sha256(json.dumps([synth, Path(dictionary).name], sort_keys=True).encode()).hexdigest()[:8]
    path = Path("/tmp/saelens-synthetic") / f"{name}-{key}"
    if path.exists():
        return SyntheticModel.load_from_disk(path), 0.0
    started = time.perf_counter()
    model = build(synth, dictionary)
    seconds = time.perf_counter() - started
    model.save(path)
    return model, seconds


def train(args, synth: dict, name: str) -> None:
    """Train one SAE with SAELens's SyntheticSAERunner, then save its evaluation arrays (sparse true
    activations and latents, inputs and reconstructions) for our metric code to score."""
    import torch
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.synthetic.evals import eval_sae_on_synthetic_data
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

    torch.manual_seed(args.seed)
    model, built = cached_model(synth, name, args.dictionary)
    d, h = synth["d_model"], args.hidden_dim
    if args.train == "matryoshka":  # the benchmark's levels (128, 512, 2048 of 4096), scaled to the width
        widths = [h // 32, h // 8, h // 2]
        sae = MatryoshkaBatchTopKTrainingSAEConfig(d_in=d, d_sae=h, k=args.top_k, matryoshka_widths=widths,
                                                   use_matryoshka_aux_loss=True, device="cpu")
    else:
        sae = BatchTopKTrainingSAEConfig(d_in=d, d_sae=h, k=args.top_k, device="cpu")
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=model.cfg, sae=sae, training_samples=args.samples, batch_size=args.batch_size, lr=args.lr,
        dead_feature_window=args.dead_window, eval_samples=0, run_final_eval=False, output_path=None,
        checkpoint_path=None, logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
    started = time.perf_counter()
    trained = SyntheticSAERunner(runner_cfg, override_synthetic_model=model).run().sae
    seconds = time.perf_counter() - started
    trained.eval()
    acts = torch.cat([model.activation_generator.sample(1024) for _ in range(-(-args.eval_samples // 1024))])
    theirs = scores(eval_sae_on_synthetic_data(trained, model.feature_dict, Replay(acts), num_samples=len(acts),
                                               batch_size=1024))
    xs, fs, hats = [], [], []
    with torch.no_grad():
        for i in range(0, len(acts), 1024):
            x = model.feature_dict(acts[i:i + 1024])
            f = trained.encode(x)
            xs.append(x.numpy()), fs.append(f.to_sparse_coo()), hats.append(trained.decode(f).numpy())
    f = torch.cat(fs).coalesce()
    a = acts.to_sparse_coo().coalesce()
    label = f"saelens-{args.train}-{name}-{args.samples}-lr{args.lr:g}-w{args.dead_window}-s{args.seed}"
    label += "-our_dictionary" if args.dictionary else ""
    arrays = RESULTS / f"{label}.npz"
    np.savez(arrays, x=np.concatenate(xs), x_hat=np.concatenate(hats), f_index=f.indices().numpy(),
             f_value=f.values().numpy(), a_index=a.indices().numpy(), a_value=a.values().numpy(),
             shape=np.array([len(acts), synth["n_features"], h]), W_dec=trained.W_dec.detach().numpy(),
             directions=model.feature_dict.feature_vectors.detach().numpy())
    out = {"sae_lens": __import__("importlib.metadata").metadata.version("sae-lens"), "model": name, "type": args.train,
           "samples": args.samples, "lr": args.lr, "dead_window": args.dead_window, "batch_size": args.batch_size,
           "hidden_dim": h, "top_k": args.top_k, "seed": args.seed, "train_seconds": seconds,
           "model_build_seconds": built, "dictionary": args.dictionary or "SAELens's own",
           "saelens_scores": theirs, "arrays": arrays.name}
    (RESULTS / f"{label}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.saelens_synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", required=True, help="our side's results (bench.synthbench --generator)")
    parser.add_argument("--arrays", type=int, default=8192, help="samples saved for the metric-on-the-same-arrays check")
    parser.add_argument("--hidden_dim", type=int, default=1024)
    parser.add_argument("--top_k", type=int, default=12)
    parser.add_argument("--train", choices=("batch_topk", "matryoshka"), help="train this type with SAELens's runner")
    parser.add_argument("--samples", type=int, default=100_000, help="training samples (--train), else statistics")
    parser.add_argument("--eval_samples", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--dead_window", type=int, default=1000, help="SAELens's dead_feature_window (steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--our_dictionary", action="store_true",
                        help="train on our cached directions and bias (the dictionary --ours names), sampled by SAELens")
    args = parser.parse_args(argv)
    if not Path(args.ours).is_file():
        fail(f"--ours {args.ours} does not exist; write it with python -m bench.synthbench --generator --model NAME")
    ours = json.loads(Path(args.ours).read_text())
    synth, name = ours["synthetic"], ours["config"]["model"]
    args.dictionary = ours.get("dictionary", "") if args.our_dictionary else ""
    if args.our_dictionary and not Path(args.dictionary).is_file():
        fail(f"--our_dictionary: {args.ours} names no dictionary file that exists ({args.dictionary or 'none'}); "
             "rerun bench.synthbench for this model first")
    if args.train:
        return train(args, synth, name)
    import torch
    from sae_lens.synthetic.evals import eval_sae_on_synthetic_data

    torch.manual_seed(0)
    started = time.perf_counter()
    model = build(synth)
    built = time.perf_counter() - started
    stats = generator_stats(model, synth, args.samples, 1024)
    sae = fixed_sae(model, args.hidden_dim, args.top_k)
    on_generator = scores(eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator,
                                                     num_samples=args.samples, batch_size=1024))
    acts = model.activation_generator.sample(args.arrays)
    on_arrays = scores(eval_sae_on_synthetic_data(sae, model.feature_dict, Replay(acts), num_samples=args.arrays,
                                                  batch_size=1024))
    with torch.no_grad():
        x = model.feature_dict(acts)
        f = sae.encode(x)
        x_hat = sae.decode(f)
    arrays = RESULTS / f"saelens_synth-{name}.npz"
    np.savez_compressed(arrays, x=x.numpy(), a=acts.numpy(), f=f.numpy(), x_hat=x_hat.numpy(),
                        W_dec=sae.W_dec.detach().numpy(), directions=model.feature_dict.feature_vectors.detach().numpy())
    import importlib.metadata

    out = {"sae_lens": importlib.metadata.version("sae-lens"), "synthetic": synth, "model": name,
           "build_seconds": built, "generator": stats, "fixed_sae": {"hidden_dim": args.hidden_dim, "top_k": args.top_k,
                                                                      "scores": on_generator},
           "arrays": {"file": arrays.name, "samples": args.arrays, "scores": on_arrays}}
    path = RESULTS / f"saelens_synth-{name}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    print(f"wrote {path} and {arrays}")


if __name__ == "__main__":
    main()
