"""The README's pictures: the plots of a ``cliptuner demo`` run, and the search page on that demo's workspace.

    cliptuner demo --workdir /tmp/demo-readme                  # writes /tmp/demo-readme/plots/*.png
    python docs/make_images.py --demo /tmp/demo-readme         # → docs/img/{training,recall,matches,page}.png

The page picture: ``cliptuner serve --http-port`` on the demo's workspace (its tuned version and its indexed
gallery), the page opened in headless Chromium (Playwright driving the system ``chromium``), one of the demo's
queries searched, the page saved as a PNG.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="the --workdir of a finished cliptuner demo run")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from cliptuner.serve.launch import ServeProcess, free_port

    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("training.png", "recall.png", "matches.png"):
        shutil.copyfile(demo / "plots" / name, out / name)
    query = json.loads((demo / "demo.json").read_text())["queries"][0]
    port = free_port()
    with ServeProcess(
        demo / "workspace", demo / "page-service.log", env={"CLIPTUNER_DEVICE": "cpu"}, args=["--http-port", str(port)]
    ):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#query", query)
            page.click("#search")
            page.locator("#results .card").nth(4).wait_for()
            page.wait_for_function(
                "[...document.querySelectorAll('#results .card img')]"
                ".every(img => img.complete && img.naturalWidth > 0)"
            )
            page.screenshot(path=str(out / "page.png"), full_page=True)
            browser.close()
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.png')))} in {out}")


if __name__ == "__main__":
    main()
