// The web page's end-to-end check in headless Chromium on WebGPU.
//
// Usage: node web/tests/browser.mjs <base-url> <screenshot-path>
//   e.g. node web/tests/browser.mjs http://127.0.0.1:8765/ web/screenshot.png
// The base URL serves web/dist (index.html, app.js, engine.js, worker.js, style.css, pkg/,
// pkg-simd/, and the four MNIST files under data/). Chromium is $CHROMIUM, else
// /usr/bin/chromium; WebGPU runs on SwiftShader.
//
// Contract: prints one line "browser: ..." per check and "browser: all checks passed" at the
// end (exit 0); on the first failure prints "browser: FAILED: <why>" and exits 1. It checks that:
// a short run trains on WebGPU (not a fallback) to a test accuracy of at least 0.85 and writes
// its result line to #result; a second Train press while training says "already running"; Stop
// stops the run with a "Stopped" message and the page keeps working; a drawn digit gets ten
// probabilities that sum to 1; the page logged no console error up to there; and a text file, a
// truncated model file and a corrupt data file are each refused with a message naming the file,
// after which the previous model still reads the drawing; a model file from `gpu-mnist train
// --save` ($NATIVE_MODEL) loads and reads a drawing; and, in a second browser without WebGPU, the
// page says so in one sentence and trains on the CPU path (its WebAssembly SIMD build); the
// presets train there; a run too large for wasm memory is refused; and a panic and an
// out-of-memory abort inside the module (on the build without SIMD) are each reported in one
// sentence, after which the page still has its model and trains again without a reload. The page's model file is written to
// $PAGE_MODEL_OUT for `gpu-mnist evaluate`. A full-page screenshot is taken after the drawing,
// before the bad inputs.

import { readFileSync, writeFileSync } from 'node:fs';

import { launch, NO_WEBGPU, WEBGPU } from './chromium.mjs';

const [base, screenshotPath] = process.argv.slice(2);
if (!base || !screenshotPath) {
  console.error('usage: node web/tests/browser.mjs <base-url> <screenshot-path>');
  process.exit(2);
}

const TRAIN_QUERY = '?train_limit=2000&test_limit=500&epochs=1&batch_size=16&autostart=1&device=webgpu';
const MIN_ACCURACY = 0.85;
const DATA_DIR = 'data/';

function log(line) {
  console.log(`browser: ${line}`);
}

class Failure extends Error {}

function fail(why) {
  throw new Failure(why);
}

/** What the page says now: its state and message, for failure reports. */
async function pageSays(page) {
  try {
    return await page.evaluate(() => {
      const message = document.getElementById('message');
      const status = document.getElementById('status');
      return `state=${document.body.dataset.state}; #message="${message ? message.textContent : ''}"; ` +
        `#status="${status ? status.textContent : ''}"`;
    });
  } catch (error) {
    return `(page not readable: ${error.message})`;
  }
}

/** page.waitForFunction with a failure that says what was awaited and what the page shows. */
async function waitFor(page, what, fn, arg, timeoutMs) {
  try {
    return await page.waitForFunction(fn, arg, { timeout: timeoutMs, polling: 100 });
  } catch (error) {
    if (error instanceof Failure) throw error;
    fail(`${what}: not seen within ${Math.round(timeoutMs / 1000)} s (${await pageSays(page)})`);
  }
}

/** Wait until a run has written #result, or the page says it failed. */
async function waitForResult(page, what, timeoutMs) {
  return waitFor(
    page,
    what,
    () => (document.getElementById('result')?.textContent || '').trim() !== '' ||
      document.body.dataset.state === 'error',
    undefined,
    timeoutMs,
  );
}

/** The text of #message and its kind ("error" or "info"). */
async function message(page) {
  return page.evaluate(() => {
    const el = document.getElementById('message');
    return { text: el.textContent.trim(), kind: el.dataset.kind || '' };
  });
}

