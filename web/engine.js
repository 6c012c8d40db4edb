// The page's handle on its training module: the WebAssembly build runs in a worker (worker.js),
// which this restarts whenever the module inside it traps, so that no fault wedges the page.
//
// Contract. `Engine.start(build)` resolves once the worker's module is ready, or rejects with one
// sentence naming it. Every call after that returns a promise that settles: with the module's
// value, with its refusal (an Error whose message is one sentence), or, when the module traps (a
// panic, running out of memory), with an Error saying what happened and that the module was
// restarted. A restart starts a fresh worker and hands it the data and the model the old one
// had (the last data files `loadData` accepted and the file bytes of the latest trained or
// loaded model, both kept here), so that the page goes on as before the trap; `onFault` is told
// the same sentence. A second trap before any call has succeeded since the first (a fault that
// repeats by itself), or a restart that cannot load the module, ends the restarts: the sentence
// then says to reload the page. One run at a time: `train` refuses a second while one is in
// flight, and a `stop` asked before the run reaches the module is passed on after it. The build
// is "simd128" (WebAssembly SIMD, where the browser validates it) or "plain".

/**
 * The smallest module with a SIMD instruction (i8x16.popcnt of a splat): browsers that validate
 * it run WebAssembly SIMD, the build in pkg-simd/.
 */
const SIMD_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11,
]);

/** "simd128" where this browser runs WebAssembly SIMD, else "plain". */
export function bestBuild() {
  try {
    return WebAssembly.validate(SIMD_PROBE) ? 'simd128' : 'plain';
  } catch {
    return 'plain';
  }
}

export class Engine {
  /** The worker, null between a trap and its replacement (or for good, after the restarts end). */
  #worker = null;
  /** Settles once the current worker is ready (module loaded, data and model handed over). */
  #ready = null;
  /** Calls awaiting a reply, by id: { resolve, reject, onEvent, counts }. */
  #pending = new Map();
  #nextId = 1;
  /** Whether `#open` is under way (a trap then is not answered with yet another restart). */
  #opening = false;
  /** Traps since a call last succeeded: a second one in a row ends the restarts. */
  #faultsInARow = 0;
  /** The four data files the module last accepted, handed to a restarted module. */
  #data = null;
  /** The file bytes of the latest trained or loaded model (null before one). */
  #model = null;
  /** Whether a `train` is in flight, and whether Stop was pressed during it. */
  #training = false;
  #stopAsked = false;

  /** Called with the sentence of each trap, after the restart has begun. */
  onFault = () => {};

  constructor(build) {
    /** "simd128" or "plain", as asked; `build` is replaced by the module's own answer. */
    this.build = build;
    /** The module's size limits: { data: [four byte counts], model: bytes }. */
    this.limits = null;
    /** How many times the module has been restarted after a trap. */
    this.restarts = 0;
  }

  static async start(build = bestBuild()) {
    const engine = new Engine(build);
    engine.#ready = engine.#open();
    await engine.#ready;
    return engine;
  }

