"""Screenshots of a report's index and one feature page with headless Chromium (for the README):

    python scripts/report_screenshots.py REPORT_DIR [FEATURE] --out docs
    python scripts/report_screenshots.py SWEEP_DIR/sweep.html --out docs   # a sweep's comparison page

Needs chromium, chromedriver and selenium (the dev extra), as the report's browser test does.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("feature", nargs="?", help="feature page to shoot (default: the first)")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--width", type=int, default=1150)
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    if args.report.suffix == ".html":  # one page: a sweep's comparison page
        shots = [(args.report, "sweep-page.png")]
    else:
        feature = args.report / (f"f{args.feature}.html" if args.feature else
                                 sorted(args.report.glob("f*.html"))[0].name)
        shots = [(args.report / "index.html", "report-index.png"), (feature, "report-feature.png")]
    try:
        for page, name in shots:
            driver.set_window_size(args.width, 800)
            driver.get(page.resolve().as_uri())
            time.sleep(1.0)  # images and audio metadata load
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(args.width, min(int(height) + 20, 2600))
            args.out.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out / name))
            print(f"wrote {args.out / name}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
