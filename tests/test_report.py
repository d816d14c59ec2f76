"""The report renders for a tiny run and loads cleanly in headless Chromium."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import jax_sae  # noqa: F401  (JAX side loads first, as in the CLI)
from discovery.discover import FeatureFiles
from discovery.discover import main as discover
from discovery.report import main as report
from sae_core.eval_file import summarize_losses, write_eval
from jax_sae.train import TrainConfig, train

from .test_discovery import planted_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    planted_store(root / "store", n_samples=60, d=64)  # tiny-random's width: output effects go through its heads
    train(TrainConfig.of(sae_type="topk", layer_idx=0, hidden_dim=32, top_k=4, batch_size=256, epochs=2, lr=4e-3,
                      store=str(root / "store"), out=str(root / "models"), progress=False, patience=0))
    features = root / "results" / "features_layer0.json"
    discover(["--sae_path", str(root / "models/topk/layer0/dim32/best"), "--store", str(root / "store"),
              "--output", str(features), "--no_filter", "--max_features", "3", "--examples", "4", "--all",
              "--no-progress"])
    files = FeatureFiles(features)
    found = files.read_features()
    found[next(iter(found))]["label"] = MARKUP  # an LLM's label is text, never markup
    files.write_features(found)
    losses = summarize_losses({"clean": 2.0, "sae": 2.2, "zero": 4.0, "mean": 3.0}, kl=0.1)
    write_eval(root / "eval.json", {"model": "tiny-random", "sae": "s", "store": "st", "layer": 0, "samples": 60,
                                    "stream": "cond", "mean_ablation_from": "st", "predictions": 1, "overall": losses,
                                    "per_codebook": [losses]})
    report(["--features", str(features), "--out", str(root / "report"), "--model", "tiny-random", "--examples", "2",
            "--window", "0.5", "--device", "cpu", "--no-progress", "--eval", str(root / "eval.json"),
            "--steer", "1", "--steer_seconds", "0.5"])
    return root / "report"


MARKUP = "<b>loud</b> & 'bright' guitar"


def test_report_files_are_complete_and_relative(rendered):
    index = (rendered / "index.html").read_text()
    pages = sorted(rendered.glob("f*.html"))
    assert len(pages) == 3 and all(f"href='{p.name}'" in index for p in pages)
    for page in pages:
        text = page.read_text()
        steered = 3 * ("id='steer'" in text)  # --steer 1: the three runs' clips on one page
        assert text.count("<audio") == 2 + steered and text.count("plots/") == 3  # two examples, the histogram
        assert f"src='plots/{page.stem}_hist.png'" in text
        assert "file://" not in text and str(rendered) not in text, "paths must be relative"
        effects = text.split("<table class='effects' id='effects'>")[1].split("</table>")[0]
        assert effects.count("<tr><td>") == 4 and effects.count(": +") == effects.count(": -") == 4 * 8, effects
    soundfile = pytest.importorskip("soundfile", reason="the extract extra (soundfile) is not installed")
    clips = sorted((rendered / "audio").glob("*.ogg"))
    assert len(clips) == 6 and not list((rendered / "audio").glob("*.wav")) and (rendered / "density.png").exists()
    for page in pages:  # each clip is Ogg/Opus that decodes to its example's window, as the page states it
        text = page.read_text()
        windows = [float(b) - float(a) for a, b in re.findall(r"(\d+\.\d+)-(\d+\.\d+) s\)", text)]
        sources = re.findall(r"<audio controls preload='metadata' src='(audio/[^']+\.ogg)'>", text)
        assert len(windows) == len(sources) == 2, text
        for source, seconds in zip(sources, windows):
            audio, rate = soundfile.read(str(rendered / source), dtype="float32")
            assert rate == 48000 and abs(len(audio) / rate - seconds) < 0.015 and np.isfinite(audio).all(), source
    steered = [page for page in pages if "id='steer'" in page.read_text()]
    assert len(steered) == 1, "--steer 1: the first reported feature's page"
    text = steered[0].read_text()
    runs = re.findall(r"<b>(\w+)</b><audio controls preload='metadata' src='(steer/[^']+\.ogg)'></audio>"
                      r"<span class='tags'>feature activation: mean (-?[\d.]+)", text)
    assert [name for name, _, _ in runs] == ["unsteered", "steered", "control"], text
    for _, source, _ in runs:
        audio, rate = soundfile.read(str(rendered / source), dtype="float32")
        assert rate == 48000 and abs(len(audio) / rate - 0.5) < 0.05
    from matplotlib.image import imread

    heights = {imread(plot).shape[0] for plot in (rendered / "plots").glob("*_e*.png")}
    assert heights == {306}, f"each plot is the clip's spectrogram above the activation (3.4 in at 90 dpi): {heights}"


def test_log_mel_puts_a_tone_in_its_band_at_its_time():
    from discovery.plotting import log_mel

    rate = 48000
    t = np.arange(rate) / rate
    audio = np.where(t < 0.5, np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    db, centres = log_mel(audio, rate)
    assert db.shape[0] == len(centres) == 64 and abs(db.shape[1] - 100) <= 2  # 10 ms hops over 1 s
    early, late = db[:, 10:40].mean(axis=1), db[:, 60:90].mean(axis=1)
    assert abs(centres[np.argmax(early)] - 1000) < 150 and abs(centres[np.argmax(late)] - 6000) < 600


def test_report_shows_the_run_the_evaluation_and_escaped_labels(rendered):
    index = (rendered / "index.html").read_text()
    assert "loss recovered (zero abl.): 0.9</span>" in index and "loss recovered (mean abl.): 0.8</span>" in index
    assert "<span>fvu: " in index and "median best tag AUROC: " in index
    escaped = "&lt;b&gt;loud&lt;/b&gt; &amp; &#39;bright&#39; guitar"
    assert MARKUP not in index and escaped in index
    assert any(f"Feature {p.stem[1:]}: {escaped}</h1>" in p.read_text() for p in rendered.glob("f*.html"))


def test_report_loads_in_headless_chromium(rendered):
    if not CHROMIUM or not DRIVER:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    "./test.sh installs them when CI=true)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    check = """
    const done = arguments[arguments.length - 1];
    const audios = [...document.querySelectorAll('audio')];
    const started = Date.now();
    (function poll() {
      const pending = audios.filter(a => a.readyState < 1 && !a.error);
      if (pending.length && Date.now() - started < 15000) { setTimeout(poll, 100); return; }
      done({images: [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]),
            audios: audios.map(a => [a.getAttribute('src'), a.readyState >= 1 && !a.error, a.duration])});
    })();"""
    try:
        driver.set_script_timeout(30)
        for page in [rendered / "index.html", *sorted(rendered.glob("f*.html"))]:
            driver.get(Path(page).as_uri())
            result = driver.execute_async_script(check)
            assert result["images"] and all(ok for _, ok in result["images"]), result["images"]
            assert all(ok and duration > 0 for _, ok, duration in result["audios"]), result["audios"]
            if page.name == "index.html":
                _sort_and_filter(driver)
            else:  # a feature page: the tag bars, and each example's audio beside its spectrogram plot
                assert driver.find_elements("css selector", "#aligned .bar") or "Aligned tags</h2>\n<p>-" in \
                    driver.page_source
                assert len(driver.find_elements("css selector", ".ex audio")) == len(
                    driver.find_elements("css selector", ".ex img[src^='plots/']")) == 2
                assert len(driver.find_elements("css selector", "img.hist")) == 1  # the activation histogram
                assert len(driver.find_elements("css selector", "#effects tbody tr")) == 4  # one row per codebook
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        driver.quit()


VISIBLE = "return [...document.querySelectorAll('#features tbody tr')].filter(r => r.style.display !== 'none')"


def _sort_and_filter(driver):
    """Sort by a column; filter by a word of a label, then by an aligned tag; the count follows."""
    from selenium.webdriver.support.ui import Select

    driver.find_elements("css selector", "th")[2].click()
    frequencies = driver.execute_script(VISIBLE + ".map(r => parseFloat(r.cells[2].dataset.v))")
    assert len(frequencies) == 3 and frequencies == sorted(frequencies)
    driver.find_element("id", "filter").send_keys("bright")
    texts = driver.execute_script(VISIBLE + ".map(r => r.dataset.text)")
    assert texts and all("bright" in t for t in texts) and len(texts) < 3, texts
    assert driver.find_element("id", "shown").text == f"{len(texts)} of 3 features"
    driver.execute_script("const f = document.getElementById('filter'); f.value = '';"
                          "f.dispatchEvent(new Event('input'));")
    choice = Select(driver.find_element("id", "tag"))
    tag = choice.options[1].get_attribute("value")
    choice.select_by_index(1)
    tagged = driver.execute_script(VISIBLE + ".map(r => r.dataset.tags.split('|'))")
    assert tagged and all(tag in tags for tags in tagged), (tag, tagged)


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_skips_finished_stages(tmp_path):
    from launch.pipeline import main as pipeline

    argv = ["--out", str(tmp_path / "demo"), "--duration", "0.4", "--epochs", "2", "--train_batch_size", "128",
            "--max_features", "3", "--device", "cpu", "--hidden_dim", "64", "--top_k", "4"]
    index = pipeline(argv)
    assert index.exists()
    before = {p: p.stat().st_mtime for p in (tmp_path / "demo").rglob("*.json") if p.name != "pipeline.json"}
    pipeline(argv)
    assert {p: p.stat().st_mtime for p in before} == before, "a rerun redoes nothing"


def test_pipeline_rejects_unknown_stages():
    from launch.pipeline import PipelineConfig, PipelineError

    with pytest.raises(PipelineError, match="unknown stage"):
        PipelineConfig(stages="extract,listen")


@pytest.mark.slow  # two trainings and two discoveries; the single-layer report is tested by default
def test_several_layers_make_one_report_with_linked_page_sets(tmp_path):
    """--features of two layers: report/layer{N}/ for each, an index of the layers, and every page of
    a layer linking the other layer's index."""
    from tests.synthetic import planted_dictionary, sparse_data, write_store

    found = []
    for layer in (2, 5):
        store = tmp_path / f"store{layer}"
        write_store(store, sparse_data(planted_dictionary(16, 24, layer), 1200, 3, 0.05, layer), layer=layer)
        train(TrainConfig.of(sae_type="topk", layer_idx=layer, hidden_dim=24, top_k=3, batch_size=200, epochs=1, lr=4e-3,
                          store=str(store), out=str(tmp_path / "models"), progress=False, patience=0))
        found.append(tmp_path / f"features_layer{layer}.json")
        discover(["--sae_path", str(tmp_path / f"models/topk/layer{layer}/dim24/best"), "--store", str(store),
                  "--output", str(found[-1]), "--no_filter", "--max_features", "2", "--examples", "2",
                  "--no-progress"])
    report(["--features", *map(str, found), "--out", str(tmp_path / "report"), "--no-audio", "--no-progress"])
    index = (tmp_path / "report" / "index.html").read_text()
    assert "href='layer2/index.html'" in index and "href='layer5/index.html'" in index
    for layer, other in ((2, 5), (5, 2)):
        pages = sorted((tmp_path / "report" / f"layer{layer}").glob("*.html"))
        assert len(pages) == 3  # the layer's index and its two features
        for page in pages:
            text = page.read_text()
            assert f"<a href='../layer{other}/index.html'>{other}</a>" in text and f"<b>{layer}</b>" in text, page