  /** A new worker with its module, then the data and model of the one before, if any. */
  async #open() {
    this.#opening = true;
    try {
      await this.#openWorker();
    } finally {
      this.#opening = false;
    }
  }

  async #openWorker() {
    const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
    this.#worker = worker;
    worker.addEventListener('message', (event) => this.#receive(worker, event.data));
    worker.addEventListener('error', (event) => {
      event.preventDefault();
      this.#fault(worker, `The training worker failed (${event.message || 'worker.js could not run'})`);
    });
    const { build, limits } = await this.#send('init', [this.build]);
    this.build = build;
    this.limits = limits;
    if (this.#data) await this.#send('load_data', this.#data);
    if (this.#model) await this.#send('load_model', [this.#model, 'the model kept from before the restart']);
  }

  /** Post a call; `counts`: its success shows the module works (not a restart's own calls). */
  #send(call, args, onEvent = null, counts = false) {
    const worker = this.#worker;
    if (!worker) return Promise.reject(new Error('The training module is not running: reload the page.'));
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      this.#pending.set(id, { resolve, reject, onEvent, counts });
      worker.postMessage({ id, call, args });
    });
  }

  #receive(worker, message) {
    if (worker !== this.#worker) return;
    if (message.fault) {
      this.#fault(worker, message.fault);
      return;
    }
    const pending = this.#pending.get(message.id);
    if (!pending) return;
    if ('event' in message) {
      if (pending.onEvent) pending.onEvent(message.event);
      return;
    }
    this.#pending.delete(message.id);
    if ('error' in message) {
      pending.reject(new Error(message.error));
      return;
    }
    if (pending.counts) this.#faultsInARow = 0;
    pending.resolve(message.ok);
  }

  /** End a worker whose module trapped, fail its calls, and start a fresh one. */
  #fault(worker, why) {
    if (worker !== this.#worker) return;
    worker.terminate();
    this.#worker = null;
    this.#faultsInARow += 1;
    const calls = [...this.#pending.values()];
    this.#pending.clear();
    const tell = (sentence) => {
      for (const call of calls) call.reject(new Error(sentence));
      this.onFault(sentence);
    };
    if (this.#opening || this.#faultsInARow > 1) {
      // The module failed while starting, or trapped on what it was handed, or traps again by
      // itself: no loop of restarts.
      const again = this.restarts > 0 || !this.#opening ? ', again after a restart' : '';
      tell(`${why}${again}; reload the page.`);
      return;
    }
    this.restarts += 1;
    const kept = [this.#data && 'the data', this.#model && 'the model'].filter(Boolean).join(' and ');
    // The restart begins before anyone is told, so that a call made on hearing of the trap (the
    // page reads the drawing again) waits for the fresh module.
    this.#ready = this.#open();
    tell(`${why}; the page restarted the module${kept ? ` with ${kept} it had` : ''}, so it can train again.`);
    this.#ready.catch((error) => {
      const text = error instanceof Error ? error.message : String(error);
      // Already said when the restart itself trapped.
      if (this.#worker) this.onFault(`${text.replace(/\.$/, '')}: reload the page.`);
    });
  }

  /** A call once the module is ready. */
  async #call(call, args = [], onEvent = null) {
    await this.#ready;
    return this.#send(call, args, onEvent, true);
  }

  /** Check the four MNIST files (Uint8Arrays); resolves to a one-line summary. */
  async loadData(files) {
    const summary = await this.#call('load_data', files);
    this.#data = files;
    return summary;
  }

  /** Train with `options` (an object); `onEvent` gets each progress event's JSON text. Resolves
   *  to the result line; the trained model's file bytes come back with it. */
  async train(options, onEvent) {
    if (this.#training) throw new Error('Training is already running; press Stop first.');
    this.#training = true;
    this.#stopAsked = false;
    try {
      await this.#ready;
      const reply = this.#send('train', [JSON.stringify(options)], onEvent, true);
      // A Stop pressed before the run reached the module: messages arrive in order, so the
      // module's run is under way when this one is read.
      if (this.#stopAsked) this.stop();
      const { line, model } = await reply;
      this.#model = model;
      return line;
    } finally {
      this.#training = false;
    }
  }

  /** Ask a running train to stop after its current chunk. */
  stop() {
    if (this.#training) this.#stopAsked = true;
    if (this.#worker) this.#worker.postMessage({ call: 'stop' });
  }

  /** Ten probabilities for a drawing of `width` x `height` grey levels (empty without ink). */
  predict(gray, width, height) {
    return this.#call('predict', [gray, width, height]);
  }

  /** Make a model file the module's model; resolves to a one-line description. */
  async loadModel(bytes, fileName) {
    const { description, model } = await this.#call('load_model', [bytes, fileName]);
    this.#model = model;
    return description;
  }

  /** Whether there is a model to predict with and to download. */
  get hasModel() {
    return this.#model !== null;
  }

  /** The model's file bytes (the same as `gpu-mnist train --save` writes), or null. */
  get modelBytes() {
    return this.#model;
  }

  /** The module's own model as file bytes (null without one), asked of the worker: for tests. */
  async moduleModelBytes() {
    try {
      return await this.#call('save_model');
    } catch {
      return null;
    }
  }

  /** The WebGPU kernels against the CPU reference (JSON text). */
  kernelCheck() {
    return this.#call('kernel_check');
  }

  /** The CPU path, as this build compiles it, against the CPU reference (JSON text). */
  cpuCheck() {
    return this.#call('cpu_check');
  }
}
