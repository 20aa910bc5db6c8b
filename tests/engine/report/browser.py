"""A headless Chromium for the report tests, or the reason there is none.

Only the Debian packages are used (``apt-get install chromium chromium-driver``) and the driver is
named explicitly, so Selenium never tries to download a browser or a driver at run time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> tuple[str, str] | str:
    """(browser, chromedriver) paths, or a one-line reason why the browser tests cannot run."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    browser = next((p for name in BROWSERS if (p := shutil.which(name))), None)
    if browser is None:
        return "no Chromium (apt-get install -y chromium chromium-driver)"
    driver = shutil.which("chromedriver")
    if driver is None:
        return "no chromedriver (apt-get install -y chromium-driver)"
    return browser, driver


def start_chromium(browser: str, driver: str, *, width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium with its console log kept (``goog:loggingPrefs``), for ``get_log("browser")``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def open_report(drv: Any, path: Path, timeout: float = 60.0) -> None:
    """Load ``path`` from ``file://`` and wait until the table script has run (``body[data-ready]``)."""
    from selenium.webdriver.support.ui import WebDriverWait

    drv.get(path.resolve().as_uri())
    WebDriverWait(drv, timeout).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def console_errors(drv: Any) -> list[dict]:
    """Console entries at SEVERE level since the last call (the log is drained by reading it)."""
    return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
