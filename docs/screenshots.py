"""Screenshots of gradguard in TensorBoard, from a real run, for the docs.

    make docs-images          # or: .venv/bin/python docs/screenshots.py

1. Runs ``gradguard demo`` (vanishing gradients: a broken sigmoid MLP and the fixed ReLU
   one, 600 steps each on scikit-learn's digits) into a temporary log directory.
2. Starts a real TensorBoard server on 127.0.0.1 on a free port.
3. Drives headless Chromium over the DevTools protocol (``--remote-debugging-pipe``: no
   extra Python package) at a fixed window size in light mode, waits until each tab has
   rendered, and saves PNGs under ``docs/img/``:
   - ``tensorboard-custom-scalars.png``: the "gradguard" layout as TensorBoard first shows
     it (no button pressed): the log10 gradient-norm chart shows the vanishing layers at
     first sight, where the linear chart next to it draws them all on 0.
   - ``tensorboard-images.png``: the gradient-flow bar chart and heatmap of both runs.
   - ``tensorboard-histograms.png``: per-layer gradient histograms (``gg.Histograms``) of
     the first and the last layer, both runs overlaid.
   - ``tensorboard-text.png``: the Events, in the TEXT tab.

Needs Chromium (Debian: ``apt-get install chromium``) and the ``tensorboard`` extra. Every
step has a time limit, and the server and the browser are always terminated.
``--logdir DIR`` shoots an existing demo log directory instead of running the demo.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
WIDTH = 1400
MAX_BYTES = 300_000

# JavaScript helpers evaluated in the page. TensorBoard's dashboards are Polymer elements
# behind shadow roots, so every query walks them.
DEEP_ALL = """
const deepAll = (pred) => {
  const found = [];
  const walk = (node) => {
    if (node.nodeType === 1 && pred(node)) found.push(node);
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) walk(child);
  };
  walk(document.documentElement);
  return found;
};
"""
CUSTOM_SCALARS_READY = (
    DEEP_ALL
    + """
(() => {
  const cards = deepAll(n => n.tagName === 'TF-CUSTOM-SCALAR-MULTI-LINE-CHART-CARD');
  return cards.length >= 6 && deepAll(n => n.tagName === 'svg').length >= 6
    && deepAll(n => n.tagName === 'path').length > 100;
})()
"""
)
IMAGES_READY = (
    DEEP_ALL
    + """
(() => {
  const images = deepAll(n => n.tagName === 'IMG' && /image/.test(n.src || ''));
  return images.length >= 4 && images.every(img => img.complete && img.naturalWidth > 0);
})()
"""
)
# The figure at its own size (550 x 360), not shrunk to the card.
IMAGES_SETUP = (
    DEEP_ALL
    + """
(() => {
  for (const dash of deepAll(n => n.tagName === 'TF-IMAGE-DASHBOARD')) dash._actualSize = true;
  return 'actual size';
})()
"""
)
HISTOGRAMS_READY = (
    DEEP_ALL
    + """
(() => deepAll(n => n.tagName === 'TF-HISTOGRAM-LOADER').length >= 2
  && deepAll(n => n.tagName === 'path').length > 40
  && !deepAll(n => n.tagName === 'MAT-SPINNER' || n.tagName === 'MAT-PROGRESS-SPINNER').length)()
"""
)
TEXT_READY = (
    DEEP_ALL
    + """
(() => deepAll(n => n.textContent && n.textContent.includes('Vanishing gradients')).length > 0
  && !deepAll(n => n.tagName === 'MAT-SPINNER' || n.tagName === 'MAT-PROGRESS-SPINNER').length)()
