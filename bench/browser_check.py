"""Browser check: the notebooks' widgets as a person sees them, in headless Chromium.

    bash bench/browser_check.sh                       # installs what is missing, then runs this under the CPU lock
    python bench/browser_check.py --out /tmp/gridjepa_browser

Starts JupyterLab on 127.0.0.1 (a free port, a token) over a temporary copy of notebooks 01 and 05 (outputs cleared,
so the committed notebooks are never touched; the kernel runs with GRIDJEPA_PROFILE=smoke), opens each notebook in
Chromium through Playwright, runs all cells from the Run menu and waits for the kernel to go idle. Then it drives the
widgets, found by their descriptions rather than by cell position:

- the transition explorer (col and row dropdowns, the action buttons): every cell, every action, a wall cell where
  the world has walls, a bump into a wall and into the board's edge;
- the planning player (planner, start and goal dropdowns, the two memory boxes, Play and the step slider);
- the layout picker (a layout dropdown above a player).

After each action it checks what the browser shows: the image's bytes change, the label names the new cell or
action, the slider moves; each image is shown at its own pixel size (so the map keeps its shape); no output shows an
error or a widget's text form (`VBox(children=...)`); the kernel reports no error and the browser console none.
Screenshots go to --out. Prints a table of checks and exits 1 if any failed. Everything it starts (server, kernels,
browser) is stopped on the way out, failure or not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_world_and_data.ipynb", "05_planning.ipynb")
WIDGET_TEXT = re.compile(
    r"(VBox|HBox|Box|Dropdown|Image|Output|Play|IntSlider)\(children=|Error displaying widget|"
    r"Traceback \(most recent call last\)|model not found"
)
SETTINGS = {  # JupyterLab user settings: every cell in the DOM (no windowing), no news or update toasts
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

# ── in-page helpers ──────────────────────────────────────────────────────────────────────────────────────────────

TAG_JS = """() => {
  // Tag each widget by what it is: the nearest VBox above a dropdown described 'col' is an explorer, 'planner' a
  // player, 'layout' a layout picker. Returns the tags in document order.
  document.querySelectorAll('[data-bc]').forEach(e => e.removeAttribute('data-bc'));
  const kinds = {col: 'explorer', planner: 'player', layout: 'picker'};
  const count = {explorer: 0, player: 0, picker: 0};
  const tags = [];
  for (const kind of ['picker', 'explorer', 'player']) {
    for (const dd of document.querySelectorAll('.widget-dropdown')) {
      const label = dd.querySelector('.widget-label');
      if (!label || kinds[label.textContent.trim()] !== kind) continue;
      const root = dd.closest('.widget-vbox');
      if (!root || root.hasAttribute('data-bc')) continue;
      const tag = kind + '-' + count[kind]++;
      root.setAttribute('data-bc', tag);
      const picker = root.parentElement && root.parentElement.closest('[data-bc^=picker]');
      tags.push({tag, in_picker: picker ? picker.getAttribute('data-bc') : null});
    }
  }
  return tags;
}"""

IMAGES_JS = """async (root) => {
  // Every <img> under a widget: its shown size, its own size, whether it is visible, a hash of its bytes.
  const out = [];
  for (const img of root.querySelectorAll('img')) {
    const r = img.getBoundingClientRect();
    let hash = null, bytes = 0;
    if (img.src) {
      try {
        const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let h = 2166136261;
        for (const b of buf) { h ^= b; h = Math.imul(h, 16777619) >>> 0; }
        hash = h.toString(16); bytes = buf.length;
      } catch (e) { hash = 'unreadable'; }
    }
    const visible = img.checkVisibility({visibilityProperty: true, opacityProperty: true}) && r.width > 0;
    out.push({w: r.width, h: r.height, nw: img.naturalWidth, nh: img.naturalHeight, visible, hash, bytes,
              complete: img.complete});
  }
  return out;
}"""

STATE_JS = """(root) => {
  // What a person reads off a widget: its HTML text, dropdown values, buttons pressed, boxes ticked, slider.
  const plain = t => (t || '').replace(/\u00a0/g, ' ');
  const text = plain([...root.querySelectorAll('.widget-html-content')].map(e => e.innerText).join('\\n'));
  const dropdowns = {};
  for (const dd of root.querySelectorAll('.widget-dropdown')) {
    const label = dd.querySelector('.widget-label'), sel = dd.querySelector('select');
    if (label && sel) dropdowns[label.textContent.trim()] = plain(sel.options[sel.selectedIndex]?.text);
  }
  const pressed = [...root.querySelectorAll('.widget-toggle-button.mod-active')].map(b => b.innerText.trim());
  const boxes = {};
  for (const cb of root.querySelectorAll('.widget-checkbox')) {
    boxes[cb.innerText.trim()] = cb.querySelector('input').checked;
  }
  const handle = root.querySelector('.widget-slider .noUi-handle');
  const slider = handle ? {now: Number(handle.getAttribute('aria-valuenow')),
                           max: Number(handle.getAttribute('aria-valuemax'))} : null;
  return {text, dropdowns, pressed, boxes, slider, all: plain(root.innerText)};
}"""

DONE_JS = """() => {
  // The visible notebook's code-cell prompts: '[3]:', '[*]:' (running or queued), '[ ]:' (not run).
  const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => !p.classList.contains('lm-mod-hidden'));
  if (!panel) return null;
  return [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim());
}"""

OUTPUTS_JS = """() => {
  // Text of every output: what a person would read as an error or a widget's raw text form.
  return [...document.querySelectorAll('.jp-OutputArea-output')].map(o => ({
    mime: o.getAttribute('data-mime-type') || '', text: o.innerText.slice(0, 400)}));
}"""


# ── bookkeeping ──────────────────────────────────────────────────────────────────────────────────────────────────


class Checks:
    """Named pass/fail results with a detail each; a failure does not stop the run."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []  # (check, 'pass' / 'FAIL' / 'note', detail)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, "pass" if ok else "FAIL", detail))
        print(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f" - {detail}" if detail and not ok else ""), flush=True)
        return bool(ok)

    def note(self, name: str, detail: str) -> None:
        self.rows.append((name, "note", detail))
        print(f"  note {name} - {detail}", flush=True)

    def table(self) -> str:
        width = max(len(n) for n, _, _ in self.rows)
        lines = [f"{'check':{width}s}  result", f"{'-' * width}  ------"]
        for name, result, detail in self.rows:
            lines.append(f"{name:{width}s}  {result}" + (f": {detail}" if result != "pass" else ""))
        return "\n".join(lines)

    @property
    def failed(self) -> int:
        return sum(result == "FAIL" for _, result, _ in self.rows)


