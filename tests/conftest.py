"""Suite-wide rule: under CI (``CI=true``) a skip is a failure.

A broken install must turn the run red, never into skips. Only tests marked ``gpu`` (they need
hardware CI does not have) may skip there; the README lists what may skip elsewhere and why.
"""

from __future__ import annotations

import os
import platform
import shutil

import pytest

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if ON_CI and report.skipped and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing the suite needs may skip: {reason}"


@pytest.fixture(scope="module")
def s3():
    """A local S3-compatible server over real HTTP (moto), one per test module. Start it
    before Ray: it puts test credentials into the environment that Ray's workers inherit."""
    from selma_ray.testing import LocalS3

    server = LocalS3().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module, as a Ray Train worker with a fractional CPU has;
    spinning threads crawl on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # the `browser` fixture's


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        why = (
            f"{missing} not installed on {platform.platform()}: `bash scripts/setup_browser.sh` "
            "installs Debian's chromium and chromium-driver (make test runs it; needs root)"
        )
        if ON_CI:
            pytest.fail(f"CI needs the browser: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
