"""The notebooks as a user meets them: the project's own JupyterLab on 127.0.0.1, driven by headless Chromium (Playwright with
Debian's `chromium`, no browser download). The explore chapter runs top to bottom and its frame browser answers the slider after
the run (the chapter's own definitions); the experiment notebook, with tiny parameters, ends with the predictions beside the labels
in the exported `affect_nb.explore.FrameBrowser`, which answers the slider too. Screenshots go to the folder
printed at the start ($AFFECT_NB_SCREENSHOTS, or a temporary one). Without Chromium the tests are skipped, saying why."""
import base64, hashlib, io, json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).parent / "jupyter"   # the project's environment: the one running these tests
EXPLORE, TRAIN = ROOT / "nbs" / "03_explore.ipynb", ROOT / "nbs" / "experiments" / "train.ipynb"
SETTINGS = {  # JupyterLab user settings: every cell in the page (not only those in view), no news or update checks
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False}}
TINY = dict(task="va", backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, pooling="avg", seq_len=16, stride=8,
            batch_size=4, epochs=1, patience=10, d_model=16, n_heads=2, n_layers=1, d_ff=32, probe=True, browse=True)

# In the page: the open notebook's cells (type, source, execution count, outputs without their images' data) ...
CELLS = """() => window.jupyterapp.shell.currentWidget.content.widgets.map(c => ({type: c.model.type,
  source: c.model.sharedModel.getSource(), count: c.model.type == 'code' ? c.model.executionCount : null,
  outputs: c.model.type != 'code' ? [] : c.model.outputs.toJSON().map(o => ({output_type: o.output_type, name: o.name,
    text: [].concat(o.text || o.evalue || (o.data || {})['text/plain'] || '').join('').slice(0, 3000), mimes: Object.keys(o.data || {}),
    model_id: ((o.data || {})['application/vnd.jupyter.widget-view+json'] || {}).model_id}))}))"""
# ... Python run in its live kernel, off the record (no execution count), returning what it printed and any error ...
KERNEL = """async (code) => { const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const f = k.requestExecute({code, store_history: false}); let out = '';
  f.onIOPub = m => { const t = m.header.msg_type;
    if (t == 'stream') out += m.content.text; if (t == 'error') out += `ERROR ${m.content.ename}: ${m.content.evalue}`; };
  await f.done; return out; }"""
# ... a run finished: the kernel idle, no cell waiting ([*]), at least one cell run
DONE = """() => { const p = window.jupyterapp.shell.currentWidget, k = p.sessionContext.session?.kernel;
  const prompts = [...p.node.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);
  return k?.status == 'idle' && !prompts.some(t => t.includes('*')) && prompts.some(t => /\\d/.test(t)); }"""
