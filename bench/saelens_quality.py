"""SAELens's BatchTopK on ``bench.quality_bench``'s data, scored the same way: the other side of
issue 15's comparison.

Runs in a separate environment that has SAELens (it pins its own torch and transformers):

    python -m venv /tmp/saelens && /tmp/saelens/bin/pip install torch==2.13.0 sae-lens==6.54.0
    PYTHONPATH=. /tmp/saelens/bin/python -m bench.saelens_quality --budget 2000000 --lr 3e-3

The training rows are the quality benchmark's store rows, regenerated in the same order from the
same seeds (so no tensorstore is needed here), and the scores are ``bench.quality_bench``'s on
its held-out rows. SAELens runs with its ``train_toy_sae`` settings (constant learning rate, Adam
0.9/0.999, decoder init norm 0.1, AuxK coefficient 1, running threshold), at the given --lr,
except the dead-latent window: by default the same as our trainer's (10M tokens, at most a tenth
of the run: 49 steps for 2M tokens at batch 4096). ``train_toy_sae``'s 1,000 steps is longer than
such a run, so AuxK never starts and most latents stay dead (FVU 0.236, 77% dead at d = 256);
with 49 this reproduces issue 15's SAELens row (see BENCHMARKS.md "A second data size").
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from . import quality_bench as Q
from .common import RESULTS_DIR


def training_rows(cfg: Q.QualityConfig, truth: Q.Truth, n_rows: int):
    """The rows of ``Q.build_store``'s store for ``n_rows``, in store order, one chunk at a time."""
    n_samples = n_rows // Q.ROWS_PER_SAMPLE
    rng = np.random.default_rng([cfg.data_seed, 1])
    tags_SN = (rng.random((n_samples, cfg.concepts)) < 0.1).astype(np.float32)
    step = Q.CHUNK_ROWS * 16
    for start in range(0, n_samples * Q.ROWS_PER_SAMPLE, step):
        rows = min(step, n_samples * Q.ROWS_PER_SAMPLE - start)
        first = start // Q.ROWS_PER_SAMPLE
        yield Q.make_rows(truth, rows, cfg.noise, rng, tags_SN[first:first + rows // Q.ROWS_PER_SAMPLE])


def train_saelens(cfg: Q.QualityConfig, truth: Q.Truth, budget: int, lr: float, seed: int,
                  dead_feature_window: int = 1000):
    import torch
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    rows = np.concatenate(list(training_rows(cfg, truth, budget)))
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]  # our trainer shuffles too
    steps = len(rows) // cfg.batch_size  # full batches only, as our trainer takes them
    batches = (torch.from_numpy(rows[i * cfg.batch_size:(i + 1) * cfg.batch_size]) for i in range(steps))
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=cfg.d, d_sae=cfg.hidden_dim, k=cfg.top_k,
                                                          device="cpu"))
    trainer_cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=steps * cfg.batch_size,
        device="cpu", autocast=False, lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1,
        train_batch_size_samples=cfg.batch_size, dead_feature_window=dead_feature_window, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1), n_batches_for_norm_estimate=1000)
    started = time.perf_counter()
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches, save_checkpoint_fn=lambda path: None).fit()
    seconds = time.perf_counter() - started
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)  # in place: folds decoder norms, threshold -> JumpReLU
    return {k: v.numpy() for k, v in state.items()}, seconds, steps * cfg.batch_size


def score(weights: dict, truth: Q.Truth, x_ND: np.ndarray) -> dict:
    """``Q.score``'s figures for a JumpReLU SAE (SAELens's inference form of BatchTopK)."""
    W_enc, b_enc, W_dec, b_dec, threshold = (weights[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    sq_err = l0 = 0.0
    fired = np.zeros(W_enc.shape[1], bool)
    for start in range(0, len(x_ND), 8192):
        x = x_ND[start:start + 8192]
        pre = (x - b_dec) @ W_enc + b_enc
        f = np.where(pre > threshold, pre, 0.0)
        sq_err += float(np.sum((f @ W_dec + b_dec - x) ** 2, dtype=np.float64))
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(axis=0)
    cos_F = Q.best_cosines(truth.directions_FD, W_dec)
    p = truth.probabilities_F / truth.probabilities_F.sum()
    return {"fvu": sq_err / float(np.sum((x_ND - x_ND.mean(axis=0)) ** 2, dtype=np.float64)),
            "l0": l0 / len(x_ND), "dead": float(1.0 - fired.mean()), "mmcs": float(cos_F.mean()),
            "mmcs_weighted": float(p @ cos_F), "recovered": float(np.mean(cos_F > Q.RECOVERED_COS))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.saelens_quality", description=__doc__.split("\n")[0])
    for name, default in (("d", 256), ("n_true", 2000), ("hidden_dim", 2048), ("top_k", 16), ("batch_size", 4096),
                          ("budget", 2_000_000), ("seed", 0), ("held_out", 65_536)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dead_feature_window", type=int, default=None,
                        help="steps without firing before SAELens counts a latent dead (and AuxK trains it); default: "
                             "our trainer's rule, 10M tokens capped at a tenth of the run (train_toy_sae uses 1000, "
                             "longer than a 2M-token run at batch 4096)")
    parser.add_argument("--label", default="saelens")
    args = parser.parse_args(argv)
    cfg = replace(Q.QualityConfig(), d=args.d, n_true=args.n_true, hidden_dim=args.hidden_dim, top_k=args.top_k,
                  batch_size=args.batch_size, held_out=args.held_out, types=("batch_topk",))
    truth = Q.make_truth(cfg)
    window = args.dead_feature_window or max(1, -(-min(10_000_000, args.budget // 10) // args.batch_size))
    weights, seconds, tokens = train_saelens(cfg, truth, args.budget, args.lr, args.seed, window)
    row = {"type": "saelens batch_topk", "budget": args.budget, "tokens": tokens, "seed": args.seed, "lr": args.lr,
           "tokens_per_s": tokens / seconds, "seconds": seconds, **score(weights, truth, Q.held_out_rows(cfg, truth))}
    print(json.dumps(row, indent=1))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"saelens_quality-{args.label}.json").write_text(json.dumps({"args": vars(args), "row": row},
                                                                               indent=1))
    return row


if __name__ == "__main__":
    main()
