// gpu-mnist in the browser: the page's logic, over the WebAssembly build (pkg-simd/ where the
// browser runs WebAssembly SIMD, else pkg/) running in a worker (engine.js, worker.js).
//
// Contract. The page loads the four MNIST files, trains with the library's `train` (WebGPU, or
// the CPU path compiled to wasm), draws the training curves, and reads the digit drawn on #draw
// with the latest trained or loaded model. Nothing here trains, checks a file or converts a
// picture itself: every such step is one call into the wasm module, and every error it throws is
// shown in #message; the page keeps working after any of them, a trap inside the module
// included (the engine restarts it with the data and model it had).
//
// What a harness can rely on:
// - body[data-state] is "loading" (fetching or checking the data), "ready" (data loaded, nothing
//   running; also after a run the person stopped), "training", "done" (the last run finished) or
//   "error" (the data could not be loaded, or the last run failed). A bad model file or a bad
//   pick of data files after good data only shows a message and leaves the state alone.
// - #result: when a run finishes, its textContent becomes exactly the string `train()` resolved
//   to (one JSON line: test_accuracy, test_loss, epochs, images, seconds, adapter, device), and
//   window.gpuMnistResult its parsed value. A failed or stopped run writes nothing there, so
//   #result holds the last completed run's line (empty until one finishes).
// - #message (role="alert") holds the latest error or notice as one sentence; data-kind is
//   "error" or "info". Empty when there is nothing to say.
// - #probs holds ten .bar elements (digits 0-9 in order) whose data-p is the probability the
//   model gives that digit for the drawing (all "0" while there is no ink or no model).
// - #device-note shows the library's note when it trains somewhere other than WebGPU.
// - window.gpuMnistSaveModel() returns the page model's file as an array of byte values (the copy
//   the page keeps); window.gpuMnistModuleModel() resolves to the module's own (empty without).
// - window.gpuMnistTimings: when each body state was first reached, and the last run's Train
//   press, first chunk and epoch seconds (ms since navigation; read by tests/measure.mjs).
// - window.gpuMnistKernelCheck() resolves to JSON: this browser's WebGPU kernels against the
//   library's CPU reference (whole training steps at awkward shapes), with `ok` over all cases.
// - window.gpuMnistCpuCheck() resolves to the same JSON for the page's CPU path as this build of
//   the module compiles it (dense and convolutional models, batch norm, dropout).
// - window.gpuMnistBuild: the module build in use, "simd128" or "plain".
// - window.gpuMnistFaultNextRun(kind): the next run traps inside the module after its first
//   chunk of steps, kind "panic" or "out-of-memory" (for tests of the page's recovery).
//
// Query parameters (all optional) prefill the controls: model (mlp | convnet | fast | accurate,
// or a --layers spec such as conv:8:3,batchnorm,pool:2,dropout:0.25,flatten,dense:10), epochs,
// batch_size, lr, seed, train_limit, test_limit, device (auto | webgpu | cpu); autostart=1 starts
// a run as soon as the data is loaded; build=plain loads the module without WebAssembly SIMD
// (build=simd128 insists on it). Example: ?train_limit=2000&test_limit=500&epochs=1&autostart=1

import { bestBuild, Engine } from './engine.js';

/** The four MNIST files, in the order `load_data` takes them. */
const DATA_FILES = [
  { key: 'train-images', name: 'train-images-idx3-ubyte.gz' },
  { key: 'train-labels', name: 'train-labels-idx1-ubyte.gz' },
  { key: 't10k-images', name: 't10k-images-idx3-ubyte.gz' },
  { key: 't10k-labels', name: 't10k-labels-idx1-ubyte.gz' },
];

/** Name of the downloaded model file. */
const MODEL_FILE_NAME = 'gpu-mnist-model.safetensors';

/** Brush of the drawing canvas, in canvas pixels (the canvas is 280x280). */
const BRUSH_WIDTH = 18;

const $ = (id) => document.getElementById(id);

/** The training module (an `Engine`), once its worker is ready. */
let engine = null;

/** A trap to provoke in the next run (`window.gpuMnistFaultNextRun`), or null. */
let nextFault = null;