/** Draw a polyline on #draw with the mouse, points given as fractions of the canvas. */
async function drawStroke(page, points) {
  const box = await page.locator('#draw').boundingBox();
  if (!box) fail('the drawing canvas #draw is not visible');
  const at = ([fx, fy]) => [box.x + fx * box.width, box.y + fy * box.height];
  const [x0, y0] = at(points[0]);
  await page.mouse.move(x0, y0);
  await page.mouse.down();
  for (const point of points.slice(1)) {
    const [x, y] = at(point);
    await page.mouse.move(x, y, { steps: 8 });
  }
  await page.mouse.up();
}

/** Wait for ten #probs .bar values that sum to 1, and check them. */
async function readProbabilities(page, what) {
  await waitFor(
    page,
    `${what}: ten probability bars summing to 1`,
    () => {
      const bars = [...document.querySelectorAll('#probs .bar')];
      if (bars.length !== 10) return false;
      const sum = bars.reduce((s, b) => s + Number(b.dataset.p), 0);
      return Math.abs(sum - 1) < 1e-3;
    },
    undefined,
    30_000,
  );
  const probs = await page.$$eval('#probs .bar', (bars) => bars.map((b) => Number(b.dataset.p)));
  if (probs.length !== 10) fail(`${what}: ${probs.length} probability bars, not 10`);
  for (const [digit, p] of probs.entries()) {
    if (!Number.isFinite(p) || p < 0 || p > 1) fail(`${what}: probability of ${digit} is ${p}, not in [0, 1]`);
  }
  const sum = probs.reduce((s, p) => s + p, 0);
  if (Math.abs(sum - 1) > 1e-3) fail(`${what}: probabilities sum to ${sum}, not 1`);
  return probs;
}

/** Press Clear and wait for the ten bars to fall back to 0. */
async function clearDrawing(page, when) {
  await page.click('#clear');
  await waitFor(
    page,
    `bars back at 0 after Clear, ${when}`,
    () => [...document.querySelectorAll('#probs .bar')].every((b) => Number(b.dataset.p) === 0),
    undefined,
    10_000,
  );
}

/**
 * Press Train and wait for the run to end: it must finish (state "done", Stop disabled again) at
 * MIN_ACCURACY or better (a null accuracy fails). Returns the accuracy.
 */
async function trainAgain(page, when) {
  await page.click('#train');
  await waitFor(page, `a run ${when}`, () => ['done', 'error'].includes(document.body.dataset.state) &&
    document.getElementById('stop').disabled, undefined, 5 * 60_000);
  const line = (await page.textContent('#result')).trim();
  const result = line ? JSON.parse(line) : null;
  if ((await page.evaluate(() => document.body.dataset.state)) !== 'done' || !(result && result.test_accuracy >= MIN_ACCURACY)) {
    fail(`${when} the page reached ${line}: ${await pageSays(page)}`);
  }
  return result.test_accuracy;
}

/** Upload a file to a model-file input and expect an error message naming it. */
async function expectRefusedModel(page, name, buffer) {
  await page.setInputFiles('#model-file', { name, mimeType: 'application/octet-stream', buffer });
  await waitFor(
    page,
    `a message naming ${name}`,
    (n) => (document.getElementById('message').textContent || '').includes(n),
    name,
    30_000,
  );
  const said = await message(page);
  if (said.kind !== 'error') fail(`${name} was not refused: #message (${said.kind}) says "${said.text}"`);
  return said.text;
}

