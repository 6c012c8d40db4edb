// The page's figures in headless Chromium (on WebGPU unless the query names a device): page load
// (navigation to the data checked and the page ready), the first chunk after pressing Train,
// seconds an epoch, the module build (build=plain in the query: the one without WebAssembly
// SIMD) and the test accuracy; then a drawn digit and a screenshot of the page.
//
// Usage: node web/tests/measure.mjs <base-url> <screenshot-path> [query]
//   e.g. node web/tests/measure.mjs http://127.0.0.1:8000/ web/screenshot.png "epochs=2"
// Serve web/dist first (bash web/build.sh). Prints one JSON line `MEASURED {...}`.
//
// Contract: a measurement, not a test: it fails (exit 1) only when the page does not get as far
// as a result.

import { launch, WEBGPU } from './chromium.mjs';

const [base, screenshotPath, query = 'epochs=1'] = process.argv.slice(2);
if (!base || !screenshotPath) {
  console.error('usage: node web/tests/measure.mjs <base-url> <screenshot-path> [query]');
  process.exit(2);
}

const browser = await launch(WEBGPU);
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  const search = new URLSearchParams(query);
  if (!search.has('device')) search.set('device', 'webgpu');
  await page.goto(new URL(`?${search}`, base).href, { waitUntil: 'load' });
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), undefined, { timeout: 120_000 });
  await page.click('#train');
  await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state), undefined,
    { timeout: 3_600_000, polling: 500 });
  const result = await page.evaluate(() => window.gpuMnistResult || null);
  if (!result) throw new Error(`no result: ${await page.textContent('#message')}`);
  const t = await page.evaluate(() => window.gpuMnistTimings);
  const epochs = t.run.epochs.map((e) => +e.seconds.toFixed(2));
  // A digit for the screenshot: a "3".
  await page.locator('#draw').scrollIntoViewIfNeeded();
  const box = await page.locator('#draw').boundingBox();
  const at = ([fx, fy]) => [box.x + fx * box.width, box.y + fy * box.height];
  const stroke = [[0.3, 0.22], [0.55, 0.18], [0.68, 0.3], [0.5, 0.48], [0.7, 0.62], [0.6, 0.8], [0.3, 0.8]];
  await page.mouse.move(...at(stroke[0]));
  await page.mouse.down();
  for (const p of stroke.slice(1)) await page.mouse.move(...at(p), { steps: 8 });
  await page.mouse.up();
  await page.waitForTimeout(500);
  await page.screenshot({ path: screenshotPath, fullPage: true });
  const build = await page.evaluate(() => window.gpuMnistBuild);
  const wasm = await page.evaluate(async (dir) => (await fetch(`${dir}/gpu_mnist_web_bg.wasm`)).headers.get('content-length'),
    build === 'simd128' ? 'pkg-simd' : 'pkg');
  console.log('MEASURED ' + JSON.stringify({
    chromium: browser.version(),
    page_ready_s: +(t.states.ready / 1000).toFixed(2),
    first_chunk_after_train_s: +((t.run.firstChunk - t.run.pressed) / 1000).toFixed(2),
    epoch_s: epochs,
    build,
    wasm_bytes: Number(wasm),
    result,
  }));
} finally {
  await browser.close();
}