/** Whether data has been loaded successfully at least once. */
let dataLoaded = false;

/** The run in progress (null when none): its options, progress and curves. */
let run = null;

/** The curves of the latest run, kept after it ends so the chart stays. */
let chart = { epochs: 1, chunks: [], epochPoints: [] };

// ---------------------------------------------------------------------------------------------
// Messages and state

function errorText(error) {
  if (error instanceof Error) return error.message;
  return String(error);
}

/** Show one sentence in #message; kind is "error" or "info". */
function showMessage(text, kind = 'error') {
  const el = $('message');
  el.dataset.kind = kind;
  el.textContent = text;
}

function clearMessage() {
  const el = $('message');
  el.textContent = '';
  delete el.dataset.kind;
}

function setState(state) {
  document.body.dataset.state = state;
  // When each state was first reached (ms since navigation), for tests/measure.mjs.
  window.gpuMnistTimings.states[state] ??= performance.now();
}

/** Timings a harness can read: state changes, and the last run's Train press and first chunk. */
window.gpuMnistTimings = { states: {}, run: null };

// An error nobody caught reaches the page, and the console too (where tests look for it).
window.addEventListener('unhandledrejection', (event) => {
  console.error('unhandled rejection:', errorText(event.reason));
  showMessage(errorText(event.reason));
});
window.addEventListener('error', (event) => {
  showMessage(event.message || 'Unexpected error.');
});

/** Resolve after the browser has had a chance to paint (or 50 ms, if frames are paused). */
function nextPaint() {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, 50);
    requestAnimationFrame(() => setTimeout(() => {
      clearTimeout(timer);
      resolve();
    }, 0));
  });
}

// ---------------------------------------------------------------------------------------------
// Options: query string -> controls -> the JSON `train` takes

/** Prefill the controls from the query string. */
function applyQuery(params) {
  const setSelect = (id, value) => {
    const select = $(id);
    if (![...select.options].some((o) => o.value === value)) {
      // Unknown values go through unchanged: the library names what it accepts.
      select.add(new Option(value, value));
    }
    select.value = value;
  };
  const fields = {
    epochs: 'epochs', batch_size: 'batch-size', lr: 'lr', seed: 'seed',
    train_limit: 'train-limit', test_limit: 'test-limit',
  };
  if (params.has('model')) {
    setSelect('model', params.get('model'));
    applyModelDefaults();
  }
  if (params.has('device')) setSelect('device', params.get('device'));
  for (const [key, id] of Object.entries(fields)) {
    if (params.has(key)) $(id).value = params.get(key);
  }
  if (['train_limit', 'test_limit', 'device', 'seed'].some((k) => params.has(k))) {
    $('advanced').open = true;
  }
}

/** The options of the controls, as the object `train` takes (empty fields left out). */
function readOptions() {
  const options = { model: $('model').value, device: $('device').value };
  const numbers = {
    epochs: 'epochs', batch_size: 'batch-size', lr: 'lr', seed: 'seed',
    train_limit: 'train-limit', test_limit: 'test-limit',
  };
  for (const [key, id] of Object.entries(numbers)) {
    const text = $(id).value.trim();
    // The library checks the values (whole numbers, a positive rate) and says what is wrong.
    if (text !== '') options[key] = Number(text);
  }
  return options;
}

// ---------------------------------------------------------------------------------------------
// Data

/** Fetch one MNIST file relative to the page; throws an Error naming the file. */
async function fetchDataFile(name) {
  const path = `data/${name}`;
  let response;
  try {
    response = await fetch(path);
  } catch (error) {
    throw new Error(`Could not fetch ${path} (${errorText(error)}).`);
  }
  if (!response.ok) {
    throw new Error(`Could not fetch ${path} (HTTP ${response.status}${response.statusText ? ' ' + response.statusText : ''}).`);
  }
  return new Uint8Array(await response.arrayBuffer());
}

