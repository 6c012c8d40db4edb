#!/usr/bin/env bash
# The browser page's test: installs Debian's Chromium and playwright-core when missing, builds the
# page (web/build.sh --no-serve), serves web/dist on a loopback port, and runs tests/browser.mjs
# against it in headless Chromium with WebGPU on its software adapter (SwiftShader). Fails, never
# skips, when any of that is missing or fails. Model files cross both ways: one from
# `gpu-mnist train --save` is loaded in the page, and the page's own goes to `gpu-mnist evaluate`.
# The screenshot goes to web/dist/screenshot.png.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "web/tests/run.sh: installing Debian's chromium"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi
if [ ! -d node_modules/playwright-core ]; then
    npm ci --no-audit --no-fund --silent
fi

bash build.sh --no-serve

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory dist >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
    sleep 0.1
done

# A model file from the native binary, for the page to load; the page's own model file goes the
# other way, to `gpu-mnist evaluate`.
(cd .. && cargo run --quiet -- train --device cpu --hidden 64 --epochs 1 --train-limit 5000 --test-limit 500 \
    --data web/dist/data --save web/dist/native-model.safetensors --out web/dist/native-run >/dev/null)
NATIVE_MODEL=dist/native-model.safetensors PAGE_MODEL_OUT=dist/page-model.safetensors \
    node tests/browser.mjs "http://127.0.0.1:$port/" dist/screenshot.png
(cd .. && cargo run --quiet -- evaluate --device cpu --data web/dist/data --model web/dist/page-model.safetensors --test-limit 500)
echo "web/tests/run.sh: gpu-mnist evaluate read the page's model file"
