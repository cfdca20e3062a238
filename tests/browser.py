"""Driving the playground in the headless Chromium of the ``browser`` fixture (conftest.py)."""

from __future__ import annotations


def wait_for(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def shown_images(driver) -> list[dict]:
    """The result images that have loaded, with their natural width and source scheme."""
    return driver.execute_script(
        """return [...document.querySelectorAll('#out img[data-testid="result-image"]')]
             .map((img) => ({alt: img.alt, width: img.naturalWidth, complete: img.complete,
                             scheme: img.src.split(':')[0]}));"""
    )


def run_and_wait(driver, button: str, count: int) -> list[dict]:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, button).click()
    wait_for(driver, lambda d: d.find_element(By.ID, "out").get_attribute("data-state") == "done")
    status = driver.find_element(By.ID, "status").text
    assert status == "", f"the page reported an error: {status}"
    wait_for(driver, lambda d: all(i["complete"] for i in shown_images(d)), timeout=30)
    images = shown_images(driver)
    assert len(images) == count, images
    assert all(i["width"] > 0 and i["scheme"] in ("data", "blob") for i in images), images
    return images