/** Hand the four files to the library's checks; true when they pass. */
async function checkData(bytes) {
  $('data-status').textContent = 'Checking the four files (size and SHA-256)…';
  await nextPaint();
  try {
    const summary = await engine.loadData(bytes);
    dataLoaded = true;
    $('data-status').textContent = summary;
    $('data-section').classList.remove('attention');
    if (!run) {
      setState('ready');
      $('status').textContent = 'Data ready: press Train.';
    }
    return true;
  } catch (error) {
    showMessage(errorText(error));
    $('data-status').textContent = dataLoaded
      ? 'Those files were not used; the data loaded before is kept.'
      : 'No data loaded: pick the four MNIST files below.';
    if (!dataLoaded) {
      $('data-section').classList.add('attention');
      if (!run) setState('error');
    }
    return false;
  }
}

/** The default path: fetch data/*.gz next to the page. */
async function loadDefaultData() {
  $('data-status').textContent = 'Fetching the four MNIST files…';
  let bytes;
  try {
    bytes = await Promise.all(DATA_FILES.map((f) => fetchDataFile(f.name)));
  } catch (error) {
    showMessage(`${errorText(error)} Pick the four MNIST files in the Data section instead.`);
    $('data-status').textContent = 'No data loaded: pick the four MNIST files below.';
    $('data-section').classList.add('attention');
    setState('error');
    return false;
  }
  return checkData(bytes);
}

/** The picked files: match each of the four by name, then check them. */
async function loadPickedData(fileList) {
  const files = [...fileList];
  const picked = DATA_FILES.map((f) => files.find((file) => file.name.includes(f.key)));
  const missing = DATA_FILES.filter((_, i) => !picked[i]).map((f) => f.key);
  if (missing.length > 0) {
    showMessage(`Missing ${missing.join(', ')}: pick all four MNIST files at once (names containing train-images, train-labels, t10k-images and t10k-labels).`);
    return false;
  }
  // Each file checked by its size before it is read: a larger one is not MNIST's.
  const limits = engine.limits.data;
  const tooLarge = picked.findIndex((file, i) => file.size > limits[i]);
  if (tooLarge >= 0) {
    const file = picked[tooLarge];
    showMessage(`${file.name} is ${file.size.toLocaleString('en')} bytes, more than MNIST's ${DATA_FILES[tooLarge].name} (at most ${limits[tooLarge].toLocaleString('en')} bytes): pick the four MNIST files.`);
    return false;
  }
  clearMessage();
  $('data-status').textContent = 'Reading the picked files…';
  let bytes;
  try {
    bytes = await Promise.all(picked.map(async (file) => new Uint8Array(await file.arrayBuffer())));
  } catch (error) {
    showMessage(`Could not read the picked files (${errorText(error)}).`);
    return false;
  }
  return checkData(bytes);
}

// ---------------------------------------------------------------------------------------------
// Training

function setRunning(running) {
  $('stop').disabled = !running;
}

/** The Train button: start a run, or (when one is running) let the library say so. */
async function onTrain() {
  if (!engine) {
    showMessage('The page is still loading its WebAssembly module; try again in a moment.');
    return;
  }
  if (run) {
    // A run is on: ask anyway, so the library's own sentence ("already running") is shown.
    try {
      await engine.train(readOptions(), () => {});
    } catch (error) {
      showMessage(errorText(error));
    }
    return;
  }
  await startRun();
}

/** "vendor architecture description" of the browser's WebGPU adapter, or '' without one. */
async function webGpuAdapterInfo() {
  try {
    const adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
    const info = adapter && (adapter.info || (adapter.requestAdapterInfo ? await adapter.requestAdapterInfo() : null));
    return info ? [info.vendor, info.architecture, info.description].filter(Boolean).join(' ') : '';
  } catch (error) {
    return '';
  }
}