async function main() {
  const consoleErrors = [];
  const browser = await launch(WEBGPU);
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
    page.setDefaultTimeout(60_000);

    // 1. Console errors and uncaught page errors are collected from the start.
    page.on('console', (msg) => {
      if (msg.type() === 'error') consoleErrors.push(`console: ${msg.text()}`);
    });
    page.on('pageerror', (error) => consoleErrors.push(`page error: ${error.message}`));
    log(`chromium ${browser.version()}; collecting console errors`);

    // 2. A short run on WebGPU, started by the query string.
    const url = new URL(TRAIN_QUERY, base).href;
    await page.goto(url, { waitUntil: 'load' });
    log(`opened ${url}`);
    await waitForResult(page, 'a result line in #result or body[data-state=error]', 10 * 60_000);
    const state = await page.evaluate(() => document.body.dataset.state);
    if (state === 'error') fail(`the training run failed (${await pageSays(page)})`);
    const line = (await page.textContent('#result')).trim();
    let result;
    try {
      result = JSON.parse(line);
    } catch (error) {
      fail(`#result is not JSON (${error.message}): ${line}`);
    }
    if (result.device !== 'webgpu') fail(`trained on "${result.device}", not on WebGPU: ${line}`);
    if (!result.adapter || /^WebGPU adapter/.test(result.adapter)) fail(`the result does not name the adapter: ${line}`);
    log(`the WebGPU adapter, as the result names it: "${result.adapter}"`);

    // The kernels on this browser's WebGPU against the library's CPU reference.
    await compareWithReference(page, 'gpuMnistKernelCheck', 'webgpu', result.adapter);
    if (!(result.test_accuracy >= MIN_ACCURACY)) {
      fail(`test accuracy ${result.test_accuracy} is under ${MIN_ACCURACY}: ${line}`);
    }
    const exposed = await page.evaluate(() => window.gpuMnistResult);
    if (!exposed || exposed.test_accuracy !== result.test_accuracy) {
      fail('window.gpuMnistResult does not hold the parsed result line');
    }
    log(`result ${line}`);

    // The page's model file, for `gpu-mnist evaluate` (web/tests/run.sh runs it).
    if (process.env.PAGE_MODEL_OUT) {
      const bytes = await page.evaluate(() => window.gpuMnistSaveModel());
      writeFileSync(process.env.PAGE_MODEL_OUT, Buffer.from(bytes));
      log(`the page's model saved to ${process.env.PAGE_MODEL_OUT} (${bytes.length} bytes)`);
    }

    // 3. Train twice: the second press says "already running"; Stop stops the first run. Many
    //    epochs, so that the run is still going when Stop is pressed.
    await page.fill('#epochs', '50');
    await page.click('#train');
    await page.waitForTimeout(200);
    await page.click('#train');
    await waitFor(
      page,
      '"already running" in #message after a second Train press',
      () => /already running/i.test(document.getElementById('message').textContent || ''),
      undefined,
      30_000,
    );
    log(`second Train press: "${(await message(page)).text}"`);
    await page.click('#stop');
    await waitFor(
      page,
      '"Stopped" in #message after Stop, with the run over',
      () => (document.getElementById('message').textContent || '').includes('Stopped') &&
        document.body.dataset.state !== 'training',
      undefined,
      2 * 60_000,
    );
    log(`Stop: "${(await message(page)).text}" (state ${await page.evaluate(() => document.body.dataset.state)})`);

    // 4. Draw a "7" and read the ten probabilities.
    await page.click('#clear');
    await drawStroke(page, [[0.25, 0.22], [0.72, 0.22], [0.6, 0.5], [0.45, 0.82]]);
    const probs = await readProbabilities(page, 'the drawn 7');
    const best = probs.indexOf(Math.max(...probs));
    log(`probabilities of the drawn 7: [${probs.map((p) => p.toFixed(4)).join(', ')}] (reads as ${best})`);

    // 7 (checked here, before the deliberate bad inputs): no console error so far.
    if (consoleErrors.length > 0) {
      fail(`${consoleErrors.length} console error(s):\n  ${consoleErrors.join('\n  ')}`);
    }
    log('no console errors');

    // 6. The screenshot: chart, result and bars in a clean state.
    await page.screenshot({ path: screenshotPath, fullPage: true });
    log(`screenshot ${screenshotPath}`);

    // 5. Bad inputs, each refused with a message naming the file; the page keeps its model.
    const notModel = await expectRefusedModel(page, 'notes.txt', Buffer.from('hello'));
    log(`notes.txt refused: "${notModel}"`);
    const modelBytes = await page.evaluate(() => window.gpuMnistSaveModel());
    if (!Array.isArray(modelBytes) || modelBytes.length < 16) fail('window.gpuMnistSaveModel() gave no model bytes');
    const half = Buffer.from(modelBytes.slice(0, Math.floor(modelBytes.length / 2)));
    const halfSaid = await expectRefusedModel(page, 'half.safetensors', half);
    log(`half.safetensors (${half.length} of ${modelBytes.length} bytes) refused: "${halfSaid}"`);

    // A well-formed model file of a shape the page can not use (a CIFAR-sized input).
    const json = JSON.stringify({
      __metadata__: { format: 'gpu-mnist', layers: '3072,10', activation: 'relu' },
      'dense_0.kernel': { dtype: 'F32', shape: [3072, 10], data_offsets: [0, 122880] },
      'dense_0.bias': { dtype: 'F32', shape: [10], data_offsets: [122880, 122920] },
    });
    const header = Buffer.from(json.padEnd(Math.ceil(json.length / 8) * 8));
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(header.length));
    const cifar = Buffer.concat([length, header, Buffer.alloc(122920)]);
    const cifarSaid = await expectRefusedModel(page, 'cifar.safetensors', cifar);
    log(`cifar.safetensors (a 3072-10 model) refused: "${cifarSaid}"`);

    const fetchData = async (name) => {
      const response = await fetch(new URL(DATA_DIR + name, base));
      if (!response.ok) fail(`could not fetch ${DATA_DIR}${name} from the server (HTTP ${response.status})`);
      return Buffer.from(await response.arrayBuffer());
    };
    const garbage = Buffer.alloc(4096);
    for (let i = 0; i < garbage.length; i++) garbage[i] = (i * 7919 + 13) % 251;
    await page.setInputFiles('#data-files', [
      { name: 'train-images-idx3-ubyte.gz', mimeType: 'application/gzip', buffer: garbage },
      { name: 'train-labels-idx1-ubyte.gz', mimeType: 'application/gzip', buffer: await fetchData('train-labels-idx1-ubyte.gz') },
      { name: 't10k-images-idx3-ubyte.gz', mimeType: 'application/gzip', buffer: await fetchData('t10k-images-idx3-ubyte.gz') },
      { name: 't10k-labels-idx1-ubyte.gz', mimeType: 'application/gzip', buffer: await fetchData('t10k-labels-idx1-ubyte.gz') },
    ]);
    await waitFor(
      page,
      'a message naming train-images-idx3-ubyte after a corrupt data file',
      () => (document.getElementById('message').textContent || '').includes('train-images-idx3-ubyte'),
      undefined,
      60_000,
    );
    const dataSaid = await message(page);
    if (dataSaid.kind !== 'error') fail(`the corrupt data file was not refused: "${dataSaid.text}"`);
    log(`corrupt train-images refused: "${dataSaid.text}"`);

    // A data file larger than MNIST's is refused by its size, before it is read, naming it.
    await page.setInputFiles('#data-files', [
      { name: 'train-images-idx3-ubyte.gz', mimeType: 'application/gzip', buffer: garbage },
      { name: 'train-labels-idx1-ubyte.gz', mimeType: 'application/gzip', buffer: garbage },
      { name: 't10k-images-idx3-ubyte.gz', mimeType: 'application/gzip', buffer: garbage },
      { name: 't10k-labels-idx1-ubyte.gz', mimeType: 'application/gzip', buffer: Buffer.alloc(10_009) },
    ]);
    await waitFor(
      page,
      'a message naming the oversized t10k-labels file',
      () => /t10k-labels-idx1-ubyte\.gz is 10,009 bytes/.test(document.getElementById('message').textContent || ''),
      undefined,
      30_000,
    );
    log(`an oversized data file refused: "${(await message(page)).text}"`);

    await clearDrawing(page, 'after the bad inputs');
    await drawStroke(page, [[0.5, 0.15], [0.5, 0.85]]);
    const again = await readProbabilities(page, 'a drawn 1 after the bad inputs');
    log(`the previous model still reads a drawn 1: [${again.map((p) => p.toFixed(4)).join(', ')}]`);
    const kept = await page.evaluate(() => window.gpuMnistSaveModel());
    const module = await page.evaluate(() => window.gpuMnistModuleModel());
    for (const [whose, bytes] of [['page', kept], ['module', module]]) {
      if (!Buffer.from(bytes).equals(Buffer.from(modelBytes))) {
        fail(`the ${whose}'s model changed while bad files were refused (${bytes.length} bytes, was ${modelBytes.length})`);
      }
    }
    log('the page kept its model byte for byte through the bad files');

    // A model file written by `gpu-mnist train --save` works in the page.
    if (process.env.NATIVE_MODEL) {
      await page.setInputFiles('#model-file', {
        name: 'native.safetensors',
        mimeType: 'application/octet-stream',
        buffer: readFileSync(process.env.NATIVE_MODEL),
      });
      await waitFor(
        page,
        'the native model file loaded',
        () => /Loaded native\.safetensors/.test(document.getElementById('model-status').textContent || '') ||
          (document.getElementById('message').textContent || '').includes('native.safetensors'),
        undefined,
        30_000,
      );
      const said = await page.textContent('#model-status');
      if (!/Loaded native\.safetensors/.test(said)) fail(`the native model was not loaded: ${await pageSays(page)}`);
      await page.click('#clear');
      await drawStroke(page, [[0.5, 0.15], [0.5, 0.85]]);
      const native = await readProbabilities(page, 'a drawn 1 read by the native model');
      log(`${said.trim()}; it reads a drawn 1: [${native.map((p) => p.toFixed(4)).join(', ')}]`);
    }
  } finally {
    await browser.close();
  }

  await withoutWebGpu();
  await fastPresetOnTheCpuPath();
  await accuratePresetAndNewLayers();
  await tooLargeForWasmMemory();
  await recoversFromFaults();
  log('all checks passed');
}

