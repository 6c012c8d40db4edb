// gpu-mnist's training module in a dedicated worker: one instance of the WebAssembly build,
// answering the page's calls (engine.js sends them).
//
// Contract. The first message is {id, call: 'init', args: [build]}: it loads pkg-simd/ (build
// "simd128", WebAssembly SIMD) or pkg/ ("plain") and replies with the build and the module's file
// size limits; calls that arrive while it loads wait for it. Then {id, call, args} runs the
// export of that name (load_data, train, predict, load_model, save_model, kernel_check,
// cpu_check) and replies {id, ok: value} or {id, error: sentence}; train replies {line, model}
// and load_model {description, model}, with the model's file bytes written in the same turn (so
// the page's copy is always the module's model); train's progress events go out as
// {id, event: text} before its reply. {call: 'stop'} asks a running (or queued) train to stop
// and gets no reply. A trap inside the module (a panic, or an abort such as running out of
// memory) leaves the instance in an unknown state: the worker then posts one {fault: sentence},
// saying what happened, and answers nothing more; the page ends it and starts a fresh one.

/** The module's exports, once `init` has run. */
let wasm = null;
/** Settles when `init` has: calls that arrive while the module loads wait for it. */
let started = null;
/** Its WebAssembly memory, to say how much was in use when it trapped. */
let memory = null;
/** Set once the module has trapped: no call is passed to it after that. */
let faulted = false;

function errorText(error) {
  if (error instanceof Error) return error.message;
  return String(error);
}

/** Say once what trapped, then stay silent: the page ends this worker. */
function fault(error) {
  if (faulted) return;
  faulted = true;
  // One line, without a closing full stop: it goes inside the page's one sentence.
  const oneLine = (text) => String(text).split('\n')[0].trim().replace(/\.$/, '');
  const panic = self.gpuMnistPanic;
  const what = oneLine(error instanceof Error ? `${error.name}: ${error.message}` : error);
  let why;
  if (panic) {
    why = `The WebAssembly module stopped on an internal error (${oneLine(panic)})`;
  } else if (error instanceof WebAssembly.RuntimeError) {
    // A trap that no panic announced: an abort, which on wasm32 is almost always an allocation
    // the memory could not grow to.
    const mib = memory ? Math.round(memory.buffer.byteLength / 2 ** 20) : 0;
    why = `The WebAssembly module aborted (${what}) with ${mib.toLocaleString('en')} MiB of memory in use, ` +
      'most likely out of memory (WebAssembly has 4 GiB at most)';
  } else {
    why = `The WebAssembly module failed (${what})`;
  }
  postMessage({ fault: why });
}

/**
 * Whether an error thrown by a call means the module trapped, not a refusal it returned (those
 * are plain Errors): a wasm trap, a stack overflow (RangeError), or anything after a panic.
 */
function trapped(error) {
  return error instanceof WebAssembly.RuntimeError || error instanceof RangeError || Boolean(self.gpuMnistPanic);
}

// A trap inside an asynchronous export (train's chunks run from the event loop) surfaces here.
self.addEventListener('error', (event) => {
  event.preventDefault();
  fault(event.error || event.message);
});
self.addEventListener('unhandledrejection', (event) => {
  event.preventDefault();
  fault(event.reason);
});

async function init(build) {
  const path = build === 'simd128' ? './pkg-simd/gpu_mnist_web.js' : './pkg/gpu_mnist_web.js';
  let module;
  try {
    module = await import(path);
    const exports = await module.default();
    memory = exports.memory;
  } catch (error) {
    throw new Error(`Could not start the WebAssembly module ${path.slice(2)} (${errorText(error)}).`);
  }
  wasm = module;
  return {
    build: wasm.build(),
    limits: { data: Array.from(wasm.data_file_limits()), model: wasm.model_file_limit() },
  };
}

async function run(id, call, args) {
  switch (call) {
    case 'load_data': return wasm.load_data(args[0], args[1], args[2], args[3]);
    case 'train': {
      const line = await wasm.train(args[0], (text) => postMessage({ id, event: text }));
      return { line, model: wasm.save_model() };
    }
    case 'predict': return wasm.predict(args[0], args[1], args[2]);
    case 'load_model': {
      const description = wasm.load_model(args[0], args[1]);
      return { description, model: wasm.save_model() };
    }
    case 'save_model': return wasm.has_model() ? wasm.save_model() : null;
    case 'kernel_check': return wasm.kernel_check();
    case 'cpu_check': return wasm.cpu_check();
    default: throw new Error(`unknown call '${call}'`);
  }
}

self.addEventListener('message', async (event) => {
  const { id, call, args = [] } = event.data;
  if (faulted) return;
  if (call === 'stop') {
    // While the module loads, after it: a train queued behind the load has begun by then.
    if (wasm) wasm.stop();
    else if (started) started.then(() => wasm && wasm.stop(), () => {});
    return;
  }
  try {
    if (call === 'init') started = init(args[0]);
    await started;
    if (!wasm) throw new Error('The WebAssembly module is not loaded.');
    const value = call === 'init' ? await started : await run(id, call, args);
    if (!faulted) postMessage({ id, ok: value });
  } catch (error) {
    if (call !== 'init' && trapped(error)) fault(error);
    else if (!faulted) postMessage({ id, error: errorText(error) });
  }
});