async function startRun() {
  const options = readOptions();
  run = {
    options,
    stopRequested: false,
    device: null,
    adapter: null,
    epoch: 0,
    stepsDone: 0,
    stepsTotal: 0,
    lastSteps: null,
    lastSeconds: null,
    rate: null,
  };
  chart = { epochs: Number.isInteger(options.epochs) && options.epochs > 0 ? options.epochs : 5, chunks: [], epochPoints: [] };
  clearMessage();
  $('device-note').hidden = true;
  $('status').textContent = 'Starting…';
  window.gpuMnistTimings.run = { pressed: performance.now(), firstChunk: null, epochs: [] };
  setState('training');
  setRunning(true);
  drawChart();

  try {
    // The browser's own words for its WebGPU adapter (wgpu passes on only the description,
    // which browsers mostly leave empty).
    if (options.device !== 'cpu') options.adapter_info = await webGpuAdapterInfo();
    if (nextFault) options.fault = nextFault;
    nextFault = null;
    // Stop pressed while the adapter was asked about: no run at all.
    if (run.stopRequested) throw new Error('Stopped before the first step; the previous model (if any) is kept.');
    const line = await engine.train(options, onTrainEvent);
    const result = JSON.parse(line);
    $('result').textContent = line;
    window.gpuMnistResult = result;
    showResult(result);
    $('model-status').textContent =
      `The model of the last run (test accuracy ${(100 * result.test_accuracy).toFixed(2)} %).`;
    $('status').textContent = `Done: ${result.device} · ${result.adapter}.`;
    setState('done');
  } catch (error) {
    const stopped = run.stopRequested;
    showMessage(errorText(error), stopped ? 'info' : 'error');
    $('status').textContent = stopped ? 'Stopped.' : 'The run failed.';
    setState(stopped ? (dataLoaded ? 'ready' : 'error') : 'error');
  } finally {
    run = null;
    setRunning(false);
    refreshModel();
  }
}

function onStop() {
  if (!engine || !run) return;
  run.stopRequested = true;
  engine.stop();
  $('status').textContent = 'Stopping after the current chunk of steps…';
}

/** One progress event of `train` (a JSON string). */
function onTrainEvent(text) {
  if (!run) return;
  let event;
  try {
    event = JSON.parse(text);
  } catch {
    return;
  }
  switch (event.type) {
    case 'device':
      run.device = event.device;
      run.adapter = event.adapter;
      if (event.note) {
        $('device-note').textContent = event.note;
        $('device-note').hidden = false;
      }
      break;
    case 'epoch_start':
      run.epoch = event.epoch;
      run.stepsDone = 0;
      run.stepsTotal = event.steps;
      break;
    case 'chunk': {
      if (window.gpuMnistTimings.run && window.gpuMnistTimings.run.firstChunk === null) {
        window.gpuMnistTimings.run.firstChunk = performance.now();
      }
      run.epoch = event.epoch;
      run.stepsDone = event.steps_done;
      run.stepsTotal = event.steps_total;
      // Steps per second from the last two chunks (seconds count from the start of the run).
      const steps = (event.epoch - 1) * event.steps_total + event.steps_done;
      if (run.lastSeconds !== null && event.seconds > run.lastSeconds && steps > run.lastSteps) {
        run.rate = (steps - run.lastSteps) / (event.seconds - run.lastSeconds);
      } else if (event.seconds > 0) {
        run.rate = steps / event.seconds;
      }
      run.lastSteps = steps;
      run.lastSeconds = event.seconds;
      if (event.steps_total > 0) {
        chart.chunks.push({
          x: event.epoch - 1 + event.steps_done / event.steps_total,
          loss: event.loss,
          accuracy: event.accuracy,
        });
      }
      scheduleChart();
      break;
    }
    case 'epoch':
      window.gpuMnistTimings.run?.epochs.push({ epoch: event.epoch, seconds: event.seconds });
      chart.epochPoints.push({ x: event.epoch, loss: event.loss, accuracy: event.accuracy });
      scheduleChart();
      break;
    default:
      return;
  }
  renderStatus();
}

function renderStatus() {
  if (!run) return;
  const parts = [];
  if (run.device) parts.push(`${run.device} · ${run.adapter}`);
  if (run.epoch > 0) {
    parts.push(`epoch ${run.epoch}/${chart.epochs}`);
    parts.push(`step ${run.stepsDone}/${run.stepsTotal}`);
  }
  if (run.rate !== null && Number.isFinite(run.rate)) parts.push(`${run.rate.toFixed(1)} steps/s`);
  if (run.stopRequested) parts.push('stopping…');
  $('status').textContent = parts.join(' · ') || 'Starting…';
}

