"""The chat app (:mod:`dpo_lib.deploy.app`) started with its one command and used from a real browser.

Notebook 08 shows the app answering in headless Chromium, and the tests check the same path:
:func:`serve_app` starts ``dpo-app MODEL.gguf`` on a free local port and waits
until it answers; :func:`ask_in_browser` types a question into the page with selenium, waits for
the streamed answer and saves a screenshot. Chromium and its driver come from Debian's
``chromium`` and ``chromium-driver`` packages (:func:`chromium` says whether they are there).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def chromium() -> tuple[str, str] | None:
    """``(browser, driver)`` paths of Debian's chromium and chromedriver, or None."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(model: str | os.PathLike, timeout: float = 60.0):
    """Run the app on ``model`` (a GGUF) on a free port of 127.0.0.1; yields its URL and stops
    it on exit. A clear ``RuntimeError`` when it exits or does not answer within ``timeout``."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dpo_lib.deploy.app", str(model), "--port",
                                str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited:\n{process.stdout.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not answer on {url} within {timeout:.0f} s")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def ask_in_browser(url: str, question: str, screenshot: str | os.PathLike,
                   timeout: float = 90.0) -> str:
    """Type ``question`` into the app at ``url`` in headless Chromium, wait for the whole
    streamed answer, save a screenshot to ``screenshot`` and return the answer's text."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    found = chromium()
    if found is None:
        from ..core.errors import MissingPackageError

        raise MissingPackageError("needs Debian's chromium and chromium-driver "
                                "(apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--window-size=1000,820"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        browser.get(url)
        box = WebDriverWait(browser, 30).until(
            lambda b: b.find_element(By.CSS_SELECTOR, "textarea"))
        box.send_keys(question)
        box.send_keys(Keys.ENTER)

        def answer(b):
            bots = [e.text for e in b.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")]
            return bots[-1].strip() if bots and bots[-1].strip() else None

        WebDriverWait(browser, timeout).until(answer)
        text, stable = answer(browser), 0
        while stable < 4:                   # the stream has ended when the text stops changing
            time.sleep(0.5)
            now = answer(browser)
            stable, text = (stable + 1, text) if now == text else (0, now)
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(screenshot))
        return text
    finally:
        browser.quit()