"""
)

# The first and the last layer of the demo's MLPs (the histograms tab's tag filter).
HISTOGRAM_TAGS = "grad_histogram/(0|20)$"
# file name, URL hash, window height (the width is WIDTH), when it has rendered, what to
# do before the shot.
SHOTS = (
    ("custom-scalars", "custom_scalars", 1000, CUSTOM_SCALARS_READY, None),
    ("images", "images", 1900, IMAGES_READY, IMAGES_SETUP),
    (
        "histograms",
        "histograms&tagFilter=" + urllib.parse.quote(HISTOGRAM_TAGS, safe=""),
        720,
        HISTOGRAMS_READY,
        None,
    ),
    ("text", "text", 520, TEXT_READY, None),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], timeout: float, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def process(args: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in a new session, so that its own children (TensorBoard's data
    server, Chromium's renderers) share its process group; on exit the group is always
    terminated, then killed if it lingers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        try:
            yield proc
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # the group we started: its id is proc.pid
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc = proc
        self.to_browser = os.fdopen(to_browser, "wb", buffering=0)
        self.from_browser = os.fdopen(from_browser, "rb", buffering=0)
        self.buffer = b""
        self.next_id = 0
        self.session: str | None = None

    @classmethod
    @contextlib.contextmanager
    def launch(cls, binary: str, profile: Path, log: Path) -> Iterator[Browser]:
        commands_r, commands_w = os.pipe()  # we write, the browser reads fd 3
        replies_r, replies_w = os.pipe()  # the browser writes fd 4, we read

        def child_fds() -> None:
            # Runs in the child before exec. Through spare copies, so that neither dup2
            # clobbers the other pipe end if the pipes already sit on fds 3 or 4.
            commands, replies = os.dup(commands_r), os.dup(replies_w)
            os.dup2(commands, 3)
            os.dup2(replies, 4)

        args = [
            binary,
            "--headless",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--force-color-profile=srgb",
            f"--window-size={WIDTH},1000",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root otherwise
        # fds 3 and 4 are open in this process (os.pipe took the lowest free fds), so
        # pass_fds may name them; it keeps them open across exec in the child, where
        # child_fds() has pointed them at the pipes.
        with process(args, log, pass_fds=(3, 4), preexec_fn=child_fds) as proc:
            os.close(commands_r)
            os.close(replies_w)
            browser = cls(proc, commands_w, replies_r)
            try:
                browser.attach()
                yield browser
            finally:
                browser.to_browser.close()
                browser.from_browser.close()

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        self.to_browser.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    def _read(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self.from_browser], [], [], left)
            if ready:
                chunk = self.from_browser.read(1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return dict(json.loads(message))

    def attach(self) -> None:
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        target = (
            page["targetId"]
            if page
            else self.call("Target.createTarget", url="about:blank")["targetId"]
        )
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        # A block, so that the helpers' ``const`` declarations do not clash between calls.
        block = "{" + expression + "}"
        result = self.call("Runtime.evaluate", expression=block, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_still(self, url: str) -> None:
        """Until the page's element count holds still for two seconds (charts drawn)."""
        count = DEEP_ALL + "deepAll(n => true).length"
        seen: list[int] = []

        def still() -> bool:
            seen.append(int(self.evaluate(count)))
            return len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]

        wait_until(f"{url} to settle", still, timeout=60, every=1.0)

    def shoot(
        self, url: str, ready: str, path: Path, height: int, setup: str | None = None
    ) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.call("Page.navigate", url=url)
        wait_until(f"{url} to render", lambda: bool(self.evaluate(ready)), timeout=90)
        self.wait_still(url)
        if setup is not None:
            print(f"  page set-up: {self.evaluate(setup)}")
            self.wait_still(url)
        time.sleep(1)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        shrink(path)
        print(f"  wrote {path} ({path.stat().st_size // 1000} KB)")


def shrink(path: Path) -> None:
    """Keep a PNG under MAX_BYTES: a 256-colour palette loses nothing visible here."""
    if path.stat().st_size <= MAX_BYTES:
        return
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)


def run_demo(logdir: Path, log: Path) -> None:
    env = dict(os.environ, MPLBACKEND="Agg", WANDB_MODE="disabled")
    args = [sys.executable, "-m", "gradguard", "demo", "--case", "vanishing", "--no-progress"]
    args += ["--logdir", str(logdir)]
    with log.open("wb") as out:
        subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, check=True, timeout=600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--chromium", default=None, help="browser binary (default: chromium)")
    parser.add_argument("--logdir", type=Path, default=None, help="an existing demo log dir")
    args = parser.parse_args(argv)
    binary = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        print("Chromium not found: apt-get install chromium", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gradguard-shots-") as tmp:
        work = Path(tmp)
        logdir = args.logdir or work / "runs"
        if args.logdir is None:
            print("running gradguard demo (vanishing) ...")
            run_demo(logdir, work / "demo.log")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        tensorboard = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
        tensorboard += ["--host", "127.0.0.1", "--port", str(port), "--reload_interval", "0"]
        print(f"starting TensorBoard on {base} ...")
        with process(tensorboard, work / "tensorboard.log"):
            wait_until("TensorBoard", lambda: len(get_json(f"{base}/data/runs")) >= 2, 120)
            with Browser.launch(binary, work / "profile", work / "chromium.log") as browser:
                for name, tab, height, ready, setup in SHOTS:
                    url = f"{base}/?darkMode=false#{tab}"
                    browser.shoot(url, ready, args.out / f"tensorboard-{name}.png", height, setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
