"""The study in one command on tiny-random with tiny-random-clap: every stage, the page, and a
rerun that redoes only what is missing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="the study extracts, labels and steers on the torch side")

PROMPTS = ["a slow sad jazz piano", "fast energetic rock drums", "calm folk guitar", "hip hop beat",
           "ambient synth pad", "a string quartet", "reggae bass line", "techno with a driving kick"]


def _args(root, *extra):
    return ["--model", "tiny-random", "--layers", "2", "--prompt_file", str(root / "p.txt"), "--duration", "0.5",
            "--expansions", "4", "--top_ks", "4", "--epochs", "2", "--train_batch_size", "64",
            "--max_features", "8", "--steer_features", "2", "--strengths", "1", "--seeds", "2", "--controls", "3",
            "--steer_duration", "0.3", "--clap", "tiny-random-clap", "--label_random", "3", "--out",
            str(root / "study"), "--device", "cpu", *extra]


def test_the_study_runs_end_to_end_and_resumes(tmp_path, capfd):
    from launch.study import main

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    page = main(_args(tmp_path))
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    rows = study["members"]
    assert [(r["layer"], r["top_k"], r["hidden_dim"]) for r in rows] == [(2, 4, 256)]
    for r in rows:
        assert r["kept"] is not None and r["kept"] + r["never"] + r["rare"] + r["common"] == 256
        assert r["label_gain"] is not None and r["files"]["labels"]
        if r["steerable"]:  # steered when some reported feature passes the 1-25% filter
            assert r["steerable"]["of"] <= 2 and r["files"]["steering"]
            assert r["steerable_to_clips"]["of"] == r["steerable"]["of"], "also judged against the top clips' audio"
            assert r["steerable_by_probe"]["of"] <= r["steerable"]["of"], "and by tag probes, where a tag aligns"
    assert study["per_layer"][0]["layer"] == 2
    html = page.read_text()
    assert "study-trends.png" in html and 'href="features/' in html and 'href="labels/' in html
    assert (tmp_path / "study" / "study-trends.png").stat().st_size > 1000
    capfd.readouterr()

    (tmp_path / "study" / "labels" / f"{rows[0]['member']}.json").unlink()  # the member's labels lost
    main(_args(tmp_path))
    out = capfd.readouterr().out
    assert "[extract] done already" in out and "[sweep] done already" in out
    ran = [line for line in out.splitlines() if line.startswith("[") and "python -m" in line]
    assert len(ran) == 1 and "extractor.label_scores" in ran[0] and rows[0]["member"] in ran[0]


def test_plan_prints_the_work_without_running_it(tmp_path, capsys):
    from launch.study import main

    work = main(["--model", "facebook/musicgen-small", "--layers", "2,6,12,18,22", "--duration", "10", "--plan",
                 "--out", str(tmp_path / "s")])
    assert work["saes"] == 20 and work["latents"] == [4096, 32768] and work["prompts"] == 48
    assert "20 TopK SAEs" in capsys.readouterr().out and not (tmp_path / "s").exists()
    for model, layers, message in (("facebook/musicgen-small", "2,30", "has 24 decoder layers (0-23)"),
                                   ("random:musicgen-large:4", "2,12", "has 4 decoder layers"),
                                   ("tiny-random", "4", "has 4 decoder layers")):
        with pytest.raises(SystemExit) as exc:
            main(["--model", model, "--layers", layers, "--out", str(tmp_path / "s")])
        assert message in str(exc.value) and not (tmp_path / "s").exists()


def test_plan_timing_scales_the_timed_steps_to_the_study(tmp_path, monkeypatch, capsys):
    """--plan_timing: the measured seconds (here given) scaled to the study's batches, steps and members."""
    from launch import study_timing
    from launch.study import main

    gen = {"device": "cuda", "family": "musicgen-small", "max_delay": 3,
           "batches": {b: {"1": {"per_step": 0.010, "fixed": 0.5}, "3": {"per_step": 0.014, "fixed": 0.6}}
                       for b in ("8", "16")}}
    train = {"device": "gpu", "batch": 512, "per_step": {"4096x32": 0.01, "4096x100": 0.02},
             "compile": {"4096x32": 3.0, "4096x100": 4.0}}
    monkeypatch.setattr(study_timing, "_child", lambda args: gen if args[0] == "generate" else train)
    work = main(["--model", "facebook/musicgen-small", "--layers", "6,12", "--expansions", "4", "--duration", "10",
                 "--plan", "--plan_timing", "--out", str(tmp_path / "s")])
    per_step = 0.010 + 0.002 * 23  # one layer, plus 23 more at 2 ms each
    assert work["hours"]["extract"] * 3600 == pytest.approx(6 * (0.6 + 503 * per_step))  # 48 prompts, 8 at a time
    steps = -(-work["rows_per_layer"] * 10 // 512)
    assert work["hours"]["sweep"] * 3600 == pytest.approx(2 * (steps * (0.01 + 0.02) + 3.0 + 4.0))
    batches = -(-(1 + (20 + 8) * 2) // 16)  # per seed: unsteered, 20 features and 8 controls at 2 strengths
    assert batches == 4 and work["hours"]["steer"] * 3600 == pytest.approx(4 * 6 * batches * (0.6 + 253 * per_step))
    assert "time here (torch on cuda, JAX on gpu)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-random", "--plan", "--plan_timing", "--out", str(tmp_path / "s")])
    assert "times the released families" in str(exc.value)


@pytest.mark.slow
def test_plan_timing_times_this_machine(tmp_path):
    """The real timing, at musicgen-small's widths on this machine (a small grid)."""
    from launch.study import main

    work = main(["--model", "facebook/musicgen-small", "--layers", "6", "--expansions", "2", "--top_ks", "16",
                 "--plan", "--plan_timing", "--out", str(tmp_path / "s")])
    assert all(0 < work["hours"][stage] < 1e4 for stage in ("extract", "sweep", "steer"))
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit) as exc:  # the child's error, in one line
            main(["--model", "facebook/musicgen-small", "--layers", "6", "--expansions", "2", "--top_ks", "16",
                  "--device", "cuda", "--plan", "--plan_timing", "--out", str(tmp_path / "s")])
        assert "timing generate failed: --device cuda was requested" in str(exc.value)


@pytest.mark.slow
def test_the_study_on_musicgen_small_widths(tmp_path):
    """random:musicgen-small:2 (musicgen-small's widths, 2 layers, random weights): the numbers mean
    nothing, every path is real, at the real width of 1,024."""
    from launch.study import main

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    args = _args(tmp_path)
    args[args.index("tiny-random")] = "random:musicgen-small:2"
    args[args.index("--layers") + 1] = "1"
    args[args.index("--top_ks") + 1] = "16"
    main(args)
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    (row,) = study["members"]
    assert (row["layer"], row["top_k"], row["hidden_dim"]) == (1, 16, 4096)
    assert row["kept"] + row["never"] + row["rare"] + row["common"] == 4096
    assert row["label_gain"] is not None or json.loads(open(row["files"]["labels"]).read())["skipped"]
