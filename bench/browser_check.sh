#!/usr/bin/env bash
# The notebooks' widgets in a real browser (headless Chromium): runs notebooks 01 and 05 in JupyterLab on a copy,
# drives the transition explorer, the planning players and the layout picker, and checks what is shown.
# Installs what is missing first (Debian's chromium, playwright and jupyterlab from PyPI), then runs
# bench/browser_check.py under the shared CPU lock. Arguments go to it: --out DIR (screenshots), --only 01|05.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
python -c "import playwright, jupyterlab, jupyterlab_widgets" 2>/dev/null || python -m pip install -q playwright jupyterlab jupyterlab_widgets
exec flock /tmp/gridjepa_cpu.lock python bench/browser_check.py "$@"