function showResult(result) {
  const percent = (100 * result.test_accuracy).toFixed(2);
  const epochs = result.epochs === 1 ? '1 epoch' : `${result.epochs} epochs`;
  $('accuracy').textContent =
    `Last completed run: test accuracy ${percent} % (test loss ${Number(result.test_loss).toFixed(4)}), ` +
    `reached in ${Number(result.seconds).toFixed(1)} s: ${epochs} on ${result.images} training images ` +
    `and the test (${result.device}).`;
}

/** What a model trains with unless changed: its epochs and learning rate. */
const MODEL_DEFAULTS = {
  mlp: { epochs: 5, lr: 0.001 },
  convnet: { epochs: 5, lr: 0.001 },
  // The fastest published recipe: one epoch, Adam with a one-cycle schedule peaking at 0.01.
  fast: { epochs: 1, lr: 0.01 },
  // The fast recipe with batch normalisation, dropout and augmented images, over 10 epochs.
  accurate: { epochs: 10, lr: 0.01 },
};

/** Set the epochs and rate fields to the chosen model's defaults. */
function applyModelDefaults() {
  const defaults = MODEL_DEFAULTS[$('model').value];
  if (!defaults) return;
  $('epochs').value = String(defaults.epochs);
  $('lr').value = String(defaults.lr);
}

// ---------------------------------------------------------------------------------------------
// Chart: loss (top) and accuracy (bottom) against epochs, drawn on #chart

let chartQueued = false;

function scheduleChart() {
  if (chartQueued) return;
  chartQueued = true;
  requestAnimationFrame(() => {
    chartQueued = false;
    drawChart();
  });
}

function drawChart() {
  const canvas = $('chart');
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0 || height === 0) return;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = '12px system-ui, sans-serif';

  const style = getComputedStyle(document.documentElement);
  const finite = (key) => chart.chunks.concat(chart.epochPoints).map((p) => p[key]).filter(Number.isFinite);
  const losses = finite('loss');
  const accuracies = finite('accuracy');
  const lossMax = losses.length ? Math.max(...losses) * 1.1 : 1;
  const accMin = accuracies.length ? Math.max(0, Math.floor(Math.min(...accuracies) * 10) / 10) : 0;
  const panels = [
    {
      title: 'training loss', key: 'loss', color: style.getPropertyValue('--loss').trim() || '#c2410c',
      lo: 0, hi: lossMax > 0 ? lossMax : 1, label: (v) => v.toFixed(2),
    },
    {
      title: 'training accuracy', key: 'accuracy', color: style.getPropertyValue('--accuracy').trim() || '#1d4ed8',
      lo: accMin, hi: 1, label: (v) => `${(100 * v).toFixed(0)} %`,
    },
  ];
  const gap = 10;
  const panelHeight = (height - gap) / 2;
  panels.forEach((panel, i) => {
    drawPanel(ctx, panel, { x: 0, y: i * (panelHeight + gap), w: width, h: panelHeight }, i === panels.length - 1);
  });
  if (chart.chunks.length === 0 && chart.epochPoints.length === 0) {
    ctx.fillStyle = '#57606a';
    ctx.textAlign = 'center';
    ctx.fillText('The curves appear here while a model trains.', width / 2, height / 2 + 4);
  }
}