/**
 * The "fast" preset (the fastest published recipe: one epoch, Adam with a one-cycle schedule) on
 * the wasm CPU path, on 6,000 training images: one epoch at the preset's rate, 95 % or more (96.1 %
 * measured; the full 60,000 reach 98.9-99.0 %, benches/fast99.md), and the time to that accuracy
 * shown with it.
 */
async function fastPresetOnTheCpuPath() {
  const browser = await launch(NO_WEBGPU);
  try {
    const page = await browser.newPage();
    await page.goto(new URL('?model=fast&train_limit=6000&test_limit=1000&device=cpu', base).href);
    await waitFor(page, 'the page ready', () => document.body.dataset.state === 'ready', undefined, 60_000);
    const [epochs, lr] = [await page.inputValue('#epochs'), await page.inputValue('#lr')];
    if (epochs !== '1' || lr !== '0.01') fail(`the fast preset set epochs ${epochs} and rate ${lr}, not 1 and 0.01`);
    await page.click('#train');
    await waitForResult(page, 'a result of the fast preset on the CPU path', 5 * 60_000);
    const result = JSON.parse((await page.textContent('#result')).trim());
    if (result.device !== 'cpu' || result.epochs !== 1) fail(`the fast preset ran ${JSON.stringify(result)}`);
    if (!(result.test_accuracy >= 0.95)) fail(`the fast preset reached only ${result.test_accuracy} on 6,000 images`);
    const shown = (await page.textContent('#accuracy')).trim();
    if (!/reached in [0-9.]+ s/.test(shown)) fail(`the page does not show the time to its accuracy: "${shown}"`);
    log(`fast preset on the CPU path: ${shown}`);
  } finally {
    await browser.close();
  }
}

