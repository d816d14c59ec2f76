"""Label scores by CLAP on a tiny-random store: each label against its own top clips and random ones."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="CLAP and audio decoding run on the torch side (pip install -e .[torch])")

from . import test_torch_side  # noqa: E402

store = test_torch_side.store  # the module's tiny-random store (4 prompts, 0.6 s), as this module's fixture


def _features(path, tops: dict) -> str:
    path.write_text(json.dumps({key: {"label": label, "top_examples": [{"sample_index": s} for s in samples]}
                                for key, (label, samples) in tops.items()}))
    return str(path)


def test_each_label_is_scored_against_its_clips_and_random_ones(store, tmp_path, capsys):
    from extractor.label_scores import main

    features = _features(tmp_path / "features.json", {"5": ("calm folk guitar", [2, 0]), "6": ("hip hop beat", [3])})
    main(["--features", features, "--store", str(store / "store"), "--model", "tiny-random", "--clap",
          "tiny-random-clap", "--top", "2", "--random", "2", "--device", "cpu", "--no-progress"])
    report = json.loads((tmp_path / "label_scores.json").read_text())
    five, six = report["features"]["5"], report["features"]["6"]
    assert five["top_samples"] == [2, 0] and five["top_clips"] == 2 and five["random_clips"] == 2
    assert six["top_clips"] == 1 and 0.0 <= six["auroc"] <= 1.0
    assert five["gain"] == pytest.approx(five["top"] - five["random"])
    summary = report["summary"]
    assert summary["features"] == 2 and summary["mean_gain"] == pytest.approx((five["gain"] + six["gain"]) / 2)
    assert len(summary["gain_ci95"]) == 2 and "prefer their own clips" in capsys.readouterr().out


def test_labels_without_clips_and_missing_files_are_one_line(store, tmp_path):
    from extractor.label_scores import main

    features = _features(tmp_path / "f.json", {"5": ("calm", [])})
    for args, message in ((["--features", features], "have no top examples with a sample_index"),
                          (["--features", str(tmp_path / "none.json")], "no features file at")):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--store", str(store / "store"), "--model", "tiny-random", "--clap", "tiny-random-clap",
                  "--device", "cpu", "--no-progress"])
        assert message in str(exc.value)
