"""The Studio end to end in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Open the page, upload a photo, edit the caption, start, wait for the result (live preview and stage-1 image
shown), move the slider, zoom, save, then check the saved file, its size and its provenance; drop a second photo,
see the same list and queue in a second tab; a traversal name is refused; a token-less request gets 403.
SUPIR_STUDIO_SCREENSHOT=path also writes the screenshot there (docs/studio.png is made that way).
"""

import os
import shutil
import tempfile
import time

import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the studio extra is part of the test extra")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from studio_helpers import chart, request, running_studio, wait_for  # noqa: E402

from supir_mlx.io.metadata import read_provenance  # noqa: E402

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Skipped on a developer machine without the browser; in CI (.ci/run installs it) a missing browser fails.
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)) and not os.environ.get("CI"),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="studio-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1440,1200", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    # The driver path is given, so Selenium never looks for (or downloads) a driver or a browser. Chromium must not
    # inherit the OpenBLAS preload the tests run under: its GPU process dies with it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER, env=env))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_restore_in_a_real_browser(browser, tiny_weights, tmp_path):
    from supir_mlx import Restorer

    photo = chart(tmp_path / "grandma.png", (48, 32))
    out = tmp_path / "out"
    with running_studio(lambda: Restorer.from_weights(tiny_weights), out, tmp_path / "work") as (studio, server):
        wait = WebDriverWait(browser, 120)

        def until(what, condition):
            return wait.until(condition, f"timed out waiting for {what}")

        browser.get(server.url)
        until("the model", EC.text_to_be_present_in_element((By.ID, "model-status"), "model ready"))

        browser.find_element(By.ID, "picker").send_keys(str(photo))
        until("the photo", EC.text_to_be_present_in_element((By.ID, "photo-name"), "grandma.png"))
        until("the estimate", EC.text_to_be_present_in_element((By.ID, "estimate"), "Estimated time"))
        assert "Memory plan for a" in browser.find_element(By.ID, "plan").get_attribute("textContent")

        caption = browser.find_element(By.ID, "caption")
        caption.clear()
        caption.send_keys("my grandmother in her garden, 1950s")
        browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        for name, value in (("upscale", "2"), ("steps", "2"), ("min_size", "64")):
            box = browser.find_element(By.NAME, name)
            box.clear()
            box.send_keys(value, Keys.TAB)
        browser.find_element(By.ID, "start").click()

        until("the result", EC.visibility_of_element_located((By.ID, "result")))
        until("the result image", lambda d: d.execute_script("return document.getElementById('after').naturalWidth") == 96)
        assert "done in" in browser.find_element(By.ID, "progress-text").text
        # the live preview (latent projected to RGB) and the stage-1 image are on the page
        for image in ("preview", "stage1"):
            until(image, lambda d, image=image: d.execute_script(f"return document.getElementById('{image}').naturalWidth") > 0)
        shown = browser.find_element(By.ID, "provenance").get_attribute("textContent")
        assert "my grandmother in her garden, 1950s" in shown and "generative reconstruction" in shown.lower()

        slider = browser.find_element(By.ID, "slider")
        slider.send_keys(*[Keys.ARROW_LEFT] * 15)
        assert slider.get_attribute("value") == "35"
        assert browser.find_element(By.ID, "before").value_of_css_property("clip-path") == "inset(0px 65% 0px 0px)"
        browser.find_element(By.ID, "zoom").click()
        assert "actual" in browser.find_element(By.ID, "compare-box").get_attribute("class")
        assert browser.execute_script("return document.getElementById('after').getBoundingClientRect().width") == 96
        browser.find_element(By.ID, "zoom").click()

        browser.find_element(By.ID, "save").click()
        until("the save", EC.text_to_be_present_in_element((By.ID, "save-status"), "saved as grandma_supir.png"))
        browser.execute_script("document.getElementById('advanced').open = false; window.scrollTo(0, 0);")
        time.sleep(0.3)  # let the repaint settle before the picture
        shot = tmp_path / "studio.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("SUPIR_STUDIO_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["SUPIR_STUDIO_SCREENSHOT"])
        assert Image.open(shot).width == 1440

        saved = out / "grandma_supir.png"
        assert Image.open(saved).size == (96, 64)  # input size x upscale
        prov = read_provenance(saved)
        assert prov["caption"] == "my grandmother in her garden, 1950s"  # the edited caption was used
        assert prov["settings"]["steps"] == 2 and prov["source"] == "grandma.png"

        # drag and drop: a second photo joins the list; a second tab shows the same photos and queue
        browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(document.querySelector('#photos img').src).then(r => r.blob()).then(blob => {"
            "  const dt = new DataTransfer(); dt.items.add(new File([blob], 'second.png', {type: 'image/png'}));"
            "  document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));"
            "  done(); });")
        until("the dropped photo", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#photos li")) == 2)
        first_tab = browser.current_window_handle
        browser.switch_to.new_window("tab")
        browser.get(server.url)
        until("the photos in tab 2", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#photos li")) == 2)
        until("the queue in tab 2", EC.text_to_be_present_in_element((By.ID, "queue"), "grandma.png · done"))
        browser.close()
        browser.switch_to.window(first_tab)

        # the page's own fetch with a traversal name is refused with one sentence, nothing is written
        status = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('api/photos?name=' + encodeURIComponent('../../evil.png'), {method: 'POST', body: new Blob(['x'])})"
            ".then(async r => done([r.status, (await r.json()).error]));")
        assert status[0] == 400 and "not allowed" in status[1]
        assert not list(tmp_path.rglob("evil.png"))

        # without the token: 403, in the browser and for any client
        browser.get(f"http://127.0.0.1:{server.port}/api/state")
        assert "forbidden" in browser.find_element(By.TAG_NAME, "body").text
        assert request(f"http://127.0.0.1:{server.port}/")[0] == 403
        wait_for(lambda: all(j.state == "done" for j in studio.jobs.values()), what="the jobs")