function drawPanel(ctx, panel, box, lastPanel) {
  const left = box.x + 52;
  const right = box.x + box.w - 12;
  const top = box.y + 20;
  const bottom = box.y + box.h - (lastPanel ? 22 : 8);
  const xOf = (x) => left + (x / chart.epochs) * (right - left);
  const yOf = (v) => bottom - ((v - panel.lo) / (panel.hi - panel.lo || 1)) * (bottom - top);

  // Title, grid and axis labels.
  ctx.fillStyle = panel.color;
  ctx.textAlign = 'left';
  ctx.fillText(panel.title, left, box.y + 13);
  ctx.strokeStyle = '#d0d7de';
  ctx.lineWidth = 1;
  ctx.fillStyle = '#57606a';
  ctx.textAlign = 'right';
  for (let t = 0; t <= 2; t++) {
    const v = panel.lo + ((panel.hi - panel.lo) * t) / 2;
    const y = Math.round(yOf(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(right, y);
    ctx.stroke();
    ctx.fillText(panel.label(v), left - 6, y + 4);
  }
  // Epoch ticks at least 60 px apart; the last one, at the right end, names the unit.
  const every = Math.max(1, Math.ceil(chart.epochs / Math.max(1, Math.floor((right - left) / 60))));
  for (let e = 0; e <= chart.epochs; e += every) {
    const x = Math.round(xOf(e)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, bottom);
    ctx.stroke();
    const roomForEnd = xOf(chart.epochs) - x >= 70;
    if (lastPanel && e < chart.epochs && roomForEnd) {
      ctx.textAlign = 'center';
      ctx.fillText(String(e), x, bottom + 15);
    }
  }
  if (lastPanel) {
    ctx.textAlign = 'right';
    ctx.fillText(`${chart.epochs} ${chart.epochs === 1 ? 'epoch' : 'epochs'}`, right, bottom + 15);
  }

  // The running mean after every chunk, as a line.
  ctx.strokeStyle = panel.color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  let started = false;
  for (const p of chart.chunks) {
    const v = p[panel.key];
    if (!Number.isFinite(v)) continue;
    const x = xOf(p.x);
    const y = yOf(v);
    if (started) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
    started = true;
  }
  ctx.stroke();

  // Each finished epoch, as a dot.
  ctx.fillStyle = panel.color;
  for (const p of chart.epochPoints) {
    const v = p[panel.key];
    if (!Number.isFinite(v)) continue;
    ctx.beginPath();
    ctx.arc(xOf(p.x), yOf(v), 4, 0, 2 * Math.PI);
    ctx.fill();
  }
}

// ---------------------------------------------------------------------------------------------
// Drawing and prediction

const drawCanvas = $('draw');
const drawContext = drawCanvas.getContext('2d', { willReadFrequently: true });
let hasInk = false;
let stroke = null; // { id, x, y } while a pointer draws

function clearDrawing() {
  drawContext.fillStyle = '#ffffff';
  drawContext.fillRect(0, 0, drawCanvas.width, drawCanvas.height);
  hasInk = false;
  drawingVersion += 1;
}

/** A pointer event's position in canvas pixels (the canvas may be shown smaller). */
function canvasPoint(event) {
  const rect = drawCanvas.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) / rect.width) * drawCanvas.width,
    y: ((event.clientY - rect.top) / rect.height) * drawCanvas.height,
  };
}

function inkLine(from, to) {
  drawContext.strokeStyle = '#000000';
  drawContext.lineWidth = BRUSH_WIDTH;
  drawContext.lineCap = 'round';
  drawContext.lineJoin = 'round';
  drawContext.beginPath();
  drawContext.moveTo(from.x, from.y);
  drawContext.lineTo(to.x, to.y);
  drawContext.stroke();
  hasInk = true;
  drawingVersion += 1;
}

drawCanvas.addEventListener('pointerdown', (event) => {
  if (event.button !== 0 && event.pointerType === 'mouse') return;
  event.preventDefault();
  drawCanvas.setPointerCapture(event.pointerId);
  const p = canvasPoint(event);
  stroke = { id: event.pointerId, ...p };
  inkLine(p, p); // a dot, for a tap
  schedulePredict();
});

drawCanvas.addEventListener('pointermove', (event) => {
  if (!stroke || event.pointerId !== stroke.id) return;
  event.preventDefault();
  const moves = typeof event.getCoalescedEvents === 'function' ? event.getCoalescedEvents() : [];
  for (const e of moves.length ? moves : [event]) {
    const p = canvasPoint(e);
    inkLine(stroke, p);
    stroke.x = p.x;
    stroke.y = p.y;
  }
  schedulePredict();
});

function endStroke(event) {
  if (!stroke || event.pointerId !== stroke.id) return;
  stroke = null;
  schedulePredict();
}
drawCanvas.addEventListener('pointerup', endStroke);
drawCanvas.addEventListener('pointercancel', endStroke);

let predictQueued = false;

function schedulePredict() {
  if (predictQueued) return;
  predictQueued = true;
  requestAnimationFrame(() => {
    predictQueued = false;
    predictDrawing();
  });
}

