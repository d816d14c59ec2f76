"""Sparse probing and absorption on planted data whose answers are known.

The store's samples carry MusicCaps-style tags; each tag adds its own direction to every row of
its samples. Two hand-made SAEs read them: one whose parent ("guitar") latent stays silent on
electric-guitar samples, where a child latent fires instead (absorbed), and one whose parent
latent fires on every guitar (not absorbed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from discovery.real_eval import RealEvalConfig, evaluate, main, output_path
from jax_sae import model as M
from jax_sae.api import SAE
from jax_sae.config import SAEConfig
from sae_core.errors import UsageError

from .synthetic import write_store

D, ROWS = 16, 10
GUITAR, ELECTRIC, ACOUSTIC, PIANO = np.eye(D, dtype=np.float32)[:4]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    rng = np.random.default_rng(0)
    tags, rows = [], []
    for _ in range(600):
        kind = rng.choice(["none", "guitar", "electric guitar", "acoustic guitar"], p=[0.45, 0.2, 0.2, 0.15])
        sample = [] if kind == "none" else [str(kind)]
        signal = {"none": 0, "guitar": GUITAR, "electric guitar": GUITAR + ELECTRIC,
                  "acoustic guitar": GUITAR + ACOUSTIC}[kind]
        if rng.random() < 0.3:
            sample.append("piano")
            signal = signal + PIANO
        tags.append(sample)
        rows.append(signal + 0.1 * rng.normal(size=(ROWS, D)).astype(np.float32))
    path = tmp_path_factory.mktemp("tagged") / "store"
    return write_store(path, np.concatenate(rows), rows_per_sample=ROWS, tags=tags)


def _sae(parent_encoder: np.ndarray) -> SAE:
    """Latents: the parent (guitar), electric guitar (decoding to guitar + electric), acoustic, piano."""
    W_enc = np.stack([parent_encoder, ELECTRIC, ACOUSTIC, PIANO], axis=1)
    W_dec = np.stack([GUITAR, GUITAR + ELECTRIC, ACOUSTIC, PIANO])
    params = M.params_from_named({"W_enc": W_enc, "b_enc": np.full(4, -0.5, np.float32), "W_dec": W_dec,
                                  "b_dec": np.zeros(D, np.float32)})
    return SAE(SAEConfig(sae_type="vanilla", d_model=D, hidden_dim=4, layer=0), params, 0.0, 1.0)


def test_a_child_latent_firing_in_its_parents_place_scores_as_absorbed(tagged):
    cfg = RealEvalConfig(progress=False)
    absorbed = evaluate(_sae(GUITAR - 2 * ELECTRIC), tagged, 0, cfg)["absorption"]["pairs"]
    plain = evaluate(_sae(GUITAR), tagged, 0, cfg)["absorption"]["pairs"]
    electric = {r["child"]: r for r in absorbed}["electric guitar"]
    assert electric["parent_latent"] == 0 and electric["child_latent"] == 1
    assert electric["absorption"] > 0.9 and electric["parent_silent_on_its_own_samples"] < 0.05
    assert {r["child"]: r for r in absorbed}["acoustic guitar"]["absorption"] < 0.05
    assert all(r["absorption"] < 0.05 for r in plain)


def test_a_tag_carried_by_one_latent_is_probed_by_that_latent(tagged):
    probes = evaluate(_sae(GUITAR), tagged, 0, RealEvalConfig(progress=False))["probing"]["tags"]
    piano = probes["piano"]
    assert piano["top1"]["latents"] == [3] and piano["top1"]["f1"] > 0.95 and piano["dense"]["f1"] > 0.95
    assert probes["electric guitar"]["top1"]["latents"] == [1]


def test_the_json_lands_beside_the_checkpoint_and_bad_input_is_one_line(tagged, tmp_path):
    from jax_sae.checkpoint import model_tree, save_model

    sae = _sae(GUITAR)
    save_model(tmp_path / "best", sae.cfg, model_tree(sae.params, np.float32(0), np.float32(1)), {"step": 1})
    main(["--sae_path", str(tmp_path / "best"), "--store", str(tagged.path), "--no-progress"])
    result = json.loads(output_path(tmp_path / "best").read_text())
    assert output_path(tmp_path / "best").name == "best.real_eval.json"
    assert result["probing"]["mean"]["top1"]["f1"] > 0.5 and result["absorption"]["pairs"]
    from discovery.report import _summary_metrics

    shown = dict(_summary_metrics(tmp_path / "best", None, {}))  # the report's header reads it
    assert shown["tag probe F1, top-1 latent"] == result["probing"]["mean"]["top1"]["f1"]
    assert shown["absorption (mean over tag pairs)"] == result["absorption"]["mean"]
    with pytest.raises(SystemExit) as exc:
        main(["--sae_path", str(tmp_path / "best"), "--store", str(tagged.path), "--test_fraction", "1.5"])
    assert "--test_fraction must be in (0, 1)" in str(exc.value)
    with pytest.raises(UsageError, match="no tag of"):
        evaluate(sae, tagged, 0, RealEvalConfig(progress=False, min_positives=600))
