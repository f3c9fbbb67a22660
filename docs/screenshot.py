"""Screenshot of the search page for docs/service.md: `mocoplus serve` + headless Chromium, one search by upload.

    python docs/screenshot.py --model demo-out/model --index demo-out/corpus/index \
        --query demo-out/query.png --out docs/search-page.png

Needs Debian's chromium and chromium-driver and selenium (`make test` installs them).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--query", required=True, help="an image file to upload")
    parser.add_argument("--out", required=True)
    parser.add_argument("-k", type=int, default=15)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    command = [sys.executable, "-m", "flows.cli", "serve", "--model", args.model, "--index", args.index]
    server = subprocess.Popen([*command, "--port", str(args.port)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,700"):
            options.add_argument(argument)
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "file").is_enabled())
            k = browser.find_element(By.ID, "k")
            k.clear()
            k.send_keys(str(args.k))
            browser.find_element(By.ID, "file").send_keys(str(Path(args.query).resolve()))
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .card.hit")) == args.k)
            loaded = "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)"
            wait.until(lambda b: b.execute_script(loaded))
            browser.save_screenshot(args.out)
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(30)
    print(args.out)


if __name__ == "__main__":
    main()