/** The canvas as grey levels (0 = black .. 255 = white), one byte a pixel. */
function canvasGray() {
  const { width, height } = drawCanvas;
  const rgba = drawContext.getImageData(0, 0, width, height).data;
  const gray = new Uint8Array(width * height);
  for (let i = 0; i < gray.length; i++) {
    const r = rgba[4 * i];
    const g = rgba[4 * i + 1];
    const b = rgba[4 * i + 2];
    gray[i] = Math.round(0.299 * r + 0.587 * g + 0.114 * b);
  }
  return gray;
}

/** Whether a prediction is on its way from the module, and whether the drawing changed since. */
let predicting = false;
let predictAgain = false;
/** Counts changes of the drawing and the model: a prediction of an older one is not shown. */
let drawingVersion = 0;

/** Read the drawing with the model (one call at a time; the latest drawing wins). */
async function predictDrawing() {
  if (!engine) return;
  if (predicting) {
    predictAgain = true;
    return;
  }
  predicting = true;
  try {
    await predictOnce();
  } finally {
    predicting = false;
  }
  if (predictAgain) {
    predictAgain = false;
    predictDrawing();
  }
}

async function predictOnce() {
  const version = drawingVersion;
  if (!engine.hasModel) {
    showBars(null);
    $('predict-hint').textContent = 'Train or load a model to read your digit';
    return;
  }
  if (!hasInk) {
    showBars(null);
    $('predict-hint').textContent = 'Draw a digit in the box.';
    return;
  }
  let probs;
  try {
    probs = await engine.predict(canvasGray(), drawCanvas.width, drawCanvas.height);
  } catch (error) {
    showBars(null);
    showMessage(errorText(error));
    return;
  }
  // The drawing (or the model) changed while the module worked: `predictAgain` reads it anew.
  if (version !== drawingVersion) return;
  if (probs.length === 0) {
    showBars(null);
    $('predict-hint').textContent = 'Draw a digit in the box.';
    return;
  }
  const best = showBars(probs);
  const article = best === 8 ? 'an' : 'a';
  $('predict-hint').textContent = `Looks like ${article} ${best} (${(100 * probs[best]).toFixed(1)} %).`;
}

/** The ten rows of #probs, built once. */
const probRows = [];

function buildBars() {
  const container = $('probs');
  for (let digit = 0; digit < 10; digit++) {
    const row = document.createElement('div');
    row.className = 'row';
    const label = document.createElement('span');
    label.className = 'digit';
    label.textContent = String(digit);
    const track = document.createElement('div');
    track.className = 'track';
    const bar = document.createElement('div');
    bar.className = 'bar';
    bar.setAttribute('role', 'meter');
    bar.setAttribute('aria-label', `probability of ${digit}`);
    bar.setAttribute('aria-valuemin', '0');
    bar.setAttribute('aria-valuemax', '1');
    track.append(bar);
    const pct = document.createElement('span');
    pct.className = 'pct';
    row.append(label, track, pct);
    container.append(row);
    probRows.push({ row, bar, pct });
  }
  showBars(null);
}

/** Show ten probabilities (null: all zero); returns the digit with the highest one. */
function showBars(probs) {
  let best = -1;
  if (probs) {
    best = 0;
    for (let d = 1; d < 10; d++) if (probs[d] > probs[best]) best = d;
  }
  probRows.forEach(({ row, bar, pct }, digit) => {
    const p = probs ? probs[digit] : 0;
    bar.dataset.p = String(p);
    bar.setAttribute('aria-valuenow', String(p));
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    pct.textContent = `${(100 * p).toFixed(1)}%`;
    row.classList.toggle('max', digit === best);
  });
  return best;
}

// ---------------------------------------------------------------------------------------------
// Model files

/** Enable the download when there is a model, and read the drawing again with it. */
function refreshModel() {
  drawingVersion += 1;
  const has = Boolean(engine && engine.hasModel);
  $('download').disabled = !has;
  predictDrawing();
}

function downloadModel() {
  const bytes = engine && engine.modelBytes;
  if (!bytes) {
    showMessage('No model yet: train or load one.');
    return;
  }
  const url = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
  const link = document.createElement('a');
  link.href = url;
  link.download = MODEL_FILE_NAME;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30_000);
}