/**
 * The "accurate" preset fills in its 10 epochs and rate, and trains on the CPU path (one epoch of
 * 3,000 images: batch normalisation, whose moving averages have not settled after 24 steps,
 * and augmented batches); a --layers spec with batch normalisation and dropout trains too (6
 * epochs: 141 steps, after which Keras's momentum of 0.99 leaves a quarter of the moving
 * averages' starting values in them: 43.6 % measured). Both must end well above chance, 20 and
 * 30 % (a NaN accuracy, written null, fails).
 */
async function accuratePresetAndNewLayers() {
  const browser = await launch(NO_WEBGPU);
  try {
    const page = await browser.newPage();
    await page.goto(new URL('?model=accurate&train_limit=3000&test_limit=500&device=cpu', base).href);
    await waitFor(page, 'the page ready', () => document.body.dataset.state === 'ready', undefined, 60_000);
    const [epochs, lr] = [await page.inputValue('#epochs'), await page.inputValue('#lr')];
    if (epochs !== '10' || lr !== '0.01') fail(`the accurate preset set epochs ${epochs} and rate ${lr}, not 10 and 0.01`);
    await page.fill('#epochs', '1');
    await page.click('#train');
    await waitForResult(page, 'a result of the accurate preset on the CPU path', 5 * 60_000);
    const preset = JSON.parse((await page.textContent('#result')).trim());
    if (preset.device !== 'cpu' || !(preset.test_accuracy >= 0.2)) fail(`the accurate preset ran ${JSON.stringify(preset)}`);
    log(`accurate preset, 1 epoch of 3,000 images on the CPU path: ${preset.test_accuracy}`);
    const spec = 'conv:8:3,batchnorm,pool:2,dropout:0.25,flatten,dense:32,batchnorm,dense:10';
    await page.goto(new URL(`?model=${spec}&train_limit=3000&test_limit=500&epochs=6&device=cpu&autostart=1`, base).href);
    await waitForResult(page, 'a result of a model with batch norm and dropout', 5 * 60_000);
    const layers = JSON.parse((await page.textContent('#result')).trim());
    if (!(layers.test_accuracy >= 0.3)) fail(`${spec} reached ${layers.test_accuracy}: ${await pageSays(page)}`);
    log(`${spec}, 6 epochs of 3,000 images on the CPU path: ${layers.test_accuracy}`);
  } finally {
    await browser.close();
  }
}

