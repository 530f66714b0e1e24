"""A real-browser harness: JupyterLab on 127.0.0.1 driven by the system's headless Chromium through playwright.

Used by ``tests/test_browser.py`` and by ``tools/screenshots.py`` (the README gallery), imported as
``divaware.browser`` (a checkout's tool, not used by the package itself: it needs playwright and Chromium). Everything it starts
lives in its own temporary folders (server root, Jupyter config/data/runtime, JupyterLab settings and
workspaces, browser profile) and is stopped by the harness itself: the JupyterLab server is started in a
process group of its own (its kernels are its children) and only that group is signalled.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# No network, no first-run UI, no background services: the browser talks only to our local server.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """The system Chromium (Debian's ``chromium``), or None; playwright's own download is never used."""
    env = os.environ.get("DIVAWARE_CHROMIUM")
    for candidate in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parameterised_copy(source: Path, dest: Path, parameters: Mapping[str, Any]) -> Path:
    """A copy of notebook ``source`` whose parameters cell assigns ``parameters`` instead of the defaults."""
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = []
    for line in cell.source.splitlines():
        name = line.split(":", 1)[0].strip()
        if name in parameters:
            annotation = line.split(":", 1)[1].split("=", 1)[0].strip()
            line = f"{name}: {annotation} = {parameters[name]!r}  # set by the browser harness"
        lines.append(line)
    cell.source = "\n".join(lines)
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


class Lab:
    """A running JupyterLab server (``url``, ``token``, ``root``) and the process that serves it.

    The server gets an application folder of its own (``$JUPYTERLAB_DIR``: links to the installed JupyterLab's
    static files, schemas and themes, and an empty ``settings/``), as its kernels do, so what divaware installs
    there at run time (:func:`divaware.widgets.install_lab_settings`) is what this server reads, and nothing of
    the real environment is changed; a second server on the same ``home`` reuses that folder, as a second
    ``jupyter lab`` in one environment would. JupyterLab reads settings overrides once, when the server starts.
    ``lab_settings``: ``"installed"`` puts the package's JupyterLab settings in place before the server starts,
    as ``divaware run`` (README command 1) does before anyone opens JupyterLab; ``"none"`` leaves them to
    divaware's run-time install (:func:`divaware.widgets.install_lab_settings`, called by notebook kernels).
    """

    def __init__(self, root: Path, home: Path, env: Mapping[str, str] | None = None, timeout: float = 120,
                 lab_settings: str = "installed") -> None:
        from jupyterlab.commands import get_app_dir

        from divaware.widgets import install_lab_settings

        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        dirs = {name: home / name for name in ("config", "data", "runtime", "user_settings", "workspaces", "app")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        real_app = Path(get_app_dir())
        for entry in real_app.iterdir():
            if entry.name != "settings" and not (dirs["app"] / entry.name).exists():
                (dirs["app"] / entry.name).symlink_to(entry)
        self.app_dir = dirs["app"]
        overrides = dirs["app"] / "settings" / "overrides.d"
        overrides.mkdir(parents=True, exist_ok=True)
        if lab_settings == "installed":
            install_lab_settings(dirs["app"])
        elif lab_settings != "none":
            raise ValueError(f"lab_settings must be 'installed' or 'none', got {lab_settings!r}")
        # This server is ours: no news pop-up asking to reach the internet.
        (overrides / "zz-harness.json").write_text(json.dumps(
            {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
        full_env = {**os.environ, "JUPYTER_CONFIG_DIR": str(dirs["config"]), "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
                    "JUPYTERLAB_SETTINGS_DIR": str(dirs["user_settings"]), "JUPYTERLAB_DIR": str(dirs["app"]),
                    "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]), "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.log = (home / "lab.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={root}",
             "--ServerApp.open_browser=False", "--LabApp.extension_manager=readonly",
             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            cwd=root, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"JupyterLab did not answer within {timeout} s; see {self.log.name}")
            time.sleep(0.5)

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}?token={self.token}", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        """Stop the server and its kernels: our process group only, politely first."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.log.close()


@contextmanager
def lab_and_browser(root: Path, home: Path, env: Mapping[str, str] | None = None,
                    viewport: tuple[int, int] = (1400, 1000),
                    lab_settings: str = "installed") -> Iterator[tuple[Lab, Any]]:
    """A JupyterLab server on ``root`` and a playwright page of headless system Chromium (fresh profile)."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no system Chromium found (apt-get install chromium chromium-driver)")
    lab = Lab(root, home, env, lab_settings=lab_settings)
    try:
        with sync_playwright() as p:
            # launch() gives every browser a fresh temporary profile (user data dir) and removes it after.
            browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
                page.set_default_timeout(120_000)
                yield lab, page
            finally:
                browser.close()
    finally:
        lab.stop()


def open_notebook(lab: Lab, page: Any, relpath: str) -> None:
    page.goto(f"{lab.url}/lab/tree/{relpath}?reset&token={lab.token}")  # reset: no earlier tabs restored
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=180_000)
    # A fresh JupyterLab may ask which kernel to start: take the preselected one (the notebook's python3).
    try:
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=15_000)
    except Exception:  # no dialog: the kernel started on its own
        pass
    # the kernel is ready when the toolbar's status says so
    page.wait_for_function(
        "() => { const s = document.querySelector('.jp-Notebook-ExecutionIndicator');"
        " return s && s.getAttribute('data-status') === 'idle'; }", timeout=180_000)


def run_all(page: Any) -> None:
    """Run > Run All Cells, through the menu as a person would."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def wait_until_done(page: Any, timeout_ms: int = 600_000) -> None:
    """Wait until every code cell has run (an execution count) and the kernel is idle again."""
    page.wait_for_function(
        """() => {
            const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
            if (!status || status.getAttribute('data-status') !== 'idle') return false;
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
            return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
        }""", timeout=timeout_ms, polling=1000)


def cell_errors(page: Any) -> list[str]:
    """Tracebacks shown in the notebook (stderr such as progress bars is not an error)."""
    return page.eval_on_selector_all("[data-mime-type='application/vnd.jupyter.error']",
                                     "els => els.map(e => e.textContent)")


def save(page: Any) -> None:
    """File > Save, and wait until the notebook is no longer marked dirty."""
    page.keyboard.press("Control+s")
    page.wait_for_function(
        "() => !document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-mod-dirty')"
        " && !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')", timeout=60_000)


def restart_kernel(page: Any) -> None:
    """Kernel > Restart Kernel..., confirmed, and wait until the new kernel is idle."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Restart Kernel…?$")).first.click()
    page.locator(".jp-Dialog .jp-mod-accept").click()
    page.wait_for_timeout(2000)
    page.wait_for_function(
        "() => { const s = document.querySelector('.jp-Notebook-ExecutionIndicator');"
        " return s && s.getAttribute('data-status') === 'idle'; }", timeout=180_000)


def png_pixels(src: str) -> Any:
    """RGB array of a ``data:image/png;base64,...`` image source."""
    import base64
    import io

    from matplotlib import image

    return image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")[..., :3]


def colour_pixels(src: str, hex_colour: str, tolerance: float = 0.12) -> int:
    """How many pixels of a PNG data URL are within ``tolerance`` (per channel, 0-1) of ``hex_colour``."""
    import numpy as np
    from matplotlib.colors import to_rgb

    rgb = png_pixels(src)
    return int((np.abs(rgb - np.asarray(to_rgb(hex_colour))) <= tolerance).all(axis=-1).sum())
