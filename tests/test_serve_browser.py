"""`fireedit-jax serve` in headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

The page runs in its own process, as a user starts it, on a demo-size FireEdit checkpoint
(configs/shapes.py with random weights: what is tested is the page, not the edit's quality).
Chromium is never skipped: without it the tests fail and say how to install it (.ci/run does).

FIREEDIT_JAX_SCREENSHOT=docs/serve.png also writes the end-to-end test's screenshot there, and
FIREEDIT_JAX_SERVE_CHECKPOINT=outputs/demo/checkpoint serves a trained checkpoint instead, at the
demo's 20 steps (the README's picture: a real edit, and the region its head found).
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from fireedit_jax import checkpoint, demo
from fireedit_jax.data import shapes
from fireedit_jax.models.fireedit import EditModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = os.environ.get("FIREEDIT_JAX_SERVE_CHECKPOINT")  # the README's picture: a trained checkpoint
STEPS = 20 if TRAINED else 4
START_TIMEOUT = 300  # s: imports, checkpoint, compiling the edit loop on a busy 2-core CPU
WINDOW = (1280, 1700)


def random_demo_checkpoint(directory) -> str:
    """The demo's model (configs/shapes.py, full FireEdit) with small random weights (`EditModel.draw_params`:
    no init to compile) and ShapeEdit's tokenizer, as an inference checkpoint."""
    config = demo.demo_config(1, 8)
    tokenizer = os.path.join(directory, "tokenizer_files")
    shapes.build_tokenizer().save_pretrained(tokenizer)
    out = os.path.join(directory, "checkpoint")
    checkpoint.save(out, EditModel.from_config(config.model).draw_params(), config, tokenizer)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`fireedit-jax serve` on a loopback port → its URL; stopped after the module's tests."""
    root = tmp_path_factory.mktemp("serve")
    if TRAINED:  # linked in as `checkpoint`, as the random one is named
        os.symlink(os.path.abspath(TRAINED), root / "checkpoint")
    ckpt, port = (str(root / "checkpoint") if TRAINED else random_demo_checkpoint(str(root))), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(root / "gradio"),
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")  # fmt: skip
    # run from `root` with a relative path: the page (and the README's screenshot) names the checkpoint `checkpoint`
    command = [sys.executable, "-m", "fireedit_jax.cli", "serve", "--checkpoint", os.path.relpath(ckpt, root),
               "--port", str(port), "--no-warmup", "--steps", str(STEPS), "--image-guidance", "1.0", "--text-guidance", "3.0"]
    log_path = root / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"fireedit-jax serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"fireedit-jax serve did not answer in {START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("these tests need Debian's chromium and chromium-driver: apt-get install -y chromium "
                    "chromium-driver (bash scripts/test.sh installs them as root)")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tmp_path_factory.mktemp("chromium")
    # the background-networking switches keep Chromium from calling out (the closed network refuses it)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # an explicit chromedriver: selenium-manager never runs (it would try to download one)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield chrome
    chrome.quit()


# ---------------------------------------------------------------------------------------- page helpers


def find(browser, css: str):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, css)


def wait_for(condition, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"waited {timeout:.0f} s for {what}")


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait_for(lambda: find(browser, "#upload") and find(browser, "#mask canvas"), what="the page to render")


def upload(browser, path) -> None:
    from selenium.webdriver.common.by import By

    # the Upload button's hidden file input is its sibling
    browser.find_element(By.XPATH, "//*[@id='upload']/../input[@type='file']").send_keys(str(path))


def status(browser) -> str:
    return find(browser, "#status")[0].text


def toast_texts(browser) -> list[str]:
    """The open toasts' texts; one that closes while being read is left out."""
    from selenium.common.exceptions import StaleElementReferenceException

    texts = []
    for element in find(browser, "[data-testid='toast-text']"):
        try:
            texts.append(element.text)
        except StaleElementReferenceException:
            pass
    return texts


def expect_message(browser, *parts: str) -> str:
    """Waits for an error/warning toast that holds every one of `parts`; closes the toasts; returns its text."""
    text = wait_for(lambda: next((t for t in toast_texts(browser) if all(p in t for p in parts)), None), 30,
                    what=f"a message with {parts}")  # fmt: skip
    from selenium.common.exceptions import StaleElementReferenceException

    for close in find(browser, "[data-testid='toast-close']"):
        try:
            close.click()
        except StaleElementReferenceException:  # it closed by itself meanwhile
            pass
    wait_for(lambda: not toast_texts(browser), 10, what="the messages to close")
    return text