/**
 * A crafted link asks for a model that cannot fit in WebAssembly's 4 GiB (dense:250000 is 200
 * million parameters): the page refuses it in one sentence before anything is allocated, and then
 * trains the default model to its usual accuracy without a reload.
 */
async function tooLargeForWasmMemory() {
  const browser = await launch(NO_WEBGPU);
  try {
    const page = await browser.newPage();
    await page.goto(new URL('?model=dense:250000,dense:10&train_limit=2000&test_limit=500&epochs=1&batch_size=16&device=cpu&autostart=1', base).href);
    await waitFor(
      page,
      'a refusal naming the WebAssembly memory',
      () => /WebAssembly memory can still grow to/.test(document.getElementById('message').textContent || ''),
      undefined,
      60_000,
    );
    log(`a model too large for wasm memory refused: "${(await message(page)).text}"`);
    await page.selectOption('#model', 'mlp');
    await page.fill('#epochs', '1');
    await page.click('#train');
    await waitForResult(page, 'a result after the refused run', 5 * 60_000);
    const line = (await page.textContent('#result')).trim();
    const result = line ? JSON.parse(line) : null;
    if (!result || !(result.test_accuracy >= MIN_ACCURACY)) fail(`after the refused run the page reached ${line}: ${await pageSays(page)}`);
    log(`then trained without a reload: ${result.test_accuracy}`);
  } finally {
    await browser.close();
  }
}