async function loadModelFile(file) {
  // Checked by its size before it is read, so that a huge file is refused in one sentence.
  const limit = engine.limits.model;
  if (file.size > limit) {
    showMessage(`${file.name} is ${file.size.toLocaleString('en')} bytes, more than the ${limit / 2 ** 20} MiB model files this page reads.`);
    return;
  }
  let bytes;
  try {
    bytes = new Uint8Array(await file.arrayBuffer());
  } catch (error) {
    showMessage(`Could not read ${file.name} (${errorText(error)}).`);
    return;
  }
  try {
    const description = await engine.loadModel(bytes, file.name);
    $('model-status').textContent = description;
    showMessage(description, 'info');
  } catch (error) {
    showMessage(errorText(error));
  }
  refreshModel();
}

// ---------------------------------------------------------------------------------------------
// Start

function wireControls() {
  $('train-form').addEventListener('submit', (event) => {
    event.preventDefault();
    onTrain();
  });
  $('stop').addEventListener('click', onStop);
  $('model').addEventListener('change', applyModelDefaults);
  $('clear').addEventListener('click', () => {
    clearDrawing();
    showBars(null);
    predictDrawing();
  });
  $('download').addEventListener('click', downloadModel);
  // Files picked while the WebAssembly module is still loading wait for it (`pendingPicks`).
  $('model-file').addEventListener('change', async (event) => {
    const input = event.target;
    const file = input.files && input.files[0];
    input.value = ''; // the same file can be picked again
    if (!file) return;
    if (engine) await loadModelFile(file);
    else queuePick('model', [file]);
  });
  $('data-files').addEventListener('change', async (event) => {
    const input = event.target;
    const files = input.files ? [...input.files] : [];
    input.value = '';
    if (files.length === 0) return;
    if (engine) await loadPickedData(files);
    else queuePick('data', files);
  });
  if (typeof ResizeObserver === 'function') {
    new ResizeObserver(() => scheduleChart()).observe($('chart'));
  } else {
    window.addEventListener('resize', scheduleChart);
  }
}

/** Files picked before the WebAssembly module was ready, by kind ('model', 'data'): the last of each. */
const pendingPicks = new Map();

function queuePick(kind, files) {
  pendingPicks.set(kind, files);
  showMessage('The page is still loading its WebAssembly module: the picked files will be read once it is ready.', 'info');
}

/** Read what was picked while the module loaded. */
async function takePendingPicks() {
  const model = pendingPicks.get('model');
  const data = pendingPicks.get('data');
  pendingPicks.clear();
  if (model) await loadModelFile(model[0]);
  if (data) return loadPickedData(data);
  return false;
}

async function main() {
  setState('loading');
  const params = new URLSearchParams(window.location.search);
  applyQuery(params);
  clearDrawing();
  buildBars();
  wireControls();
  drawChart();

  try {
    // `engine` is set only once the module is ready: until then picked files wait (`queuePick`).
    const build = ['plain', 'simd128'].includes(params.get('build')) ? params.get('build') : bestBuild();
    engine = await Engine.start(build);
  } catch (error) {
    engine = null;
    showMessage(errorText(error));
    $('status').textContent = 'The page cannot train without its WebAssembly module.';
    setState('error');
    return;
  }
  // A trap inside the module: the run (if any) fails with the same sentence, and the module is
  // already being restarted with the data and model it had.
  engine.onFault = (sentence) => {
    showMessage(sentence);
    refreshModel();
  };
  window.gpuMnistBuild = engine.build;
  window.gpuMnistSaveModel = () => {
    if (!engine.modelBytes) throw new Error('No model yet: train or load one.');
    return Array.from(engine.modelBytes);
  };
  window.gpuMnistKernelCheck = () => engine.kernelCheck();
  window.gpuMnistCpuCheck = () => engine.cpuCheck();
  window.gpuMnistModuleModel = async () => Array.from((await engine.moduleModelBytes()) ?? []);
  window.gpuMnistFaultNextRun = (kind) => {
    nextFault = kind;
  };
  refreshModel();

  const picked = await takePendingPicks();
  const loaded = picked || (await loadDefaultData());
  if (loaded && params.get('autostart') === '1' && !run) await startRun();
}

main();