def type_into(browser, elem_id: str, text: str) -> None:
    field = find(browser, f"#{elem_id} textarea, #{elem_id} input")[0]
    field.clear()
    field.send_keys(text)


def click_picture(browser, selector: str, fx: float, fy: float) -> None:
    """Clicks the point (fx, fy), as fractions of the picture, of the <img> `selector` whose picture is centred in
    its box (CSS object-fit contain or scale-down), once its picture has loaded (a new src loads a moment later)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains

    def loaded():
        img = find(browser, selector)[0]
        try:
            natural, fit = browser.execute_script(
                "const img = arguments[0]; return [[img.naturalWidth, img.naturalHeight], getComputedStyle(img).objectFit]",
                img,
            )  # fmt: skip
        except StaleElementReferenceException:  # replaced meanwhile: find it again
            return None
        return (img, natural, fit) if min(natural) > 0 else None

    img, natural, fit = wait_for(loaded, what=f"{selector}'s picture to load")
    box = img.size["width"], img.size["height"]
    scale = min(box[0] / natural[0], box[1] / natural[1])
    if fit == "scale-down":
        scale = min(scale, 1.0)
    shown = natural[0] * scale, natural[1] * scale
    x = (box[0] - shown[0]) / 2 + fx * shown[0] - box[0] / 2  # offsets from the element's centre
    y = (box[1] - shown[1]) / 2 + fy * shown[1] - box[1] / 2
    ActionChains(browser).move_to_element_with_offset(img, int(x), int(y)).click().perform()


def fetch_image(url: str) -> Image.Image:
    with urllib.request.urlopen(url, timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def requested_hosts(browser) -> set[str]:
    """The hosts of every http(s) request the page made (Chromium's performance log)."""
    hosts = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if url.startswith(("http://", "https://")):
                hosts.add(url.split("/")[2])
    return hosts


# ---------------------------------------------------------------------------------------- tests


def test_edit_end_to_end_in_the_browser(server, browser, tmp_path):
    """Upload a ShapeEdit scene, click a box, edit, edit again: results of the input's size, the progress at its
    end, a history of every turn, a download link, and nothing fetched from outside the machine."""
    sample = shapes.generate(shapes.ShapesConfig(size=32), "test", 0)
    scene = tmp_path / "scene.png"
    Image.fromarray(sample["source"]).save(scene)
    open_page(browser, server)
    upload(browser, scene)
    wait_for(lambda: "Uploaded scene.png (32×32)" in status(browser), what="the upload")

    before = find(browser, "#input-image img")[0].get_attribute("src")
    corners = np.asarray(sample["box"]) + [0.005, 0.005, -0.005, -0.005]  # the referred object's box
    click_picture(browser, "#input-image img", *corners[:2])
    wait_for(lambda: find(browser, "#input-image img")[0].get_attribute("src") != before, what="the first corner")
    click_picture(browser, "#input-image img", *corners[2:])
    boxes = wait_for(lambda: find(browser, "#boxes textarea")[0].get_attribute("value"), what="the box")
    np.testing.assert_allclose([float(v) for v in boxes.split()], corners, atol=0.01)

    type_into(browser, "instruction", sample["instruction"])
    find(browser, "#edit")[0].click()
    wait_for(lambda: "Turn 1:" in status(browser), 120, what="the edit")
    assert f"in {STEPS}/{STEPS} denoising steps" in status(browser)  # the steps the progress bar was given
    result = find(browser, "#result img")[0]
    assert fetch_image(result.get_attribute("src")).size == (32, 32)  # the input's size, not the 64 px working size
    download = find(browser, "#result a[download]")[0].get_attribute("href")
    assert download.endswith(".png") and fetch_image(download).size == (32, 32)
    assert len(find(browser, "#history img")) == 2  # the input and turn 1
    shot = tmp_path / "serve.png"  # the page after an edit (the README's picture)
    browser.save_screenshot(str(shot))
    assert Image.open(shot).width == WINDOW[0]
    if os.environ.get("FIREEDIT_JAX_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["FIREEDIT_JAX_SCREENSHOT"])

    find(browser, "#edit-again")[0].click()
    wait_for(lambda: "The result is the new input" in status(browser), what="'Edit again'")
    find(browser, "#clear-boxes")[0].click()  # the second turn without boxes
    wait_for(lambda: not find(browser, "#boxes textarea")[0].get_attribute("value"), what="the boxes to clear")
    type_into(browser, "instruction", "remove the leftmost object")
    find(browser, "#edit")[0].click()
    wait_for(lambda: "Turn 2:" in status(browser), 120, what="the second turn")
    assert f"{STEPS}/{STEPS} denoising steps" in status(browser)
    assert len(find(browser, "#history img")) == 3

    assert requested_hosts(browser) == {server.split("/")[2]}  # the page is served whole, from loopback


def test_bad_input_gets_a_message_not_a_traceback(server, browser, tmp_path):
    """A file that is no image, an empty instruction, a word the demo does not know, a box outside the image: each
    gets its message in the page, and nothing is edited. Then a painted mask (not bad input): the edit runs,
    mask-guided, and the result keeps the input's pixels outside the painted stroke; and a box made the mask."""
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, server)
    (tmp_path / "notes.png").write_text("these are notes, not pixels")
    upload(browser, tmp_path / "notes.png")
    expect_message(browser, "'notes.png' is not an image")

    scene = shapes.generate(shapes.ShapesConfig(size=32), "test", 1)["source"]
    Image.fromarray(scene).save(tmp_path / "scene.png")
    upload(browser, tmp_path / "scene.png")
    wait_for(lambda: "Uploaded scene.png" in status(browser), what="the upload")
    find(browser, "#edit")[0].click()
    expect_message(browser, "type an instruction")

    type_into(browser, "instruction", "make the cup magenta")
    find(browser, "#edit")[0].click()
    known = expect_message(browser, "does not know the word(s) cup, magenta", "It knows:")
    assert "circle" in known and "leftmost" in known  # the known words are listed

    type_into(browser, "instruction", "make the red circle blue")
    type_into(browser, "boxes", "0.5 0.5 1.4 0.9")
    find(browser, "#edit")[0].click()
    expect_message(browser, "lies outside the image", "[0, 1]")
    find(browser, "#clear-boxes")[0].click()
    wait_for(lambda: not find(browser, "#boxes textarea")[0].get_attribute("value"), what="the boxes to clear")

    assert not find(browser, "#result img")  # nothing was edited
    assert "Turn" not in status(browser) and "Traceback" not in browser.page_source

    # a painted mask is not bad input: the edit runs, mask-guided
    brush = [b for b in find(browser, "#mask button") if b.get_attribute("aria-label") == "Brush"]
    brush[0].click()
    canvas = find(browser, "#mask canvas")[0]
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(30, 10).move_by_offset(20, 30) \
        .release().perform()  # fmt: skip
    find(browser, "#edit")[0].click()
    wait_for(lambda: "Turn 1:" in status(browser) or toast_texts(browser), 240, what="the mask-guided edit")
    assert "Turn 1:" in status(browser), toast_texts(browser)
    assert find(browser, "#result img") and "Traceback" not in browser.page_source
    # the stroke covers a few percent of the 32 × 32 scene: the random model paints noise under it, and the result
    # is the input exactly elsewhere (an edit that ignored the mask would change nearly every pixel)
    result = np.asarray(fetch_image(find(browser, "#result img")[0].get_attribute("src")))
    assert result.shape == scene.shape
    changed = np.any(result != scene, axis=-1)
    assert 0 < changed.mean() < 0.25, f"{changed.mean():.1%} of the pixels changed"

    # 'Mask from boxes' puts the box into the mask editor, where Edit reads it: only the box's pixels change
    find(browser, "#clear-mask")[0].click()
    wait_for(lambda: "The mask is cleared" in status(browser), what="'Clear mask'")
    type_into(browser, "boxes", "0.5 0.5 1 1")
    find(browser, "#mask-from-boxes")[0].click()
    wait_for(lambda: "The boxes are the mask" in status(browser), what="'Mask from boxes'")
    find(browser, "#edit")[0].click()
    wait_for(lambda: "Turn 2:" in status(browser) or toast_texts(browser), 240, what="the edit under the box")
    assert "Turn 2:" in status(browser), toast_texts(browser)
    changed = np.any(np.asarray(fetch_image(find(browser, "#result img")[0].get_attribute("src"))) != scene, axis=-1)
    assert changed[16:, 16:].mean() > 0.5 and not changed[:16].any() and not changed[:, :16].any()