/**
 * Traps inside the module, each provoked after the first chunk of a run: a panic, and an
 * out-of-memory abort (allocating until WebAssembly's memory cannot grow, which no panic hook
 * sees). After each the page says what happened in one sentence, keeps its model byte for byte
 * (it still reads a drawing), and trains again to its usual accuracy without a reload; then the
 * same after an upload larger than MNIST's file. The page runs the build without WebAssembly SIMD
 * here (build=plain), the fallback for browsers without it.
 */
async function recoversFromFaults() {
  const browser = await launch(NO_WEBGPU);
  try {
    const page = await browser.newPage();
    await page.goto(new URL('?build=plain&train_limit=2000&test_limit=500&epochs=1&batch_size=16&device=cpu&autostart=1', base).href);
    await waitFor(page, 'a first run on the build without SIMD', () => document.body.dataset.state === 'done', undefined, 5 * 60_000);
    const build = await page.evaluate(() => window.gpuMnistBuild);
    const first = JSON.parse((await page.textContent('#result')).trim());
    if (build !== 'plain' || first.adapter !== 'cpu (wasm, 1 thread)') {
      fail(`build=plain loaded the "${build}" build and trained on "${first.adapter}"`);
    }
    log(`the build without SIMD trains: ${first.test_accuracy} (${first.adapter})`);
    await compareWithReference(page, 'gpuMnistCpuCheck', 'wasm cpu', first.adapter);
    const traps = [
      ['panic', /stopped on an internal error \(a panic the page's test asked for, at src\/lib\.rs:\d+\)/],
      ['out-of-memory', /aborted \(.*\) with [0-9,]+ MiB of memory in use, most likely out of memory/],
    ];
    for (const [kind, expected] of traps) {
      const before = await page.evaluate(() => window.gpuMnistSaveModel());
      await page.evaluate((k) => window.gpuMnistFaultNextRun(k), kind);
      await page.click('#train');
      await waitFor(page, `the ${kind} reported`, () => document.body.dataset.state === 'error', undefined, 2 * 60_000);
      const said = (await message(page)).text;
      if (!expected.test(said) || !/; the page restarted the module with the data and the model it had, so it can train again\.$/.test(said)) {
        fail(`the ${kind} was reported as "${said}"`);
      }
      log(`${kind}: "${said}"`);
      // The page's copy, and the restarted module's own model, both unchanged.
      const kept = await page.evaluate(() => window.gpuMnistSaveModel());
      const module = await page.evaluate(() => window.gpuMnistModuleModel());
      if (!Buffer.from(kept).equals(Buffer.from(before))) fail(`the page's model changed across the ${kind}`);
      if (!Buffer.from(module).equals(Buffer.from(before))) {
        fail(`the restarted module holds another model after the ${kind} (${module.length} bytes, was ${before.length})`);
      }
      await clearDrawing(page, `after the ${kind}`);
      await drawStroke(page, [[0.5, 0.15], [0.5, 0.85]]);
      await readProbabilities(page, `a drawn 1 after the ${kind}`);
      const accuracy = await trainAgain(page, `after the ${kind}`);
      log(`after the ${kind}, the model kept byte for byte read a drawing, and the page trained again: ${accuracy}`);
    }
    // An upload larger than MNIST's file is refused by its size before it is read; the page then
    // trains on the data it had.
    const small = Buffer.alloc(64);
    await page.setInputFiles('#data-files', [
      { name: 'train-images-idx3-ubyte.gz', mimeType: 'application/gzip', buffer: small },
      { name: 'train-labels-idx1-ubyte.gz', mimeType: 'application/gzip', buffer: small },
      { name: 't10k-images-idx3-ubyte.gz', mimeType: 'application/gzip', buffer: Buffer.alloc(8_000_000) },
      { name: 't10k-labels-idx1-ubyte.gz', mimeType: 'application/gzip', buffer: small },
    ]);
    await waitFor(
      page,
      'a message naming the oversized t10k-images file',
      () => /^t10k-images-idx3-ubyte\.gz is 8,000,000 bytes, more than MNIST's/.test(document.getElementById('message').textContent || ''),
      undefined,
      30_000,
    );
    log(`an oversized upload: "${(await message(page)).text}"`);
    log(`then trained on the data it had: ${await trainAgain(page, 'after the oversized upload')}`);
  } finally {
    await browser.close();
  }
}

/**
 * Run one of the page's checks against the library's CPU reference (`window[check]()`, JSON with
 * one case per model) and fail on any case out of its tolerance; a NaN difference reaches JSON as
 * null, and fails too.
 */
async function compareWithReference(page, check, what, adapter) {
  const report = JSON.parse(await page.evaluate((name) => window[name](), check));
  let ok = report.ok === true;
  for (const c of report.cases) {
    const diff = typeof c.max_diff === 'number' ? c.max_diff.toExponential(2) : `${c.max_diff} (NaN)`;
    const caseOk = c.ok === true && typeof c.max_diff === 'number' && c.max_diff <= c.tolerance;
    log(`${what} check ${c.model} batch ${c.batch} ${c.optimizer} x${c.steps}: max |${what} - reference| ` +
      `of the ${c.compared} ${diff} (tolerance ${c.tolerance}) ${caseOk ? 'ok' : 'FAILED'}`);
    ok &&= caseOk;
  }
  if (!ok) fail(`the ${what} path differs from the reference on ${report.adapter || adapter}`);
}

/** A browser without WebGPU: the page says so in one sentence and trains on the CPU path. */
async function withoutWebGpu() {
  const browser = await launch(NO_WEBGPU);
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on('console', (msg) => {
      if (msg.type() === 'error') errors.push(msg.text());
    });
    page.on('pageerror', (error) => errors.push(error.message));
    await page.goto(new URL('?train_limit=2000&test_limit=500&epochs=1&batch_size=16&autostart=1', base).href);
    await waitForResult(page, 'a result on the CPU path without WebGPU', 5 * 60_000);
    const line = (await page.textContent('#result')).trim();
    if (!line) fail(`no result without WebGPU: ${await pageSays(page)}`);
    const result = JSON.parse(line);
    const note = (await page.textContent('#device-note')).trim();
    const noteShown = await page.isVisible('#device-note');
    if (result.device !== 'cpu') fail(`without WebGPU the page trained on "${result.device}"`);
    // Chromium runs WebAssembly SIMD, so the page loads that build.
    if (result.adapter !== 'cpu (wasm simd128, 1 thread)') fail(`without WebGPU the page trained on "${result.adapter}", not the SIMD build`);
    if (!noteShown || !/WebGPU/.test(note)) fail(`without WebGPU the page did not say so (#device-note "${note}")`);
    // Written so that a missing or NaN accuracy (null in JSON) fails too.
    if (!(result.test_accuracy >= MIN_ACCURACY)) {
      fail(`the CPU path reached only ${result.test_accuracy} on 2,000 images`);
    }
    // The CPU path of the SIMD build against the reference.
    await compareWithReference(page, 'gpuMnistCpuCheck', 'wasm simd128 cpu', result.adapter);
    if (errors.length > 0) fail(`console errors without WebGPU:\n  ${errors.join('\n  ')}`);
    log(`without WebGPU: "${note}"`);
    log(`without WebGPU: result ${line}`);
  } finally {
    await browser.close();
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    const why = error instanceof Failure ? error.message : (error && error.stack) || String(error);
    console.error(`browser: FAILED: ${why}`);
    process.exit(1);
  },
);