def wait_for(fn, timeout: float, every: float = 0.2):
    """fn()'s first truthy value within timeout seconds, else its last value."""
    end = time.time() + timeout
    value = fn()
    while not value and time.time() < end:
        time.sleep(every)
        value = fn()
    return value


# ── the server ───────────────────────────────────────────────────────────────────────────────────────────────────


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_copy(tmp: Path) -> Path:
    """A folder that looks like the repository to the notebooks: the module and assets linked, the two notebooks
    copied with their outputs and saved widget state removed (so all that shows comes from this run)."""
    root = tmp / "repo"
    (root / "notebooks").mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name not in {"notebooks", ".git"}:
            (root / entry.name).symlink_to(entry)
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        nb["metadata"].pop("widgets", None)
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
        (root / "notebooks" / name).write_text(json.dumps(nb, indent=1))
    return root


def start_server(root: Path, tmp: Path, port: int, token: str, log) -> subprocess.Popen:
    settings = tmp / "lab-settings"
    for rel, value in SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value))
    env = dict(
        os.environ,
        GRIDJEPA_PROFILE="smoke",
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
        "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True",
        "--LabApp.extension_manager=readonly",
    ]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def api(base: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


def descendants(pid: int) -> list[int]:
    """Every process below pid (kernels run in sessions of their own, so the server's group misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_server(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut the kernels and the server down through the API, then kill whatever of them is left."""
    below = descendants(proc.pid)
    try:
        api(base, token, "/api/shutdown", "POST")
        proc.wait(timeout=15)
    except Exception:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [proc.pid, *below]:  # the server's group, then each kernel's (a session leader: its group too)
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        if sig == signal.SIGTERM:
            time.sleep(1)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# ── the kernel's messages, as the browser receives them ─────────────────────────────────────────────────────────


def kernel_messages(payload) -> list[dict]:
    """The Jupyter messages in one websocket frame: JSON text, or the v1 binary protocol (offsets, then parts)."""
    try:
        if isinstance(payload, str):
            msg = json.loads(payload)
            return [{"header": msg.get("header", {}), "content": msg.get("content", {})}]
        n = struct.unpack_from("<Q", payload, 0)[0]
        offsets = struct.unpack_from(f"<{n}Q", payload, 8)
        parts = [payload[offsets[i] : offsets[i + 1] if i + 1 < n else len(payload)] for i in range(n)]
        return [{"header": json.loads(parts[1]), "content": json.loads(parts[4])}]
    except Exception:
        return []


# ── driving the notebooks ────────────────────────────────────────────────────────────────────────────────────────


class Session:
    """One JupyterLab page in Chromium, with what it reports: console errors, page errors, kernel errors."""

    def __init__(self, browser, base: str, token: str, checks: Checks, out: Path):
        self.base, self.token, self.checks, self.out = base, token, checks, out
        self.context = browser.new_context(viewport={"width": 1500, "height": 1100}, device_scale_factor=1)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.kernel: list[str] = []
        self.outside: set[str] = set()  # resources from other hosts, which this machine cannot reach
        self.phase = "load"
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.console.append(f"[{self.phase}] page error: {e}"))
        self.page.on("websocket", self._watch)

    def _console(self, m) -> None:
        if m.type != "error":
            return
        host = urllib.parse.urlparse(m.location.get("url") or "").hostname
        if m.text.startswith("Failed to load resource") and host not in (None, "127.0.0.1", "localhost"):
            self.outside.add(m.location["url"])
        else:
            self.console.append(f"[{self.phase}] {m.text}")

    def _watch(self, ws):
        def frame(payload):
            for msg in kernel_messages(payload):
                kind, content = msg["header"].get("msg_type"), msg["content"]
                if kind == "error":
                    self.kernel.append(f"[{self.phase}] {content.get('ename')}: {content.get('evalue')}")
                elif kind == "stream" and content.get("name") == "stderr" and self.phase != "run":
                    self.kernel.append(f"[{self.phase}] stderr: {content.get('text', '')[:300]}")

        ws.on("framereceived", frame)

    def kernel_idle(self) -> bool:
        kernels = api(self.base, self.token, "/api/kernels")
        return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)

    def run_all(self, name: str, timeout: float) -> bool:
        page = self.page
        page.goto(f"{self.base}/lab/workspaces/bc-{name[:2]}/tree/notebooks/{name}?reset&token={self.token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
        if not wait_for(self.kernel_idle, 120, 1):
            return self.checks.add(f"{name[:2]}: kernel starts", False, "no idle kernel after 120 s")
        self.phase = "run"
        t0 = time.time()
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        time.sleep(3)
        idle_polls = 0
        while time.time() - t0 < timeout:
            prompts = page.evaluate(DONE_JS) or []
            busy = any("*" in p for p in prompts)
            idle_polls = idle_polls + 1 if not busy and self.kernel_idle() else 0
            if idle_polls >= 3:
                break
            time.sleep(1)
        prompts = page.evaluate(DONE_JS) or []
        ran = sum(bool(re.fullmatch(r"\[\d+\]:", p)) for p in prompts)
        seconds = time.time() - t0
        self.phase = "drive"
        ok = self.checks.add(
            f"{name[:2]}: Run All Cells runs every code cell",
            ran == len(prompts) and idle_polls >= 3,
            f"{ran} of {len(prompts)} cells ran in {seconds:.0f} s",
        )
        print(f"    ({name}: {ran} of {len(prompts)} code cells in {seconds:.0f} s)", flush=True)
        return ok

    def outputs_clean(self, name: str) -> None:
        bad = [
            o["text"][:160].replace("\n", " ")
            for o in self.page.evaluate(OUTPUTS_JS)
            if WIDGET_TEXT.search(o["text"]) or "stderr" in o["mime"]
        ]
        self.checks.add(f"{name[:2]}: no output shows an error or a widget's text form", not bad, " | ".join(bad[:3]))

    def reports_clean(self, name: str) -> None:
        self.checks.add(f"{name[:2]}: the kernel reported no error", not self.kernel, " | ".join(self.kernel[:3]))
        self.checks.add(
            f"{name[:2]}: the browser console has no errors", not self.console, " | ".join(self.console[:3])
        )
        if self.outside:
            self.checks.note(f"{name[:2]}: not loaded (another host, unreachable here)", " ".join(sorted(self.outside)))

    def close(self) -> None:
        self.context.close()


class Widget:
    """One tagged widget box on the page, read and driven like a person would."""

    def __init__(self, session: Session, tag: str):
        self.s, self.tag = session, tag
        self.root = session.page.locator(f'[data-bc="{tag}"]')

    def state(self) -> dict:
        return self.root.evaluate(STATE_JS)

    def images(self) -> list[dict]:
        return self.root.evaluate(IMAGES_JS)

    def dropdown(self, label: str):
        box = self.root.locator(".widget-dropdown").filter(
            has=self.s.page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$"))
        )
        return box.locator("select").first

    def options(self, label: str) -> list[str]:
        return self.dropdown(label).evaluate("s => [...s.options].map(o => o.text.replace(/\\u00a0/g, ' '))")

    def select(self, label: str, text: str) -> None:
        self.dropdown(label).select_option(index=self.options(label).index(text))

    def settle(self, timeout: float = 30) -> None:
        """Wait until the kernel has handled what the browser sent and the images have loaded."""
        time.sleep(0.15)
        wait_for(self.s.kernel_idle, timeout, 0.15)
        wait_for(lambda: all(i["complete"] for i in self.images()), 10, 0.1)

    def natural_size(self, what: str, checks: Checks, only_visible: bool = True) -> None:
        bad = []
        for k, im in enumerate(self.images()):
            if only_visible and not im["visible"]:
                continue
            if abs(im["w"] - im["nw"]) > 1 or abs(im["h"] - im["nh"]) > 1:
                bad.append(f"image {k} shown {im['w']:.0f}x{im['h']:.0f}, its PNG {im['nw']}x{im['nh']}")
        checks.add(f"{what}: images at their own pixel size", not bad, "; ".join(bad))

    def shot(self, path: Path) -> None:
        self.root.scroll_into_view_if_needed()
        self.root.screenshot(path=str(path))
        print(f"    screenshot: {path}", flush=True)


def cell_name(col: int, row: int) -> str:
    return f"({col}, {row})"


def drive_explorer(w: Widget, checks: Checks, out: Path, first_open: bool) -> bool:
    """Every cell and every action; a wall cell if there is one; a bump into a wall and into the edge.
    Returns whether a wall cell was found (and shot)."""
    name = f"01 {w.tag}"
    w.settle()
    cols, rows = w.options("col"), w.options("row")
    actions = [b.strip() for b in w.root.locator(".widget-toggle-button").all_inner_texts()]
    checks.add(
        f"{name}: shows col, row, {len(actions)} actions, an image, a label",
        cols and rows and len(actions) == 4 and len(w.images()) == 1 and w.state()["text"],
        f"cols {cols}, rows {rows}, actions {actions}, {len(w.images())} images",
    )
    w.natural_size(name + " at first", checks)

    # walk every cell (row by row), watching the label and the image
    walls, free, stale, unnamed, hidden = [], [], [], [], []
    before = w.images()[0]["hash"]
    for r in rows:
        w.select("row", r)
        for c in cols:
            w.select("col", c)
            w.settle()
            st, im = w.state(), w.images()[0]
            if "is a wall" in st["text"]:
                walls.append((c, r))
                continue
            free.append((c, r))
            if cell_name(c, r) not in st["text"]:
                unnamed.append(f"{cell_name(c, r)}: {st['text'][:80]!r}")
            if not im["visible"]:
                hidden.append(cell_name(c, r))
            if im["hash"] == before and len(free) > 1:
                stale.append(cell_name(c, r))
            before = im["hash"]
    checks.add(f"{name}: each free cell's label names it", not unnamed, "; ".join(unnamed[:3]))
    checks.add(f"{name}: the image changes with each free cell", not stale, f"unchanged at {stale[:5]}")
    checks.add(f"{name}: the frame shows on every free cell", not hidden, f"hidden at {hidden[:5]}")

    # every action from a middle cell: the label names it and the image changes
    c, r = free[len(free) // 2]
    w.select("col", c)
    w.select("row", r)
    w.settle()
    seen, wrong = set(), []
    for a in actions:
        w.root.locator(".widget-toggle-button", has_text=re.compile(f"^\\s*{a}\\s*$")).click()
        w.settle()
        st, im = w.state(), w.images()[0]
        if st["pressed"] != [a] or f"{a}" not in st["text"] or cell_name(c, r) not in st["text"]:
            wrong.append(f"{a}: pressed {st['pressed']}, label {st['text'][:80]!r}")
        seen.add(im["hash"])
    checks.add(f"{name}: each action button is pressed and named in the label", not wrong, "; ".join(wrong))
    checks.add(
        f"{name}: the 4 actions from {cell_name(c, r)} show 4 different images",
        len(seen) == len(actions),
        f"{len(seen)} distinct images",
    )
    w.natural_size(name + " after the actions", checks)
    if first_open:
        w.shot(out / "01_explorer.png")

    # a bump into the board's edge: the left-most column, moving left
    edge = next(((c, r) for c, r in free if c == cols[0]), None)
    if edge:
        w.select("col", edge[0])
        w.select("row", edge[1])
        w.root.locator(".widget-toggle-button", has_text=re.compile(r"^\s*left\s*$")).click()
        w.settle()
        text = w.state()["text"]
        checks.add(
            f"{name}: moving left off {cell_name(*edge)} says the board's edge, not a wall",
            "edge" in text and "wall" not in text,
            f"label {text!r}",
        )

    if not walls:
        return False
    # a wall cell: the label says so and the frame is hidden; a bump into that wall says 'wall'
    wc, wr = walls[0]
    w.select("col", wc)
    w.select("row", wr)
    w.settle()
    st, im = w.state(), w.images()[0]
    checks.add(
        f"{name}: the wall cell {cell_name(wc, wr)} says 'is a wall'",
        "is a wall" in st["text"],
        f"label {st['text']!r}",
    )
    checks.add(
        f"{name}: the wall cell {cell_name(wc, wr)} hides the frame",
        not im["visible"],
        f"an image of {im['w']:.0f}x{im['h']:.0f} px is shown",
    )
    w.shot(out / "01_explorer_wall.png")
    moves = {"up": (0, 1), "down": (0, -1), "left": (1, 0), "right": (-1, 0)}  # from the neighbour into the wall
    ci, ri = cols.index(wc), rows.index(wr)
    for a, (dc, dr) in moves.items():
        if 0 <= ci + dc < len(cols) and 0 <= ri + dr < len(rows) and (cols[ci + dc], rows[ri + dr]) in free:
            nc, nr = cols[ci + dc], rows[ri + dr]
            w.select("col", nc)
            w.select("row", nr)
            w.root.locator(".widget-toggle-button", has_text=re.compile(f"^\\s*{a}\\s*$")).click()
            w.settle()
            st, im = w.state(), w.images()[0]
            checks.add(
                f"{name}: {a} from {cell_name(nc, nr)} into the wall says 'wall', and the frame is back",
                "wall" in st["text"] and "edge" not in st["text"] and im["visible"],
                f"label {st['text']!r}, frame visible {im['visible']}",
            )
            break
    return True


def slider_to(w: Widget, value: int) -> None:
    """Drag the step slider's handle to value, as a hand would."""
    handle = w.root.locator(".widget-slider .noUi-handle").first
    track = w.root.locator(".widget-slider .noUi-target").first
    st = w.state()["slider"]
    box, hb = track.bounding_box(), handle.bounding_box()
    x = box["x"] + box["width"] * (value / max(st["max"], 1))
    page = w.s.page
    page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
    page.mouse.down()
    page.mouse.move(x, hb["y"] + hb["height"] / 2, steps=8)
    page.mouse.up()


def playing(w: Widget) -> bool:
    """Whether the Play button shows 'pause' (the episode is playing)."""
    return w.root.locator(".widget-play i.fa-pause").count() > 0


def drive_player(w: Widget, checks: Checks, out: Path, shoot: bool, planners: str = "all") -> None:
    name = f"05 {w.tag}"
    w.settle(120)
    st, ims = w.state(), w.images()
    checks.add(
        f"{name}: shows planner/start/goal, 2 memory boxes, a step slider, a frame and a map",
        {"planner", "start", "goal"} <= set(st["dropdowns"])
        and len(st["boxes"]) == 2
        and st["slider"]
        and len(ims) == 2
        and st["text"],
        f"dropdowns {st['dropdowns']}, boxes {st['boxes']}, {len(ims)} images",
    )
    w.natural_size(name + " at first", checks)
    board = ims[1]
    checks.add(
        f"{name}: the map keeps its shape",
        board["nh"] > 0 and board["h"] > 0 and abs(board["w"] / board["h"] - board["nw"] / board["nh"]) < 0.02,
        f"shown {board['w']:.0f}x{board['h']:.0f}, PNG {board['nw']}x{board['nh']}",
    )

    # Play: the slider walks to the end and stops there, the text following; a pause mid-episode, and a screenshot
    last, texts = st["slider"]["max"], {st["text"]}
    paused = last < 4
    play = w.root.locator(".widget-play button").first
    play.click()
    end = time.time() + 0.6 * last + 30
    while time.time() < end and (w.state()["slider"]["now"] < last or playing(w)):
        texts.add(w.state()["text"])
        if not paused and w.state()["slider"]["now"] >= 3:  # pause mid-episode: it holds; a screenshot; play on
            play.click()
            w.settle()
            held = w.state()
            time.sleep(1.5)
            checks.add(
                f"{name}: the pause button holds the episode",
                not playing(w) and w.state()["slider"] == held["slider"],
                f"slider {held['slider']} -> {w.state()['slider']}",
            )
            if shoot:
                w.shot(out / "05_player_mid_episode.png")
            paused = True
            play.click()
        time.sleep(0.1)
    w.settle()
    st = w.state()
    checks.add(
        f"{name}: Play walks the slider to the episode's end ({last} steps) and stops",
        st["slider"]["now"] == last and not playing(w),
        f"slider at {st['slider']}, playing {playing(w)}",
    )
    checks.add(
        f"{name}: during Play the text follows the steps",
        len(texts) >= min(last, 4) and re.search(rf"\b{last}\b", st["text"]) is not None,
        f"{len(texts)} different texts over {last} steps; at the end {st['text'][:100]!r}",
    )

    # the planner: each one (or the next one) named in the text, with its scores or a note that it has none
    options = w.options("planner")
    current = w.state()["dropdowns"]["planner"]
    todo = [o for o in options if o != current][: None if planners == "all" else 1]
    wrong, solving = [], [current] if "solved in" in w.state()["text"] else []
    for option in todo:
        w.select("planner", option)
        w.settle(180)
        st = w.state()
        scores = re.search(r"\d\.\d\d", st["text"]) is not None or "no scores" in st["text"]
        if option not in st["text"] or not scores or st["slider"]["now"] != 0 or "nan" in st["text"]:
            wrong.append(f"{option}: slider {st['slider']}, {st['text'][:140]!r}")
        if "solved in" in st["text"]:
            solving.append(option)
    checks.add(
        f"{name}: each planner ({len(todo)}) is named with its scores or 'no scores'", not wrong, "; ".join(wrong[:2])
    )

    # the slider by hand, on an episode that reaches its goal: the end shows another frame, 0 the start again,
    # the arrow key one step on
    if solving:
        w.select("planner", solving[0])
        w.settle(180)
        start_frame, last = w.images()[0]["hash"], w.state()["slider"]["max"]
        slider_to(w, last)
        w.settle()
        st, ims = w.state(), w.images()
        checks.add(
            f"{name}: dragging the slider to the end of '{solving[0]}' shows the goal reached",
            st["slider"]["now"] == last and ims[0]["hash"] != start_frame and "reached" in st["text"],
            f"slider {st['slider']}, text {st['text'][:100]!r}",
        )
        slider_to(w, 0)
        w.settle()
        st, ims = w.state(), w.images()
        checks.add(
            f"{name}: dragging the slider back to 0 shows the start frame",
            st["slider"]["now"] == 0 and ims[0]["hash"] == start_frame,
            f"slider {st['slider']}",
        )
        w.root.locator(".widget-slider .noUi-handle").first.press("ArrowRight")
        w.settle()
        st1, ims1 = w.state(), w.images()
        checks.add(
            f"{name}: the arrow key moves the slider one step, the frame and the text with it",
            st1["slider"]["now"] == 1 and ims1[0]["hash"] != start_frame and st1["text"] != st["text"],
            f"slider {st1['slider']}, text {st1['text'][:80]!r}",
        )
        w.natural_size(name + " while stepping", checks)
    else:
        checks.add(f"{name}: a planner that reaches the goal, to step through", False, f"none of {options}")

    # the memory boxes: ticking one re-plans, so the episode starts again at step 0
    for box in list(w.state()["boxes"]):
        if w.state()["slider"]["max"] > 0:
            slider_to(w, w.state()["slider"]["max"])
            w.settle()
        was = w.state()
        w.root.locator(".widget-checkbox", has_text=box).locator("input").click()
        w.settle(180)
        now = w.state()
        checks.add(
            f"{name}: ticking '{box}' re-plans from step 0",
            now["boxes"][box] != was["boxes"][box] and now["slider"]["now"] == 0 and "Error" not in now["text"],
            f"box {was['boxes'][box]} -> {now['boxes'][box]}, slider {was['slider']} -> {now['slider']}",
        )
        w.root.locator(".widget-checkbox", has_text=box).locator("input").click()
        w.settle(180)

    # start and goal: the frame (start) and the map (path, goal) change, and the text
    for label, image in (("start", 0), ("goal", 1)):
        st, ims = w.state(), w.images()
        other = "goal" if label == "start" else "start"
        choice = next(
            o for o in reversed(w.options(label)[1:-1]) if o not in (st["dropdowns"][label], st["dropdowns"][other])
        )
        w.select(label, choice)
        w.settle(180)
        st2, ims2 = w.state(), w.images()
        checks.add(
            f"{name}: a new {label} {choice} redraws the {'frame' if image == 0 else 'map'} and the text",
            st2["dropdowns"][label] == choice
            and ims2[image]["hash"] != ims[image]["hash"]
            and st2["text"] != st["text"],
            f"{label} {st2['dropdowns'][label]}, text {st2['text'][:100]!r}",
        )
    w.natural_size(name + " after the changes", checks)


def drive_picker(s: Session, tag: str, checks: Checks, out: Path) -> None:
    picker = Widget(s, tag)
    picker.settle(120)
    inner = next((t["tag"] for t in s.page.evaluate(TAG_JS) if t["in_picker"] == tag), None)
    checks.add("05 layout picker: shows a player under the layout dropdown", inner is not None)
    if inner is None:
        return
    before = Widget(s, inner).images()
    current = picker.state()["dropdowns"]["layout"]
    others = [o for o in picker.options("layout") if o != current]
    choice = "maze" if "maze" in others else others[0]
    picker.select("layout", choice)

    def redrawn():
        tags = s.page.evaluate(TAG_JS)
        t = next((t["tag"] for t in tags if t["in_picker"] == tag), None)
        if t is None:
            return None
        ims = Widget(s, t).images()
        return t if len(ims) == 2 and ims[1]["hash"] != before[1]["hash"] and all(i["complete"] for i in ims) else None

    picker.settle(180)
    inner = wait_for(redrawn, 60, 0.5)
    checks.add(f"05 layout picker: choosing {choice} redraws the player's map", bool(inner))
    if not inner:
        return
    w = Widget(s, inner)
    w.settle()
    text = picker.state()["all"]
    checks.add("05 layout picker: no error or widget text form", not WIDGET_TEXT.search(text), text[:160])
    w.natural_size("05 layout picker's player", checks)
    picker.shot(out / "05_layout_picker.png")
    w.select("planner", w.options("planner")[-1])
    w.settle(180)
    checks.add(
        "05 layout picker: its player re-plans with another planner",
        w.options("planner")[-1] in w.state()["text"],
        w.state()["text"][:120],
    )


def check_notebook(browser, base: str, token: str, name: str, checks: Checks, out: Path, timeout: float) -> None:
    s = Session(browser, base, token, checks, out)
    try:
        if not s.run_all(name, timeout):
            s.page.screenshot(path=str(out / f"{name[:2]}_run_failed.png"), full_page=True)
        tags = wait_for(lambda: s.page.evaluate(TAG_JS), 60, 1) or []
        kinds = [t["tag"].split("-")[0] for t in tags]
        if name.startswith("01"):
            checks.add("01: transition explorers found", kinds.count("explorer") >= 1, f"found {tags}")
            first, wall_shot = True, False
            for t in (t for t in tags if t["tag"].startswith("explorer")):
                wall_shot |= drive_explorer(Widget(s, t["tag"]), checks, out, first)
                first = False
            checks.add("01: an explorer on a layout with walls", wall_shot, "no explorer found a wall cell")
        else:
            players = [t for t in tags if t["tag"].startswith("player") and not t["in_picker"]]
            pickers = [t for t in tags if t["tag"].startswith("picker")]
            checks.add("05: planning players and a layout picker found", players and pickers, f"found {tags}")
            for k, t in enumerate(players):
                drive_player(Widget(s, t["tag"]), checks, out, shoot=k == 0, planners="all" if k == 0 else "next")
            for t in pickers:
                drive_picker(s, t["tag"], checks, out)
        s.outputs_clean(name)
    except Exception as e:
        checks.add(f"{name[:2]}: the check ran to its end", False, f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
        with contextlib.suppress(Exception):
            s.page.screenshot(path=str(out / f"{name[:2]}_exception.png"), full_page=True)
    finally:
        time.sleep(1)
        s.reports_clean(name)
        with contextlib.suppress(Exception):  # the browser may be gone already (a TERM reaches its group too)
            s.close()
            for session in api(base, token, "/api/sessions") or []:  # free the kernel before the next notebook
                api(base, token, f"/api/sessions/{session['id']}", "DELETE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gridjepa_browser"), help="screenshots go here")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--only", choices=["01", "05"], help="check one notebook")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds for Run All Cells, per notebook")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's TERM still runs the clean-up below

    args.out.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="gridjepa_browser_"))
    port, token = free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    server = None
    log = open(args.out / "jupyter.log", "w")
    try:
        server = start_server(make_copy(tmp), tmp, port, token, log)

        def up():
            try:
                return api(base, token, "/api/status") is not None
            except (urllib.error.URLError, ConnectionError, OSError):
                return server.poll() is not None  # stop waiting if it died

        if not wait_for(up, 90, 0.5) or server.poll() is not None:
            checks.add("JupyterLab starts", False, f"see {args.out / 'jupyter.log'}")
        else:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
                try:
                    for name in NOTEBOOKS:
                        if args.only is None or name.startswith(args.only):
                            print(f"{name}:", flush=True)
                            check_notebook(browser, base, token, name, checks, args.out, args.run_timeout)
                finally:
                    with contextlib.suppress(Exception):
                        browser.close()
    finally:
        if server is not None:
            stop_server(server, base, token)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{checks.table()}\n\n{len(checks.rows) - checks.failed} of {len(checks.rows)} checks passed in "
        f"{time.time() - t0:.0f} s; screenshots in {args.out}"
    )
    return 1 if checks.failed or not checks.rows else 0


if __name__ == "__main__":
    sys.exit(main())