BLOB_SHA = """async img => { const b = await (await fetch(img.src)).arrayBuffer();
  return [...new Uint8Array(await crypto.subtle.digest('SHA-256', b))].map(x => x.toString(16).padStart(2, '0')).join(''); }"""


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    "The folder of this run's screenshots, printed."
    d = Path(os.environ.get("AFFECT_NB_SCREENSHOTS") or tmp_path_factory.mktemp("browser") / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    print(f"browser test screenshots: {d}")
    return d


@pytest.fixture(scope="module")
def browser():
    "Headless Chromium from the system (Debian's package), stopped however the tests end."
    exe = chromium_path()
    if exe is None: pytest.skip("Chromium not found: `apt-get install chromium` (make test does it when apt-get is usable)")
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.fail("playwright is a dev requirement (settings.ini): `make install`")
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try: yield b
        finally: b.close()
    finally: pw.stop()


def free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r: return r.status
    except OSError: return None


@pytest.fixture(scope="module")
def lab(browser, tmp_path_factory):
    "JupyterLab from the project's environment on 127.0.0.1 (a free port, a token), its root a temporary folder, stopped at the end."
    base = tmp_path_factory.mktemp("lab")
    root, tmp = base / "root", base / "tmp"
    for d in (root, tmp): d.mkdir()
    for name, value in SETTINGS.items():
        (base / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "settings" / name).write_text(json.dumps(value))
    token, port = secrets.token_hex(16), free_port()
    # The kernels' temporary folder is the lab's own: the explore chapter's live tree is not shared with other runs of it.
    env = {k: v for k, v in os.environ.items() if k not in ("IN_TEST", "MPLBACKEND")} | dict(
        JUPYTER_TOKEN=token, TMPDIR=str(tmp), JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTERLAB_SETTINGS_DIR=str(base / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"), JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = [str(JUPYTER), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0: args.append("--allow-root")
    log = open(base / "jupyterlab.log", "wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while _status(f"{url}/api/status?token={token}") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"JupyterLab did not start:\n{(base / 'jupyterlab.log').read_text()[-3000:]}"
            time.sleep(0.3)
        yield dict(url=url, token=token, root=root, tmp=tmp, base=base)
    finally:
        _stop(proc, url, token)
        log.close()


def _stop(proc, url, token):
    "Stop JupyterLab and its kernels: its own shutdown first, then a signal to its process group."
    try: urllib.request.urlopen(urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST"), timeout=5)
    except OSError: pass
    try: proc.wait(15)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try: os.killpg(proc.pid, sig); proc.wait(wait); break
            except (ProcessLookupError, subprocess.TimeoutExpired): continue


@pytest.fixture
def page(browser):
    "A fresh browser page (1280×900), closed at the end."
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try: yield ctx.new_page()
    finally: ctx.close()


def open_notebook(page, lab, name: str, workspace: str):
    "Open `name` (in the lab's root) in its own `workspace`, wait for its kernel; fails on a kernel dialog."
    page.goto(f"{lab['url']}/lab/workspaces/{workspace}/tree/{name}?token={lab['token']}")
    page.wait_for_function(f"""() => window.jupyterapp?.shell.currentWidget?.context?.path == {json.dumps(name)}
        && window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel?.status == 'idle'
        || document.querySelector('.jp-Dialog') !== null""", timeout=60_000)
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # the notebook, wide, in the screenshots
    dialog = page.locator(".jp-Dialog")
    assert dialog.count() == 0, f"JupyterLab asked: {dialog.inner_text()}"
    info = json.loads(kernel(page, "import sys, json; print(json.dumps(dict(prefix=sys.prefix)))"))
    spec = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.name")
    assert (spec, info["prefix"]) == ("python3", sys.prefix), "the notebook did not open with the project's kernel (make install)"


def kernel(page, code: str) -> str:
    "Run `code` in the open notebook's kernel and return what it printed (errors fail)."
    out = page.evaluate(KERNEL, code)
    assert "\nERROR " not in "\n" + out, out
    return out


def run_all(page, timeout_s: float) -> list[dict]:
    "Run → Run All Cells from the menu, wait for the run to end, and return the cells."
    page.click("li.lm-MenuBar-item:has-text('Run')")
    page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
    page.wait_for_timeout(500)
    page.wait_for_function(DONE, timeout=timeout_s * 1000, polling=500)
    return page.evaluate(CELLS)


def check_outputs(cells: list[dict]):
    "Every code cell ran; no error, no traceback, no progress bar as text, no figure as its repr instead of the picture."
    code = [c for c in cells if c["type"] == "code"]
    outs = [(c["source"].splitlines()[0][:60] if c["source"] else "", o) for c in code for o in c["outputs"]]
    errors = [f"{s}: {o['text'][:500]}" for s, o in outs if o["output_type"] == "error"]
    assert not errors, "error outputs:\n" + "\n".join(errors)
    assert all(c["count"] for c in code if c["source"].strip()), [c["source"][:60] for c in code if not c["count"]]
    text_bars = [f"{s}: {o['text'][:200]}" for s, o in outs if o["output_type"] == "stream" and ("it/s" in o["text"] or "%|" in o["text"])]
    assert not text_bars, "progress bars as text, not widgets:\n" + "\n".join(text_bars)
    reprs = [s for s, o in outs if o["mimes"] == ["text/plain"] and o["text"].startswith("<Figure size")]
    assert not reprs, f"figures not shown inline: {reprs}"
    return outs


def output_of(page, cells, startswith: str):
    "The output area (a locator) of the code cell whose source starts with `startswith`, and its widget's model id."
    i = next(i for i, c in enumerate(cells) if c["type"] == "code" and c["source"].lstrip().startswith(startswith))
    model = next(o["model_id"] for o in cells[i]["outputs"] if o["model_id"])
    return page.locator(".jp-Notebook .jp-Cell").nth(i).locator(".jp-OutputArea-output:has(.widget-image)"), model


def shown_image(area):
    "The frame browser's picture as the page shows it (a screenshot of the element, RGB), and its blob's SHA-256."
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    img = area.locator(".widget-image")
    try:
        img.wait_for(state="visible", timeout=20_000)
        img.page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle(), timeout=20_000)
    except PlaywrightTimeout: pytest.fail(f"the frame browser shows no picture: {area.inner_text()[:500]!r}")
    return np.asarray(Image.open(io.BytesIO(img.screenshot())).convert("RGB")), img.evaluate(BLOB_SHA)


def marker_column(rgb) -> int:
    "The x of the crimson current-frame line (`axvline`, #dc143c) in the browser's picture: its most crimson column."
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    crimson = (r > 170) & (g < 90) & (b > 30) & (b < 120)
    counts = crimson.sum(0)
    assert counts.max() > rgb.shape[0] // 3, "no current-frame line in the picture"
    return int(counts.argmax())


def widget_state(page, model: str) -> dict:
    "The frame browser's state in the kernel: the frame slider, the message and the SHA-256 of the image it sends."
    return json.loads(kernel(page, f"""
import hashlib, json, warnings
from ipywidgets import Widget
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _ui = Widget.widgets[{model!r}]
(_, _f), _m, _i = _ui.children[1].children, _ui.children[2], _ui.children[3]
print(json.dumps(dict(frame=_f.value, max=_f.max, message=_m.value, sha=hashlib.sha256(_i.value).hexdigest())))"""))


def drag_slider(page, area, fraction: float):
    "Drag the frame slider's handle to `fraction` of its track, as a user does."
    handle, track = area.locator(".widget-slider .noUi-handle").first, area.locator(".widget-slider .noUi-target").first
    h, t = handle.bounding_box(), track.bounding_box()
    y = h["y"] + h["height"] / 2
    page.mouse.move(h["x"] + h["width"] / 2, y); page.mouse.down()
    page.mouse.move(t["x"] + t["width"] * fraction, y, steps=8); page.mouse.up()


def slide_and_check(page, area, model: str, before, sha_before: str, shot: Path):
    "Drag the frame slider past the middle: the kernel's frame follows, the page shows a new crop, the marker moves right, no error."
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    img = area.locator(".widget-image")
    src = img.get_attribute("src")
    drag_slider(page, area, 0.6)
    page.wait_for_function("e => e.textContent.trim() != '1'", arg=area.locator(".widget-readout").first.element_handle(), timeout=10_000)
    try: page.wait_for_function("([e, s]) => e.src && e.src != s", arg=[img.element_handle(), src], timeout=10_000)
    except PlaywrightTimeout: pass  # the picture stayed: said below
    after, sha_after = shown_image(area)
    area.screenshot(path=shot)
    state = widget_state(page, model)
    readout, message = area.locator(".widget-readout").first.inner_text().strip(), area.locator(".widget-html").inner_text().strip()
    assert message == "" and state["message"] == "", f"the browser says: {message or state['message']} (screenshot: {shot})"
    assert 1 < state["frame"] == int(readout), f"the slider shows frame {readout}, the kernel's browser has {state}"
    assert sha_after != sha_before, f"the picture did not change when the slider moved to frame {readout} (screenshot: {shot})"
    assert state["sha"] == sha_after, "the page shows what the kernel's browser sent"
    h, w = before.shape[:2]
    crop = np.s_[h // 3:, : w // 5]  # under the crop's title
    assert not np.array_equal(before[crop], after[crop]), f"the face crop did not change (screenshot: {shot})"
    assert marker_column(after) > marker_column(before) > w // 5, f"the current-frame marker did not move right (screenshot: {shot})"


def test_explore_chapter_runs_and_its_frame_browser_follows_the_slider(lab, page, shots):
    "Run All in the explore chapter, then move the frame browser's slider: a new crop, the marker further right, no error."
    shutil.copy(EXPLORE, lab["root"] / EXPLORE.name)
    open_notebook(page, lab, EXPLORE.name, "explore")
    cells = run_all(page, timeout_s=120)
    check_outputs(cells)
    area, model = output_of(page, cells, "demo_root = ")
    area.scroll_into_view_if_needed()
    before, sha_before = shown_image(area)
    page.screenshot(path=shots / "explore-frame-browser.png")
    state = widget_state(page, model)
    assert (state["frame"], state["message"], state["sha"]) == (1, "", sha_before) and state["max"] > 3, state
    slide_and_check(page, area, model, before, sha_before, shots / "explore-frame-browser-moved.png")


def test_experiment_notebook_shows_predictions_beside_labels(lab, page, shots):
    "The experiment notebook, tiny parameters, Run All: figures inline, bars as widgets, the predictions drawn; the slider moves."
    import papermill as pm
    from affect_nb.synth import make_synthetic
    data, run = lab["base"] / "data", lab["base"] / "run"
    make_synthetic(data, n_videos=8, n_frames=60, progress=False)
    params = dict(TINY, data_dir=str(data), out_dir=str(run), cache_dir=str(lab["base"] / "features"))
    pm.execute_notebook(str(TRAIN), str(lab["root"] / TRAIN.name), parameters=params, prepare_only=True, kernel_name="python3")
    open_notebook(page, lab, TRAIN.name, "train")
    cells = run_all(page, timeout_s=300)
    outs = check_outputs(cells)
    assert sum("image/png" in o["mimes"] for _, o in outs) >= 3, "the learning curves and the task's figures are shown inline"
    bars = [o["text"] for _, o in outs if "application/vnd.jupyter.widget-view+json" in o["mimes"] and "|" in o["text"]]
    # tqdm.auto's bars are widgets (the epochs' bars, leave=False, close when done; the features' bars stay)
    assert bars and page.locator(".jp-OutputArea-output .widget-hprogress").count() >= 1, f"progress bars are not widgets: {bars}"
    area, model = output_of(page, cells, "if browse:")
    area.scroll_into_view_if_needed()
    picture, sha = shown_image(area)
    page.screenshot(path=shots / "train-predictions-browser.png")
    ref = json.loads(kernel(page, """
import hashlib, json
from affect_nb.explore import FrameBrowser
def _sha(b): b.widget; return hashlib.sha256(b.controls.image.value).hexdigest()
_b = FrameBrowser(data_path, task, "val", preds=preds)
print(json.dumps(dict(preds=_sha(_b), labels=_sha(FrameBrowser(data_path, task, "val")), rows=int((preds.video == _b.video).sum()),
                      frames=len(_b.frames()))))"""))
    assert ref["rows"] == ref["frames"] > 0, f"predictions for every frame of the first video: {ref}"
    assert widget_state(page, model)["sha"] == sha, "the page shows what the kernel's browser sent"
    assert sha == ref["preds"] != ref["labels"], f"the browser's picture is the one with the predictions drawn (screenshots: {shots})"
    slide_and_check(page, area, model, picture, sha, shots / "train-predictions-browser-moved.png")


VIDEO_NB = ROOT / "nbs" / "experiments" / "video.ipynb"
PLAYER_STATE = """
import hashlib, json, warnings
from ipywidgets import Widget
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _c = Widget.widgets[{model!r}].controls
print(json.dumps(dict(frame=_c.slider.value, info=_c.info.value, frame_sha=hashlib.sha256(_c.frame.value).hexdigest(),
                      timeline_sha=hashlib.sha256(_c.timeline.value).hexdigest())))"""


def cursor_column(rgb) -> int:
    "The x of the player's red timeline cursor (RGB about (220, 0, 0)): the column with the most such pixels."
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    counts = ((r > 170) & (g < 70) & (b < 70)).sum(0)
    assert counts.max() > rgb.shape[0] // 4, "no cursor on the timeline"
    return int(counts.argmax())


def test_video_notebook_player_follows_the_slider(lab, page, shots):
    "The video notebook on a test video with a tiny trained run, Run All: timeline and crops inline; the player answers its slider."
    import papermill as pm
    sys.path.insert(0, str(ROOT / "tests"))
    from videos import write_face_video
    from affect_nb.synth import make_synthetic
    from affect_nb.train import train
    base = lab["base"]
    make_synthetic(base / "vdata", n_videos=6, n_frames=40, progress=False)
    tiny = {k: v for k, v in TINY.items() if k not in ("task", "probe", "browse", "backbone", "pretrained", "img_size", "pooling")}
    train(base / "vdata", "va", base / "vrun", cache_dir=base / "vfeatures", backbone="vit_tiny_patch16_224", pretrained=False,
          img_size=32, progress=False, feature_workers=0, **tiny)
    clip = base / "astronaut.mp4"
    write_face_video(clip, n_frames=50, size=(320, 240), empty=((20, 30),))
    params = dict(video=str(clip), checkpoint=str(base / "vrun"), out_dir=str(base / "vout"), train_data=str(base / "vdata"), device="cpu")
    pm.execute_notebook(str(VIDEO_NB), str(lab["root"] / VIDEO_NB.name), parameters=params, prepare_only=True, kernel_name="python3")
    open_notebook(page, lab, VIDEO_NB.name, "video")
    cells = run_all(page, timeout_s=180)
    outs = check_outputs(cells)
    assert sum("image/png" in o["mimes"] for _, o in outs) >= 2, "the timeline and the strip of crops are shown inline"
    assert (base / "vout" / "predictions.csv").is_file() and (base / "vout" / "timeline.png").is_file()
    i = next(i for i, c in enumerate(cells) if c["type"] == "code" and c["source"].lstrip().startswith("display(video_player"))
    model = next(o["model_id"] for o in cells[i]["outputs"] if o["model_id"])
    area = page.locator(".jp-Notebook .jp-Cell").nth(i).locator(".jp-OutputArea-output:has(.affect-player-slider)")
    area.scroll_into_view_if_needed()
    frame, timeline = area.locator(".affect-player-frame"), area.locator(".affect-player-timeline")
    for img in (frame, timeline):
        img.wait_for(state="visible", timeout=20_000)
        page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle(), timeout=20_000)
    before = json.loads(kernel(page, PLAYER_STATE.format(model=model)))
    shown_before = (frame.evaluate(BLOB_SHA), timeline.evaluate(BLOB_SHA))
    line_before = cursor_column(np.asarray(Image.open(io.BytesIO(timeline.screenshot())).convert("RGB")))
    page.screenshot(path=shots / "video-player.png")
    assert before["frame"] == 1 and "frame 1" in before["info"] and shown_before == (before["frame_sha"], before["timeline_sha"])
    src = frame.get_attribute("src")
    handle, track = area.locator(".noUi-handle").first, area.locator(".noUi-target").first
    h, t = handle.bounding_box(), track.bounding_box()
    page.mouse.move(h["x"] + h["width"] / 2, h["y"] + h["height"] / 2); page.mouse.down()
    page.mouse.move(t["x"] + t["width"] * 0.8, h["y"] + h["height"] / 2, steps=8); page.mouse.up()
    page.wait_for_function("([e, s]) => e.src && e.src != s", arg=[frame.element_handle(), src], timeout=15_000)
    page.wait_for_timeout(500)
    after = json.loads(kernel(page, PLAYER_STATE.format(model=model)))
    shown_after = (frame.evaluate(BLOB_SHA), timeline.evaluate(BLOB_SHA))
    line_after = cursor_column(np.asarray(Image.open(io.BytesIO(timeline.screenshot())).convert("RGB")))
    area.screenshot(path=shots / "video-player-moved.png")
    readout = area.locator(".widget-readout").first.inner_text().strip()
    assert after["frame"] == int(readout) > 30, f"the slider shows {readout}, the kernel's player has frame {after['frame']}"
    assert f"frame {after['frame']}" in after["info"] and area.locator(".affect-player-info").inner_text().startswith(f"frame {after['frame']}")
    assert shown_after == (after["frame_sha"], after["timeline_sha"]) and shown_after[0] != shown_before[0], "the page shows the new frame"
    assert line_after > line_before, f"the timeline cursor did not move right ({line_before} -> {line_after}; screenshots: {shots})"
