//! A `Backend` that hands the browser its event loop between chunks of steps.
//!
//! Contract: `Yielding` runs every op on the backend it wraps, unchanged; only
//! `collect_stats` (awaited once per chunk by the training loop and evaluation) first waits for
//! one turn of the browser's event loop (`setTimeout(0)`), so that the page redraws and handles
//! input between chunks even on the CPU path, whose read-backs are ready at once.

use gpu_mnist::backend::ops::{Fusions, Op, StepAt};
use gpu_mnist::backend::{Backend, Counters, DatasetId, DeviceLimits, Packed, Readback, StepStats, TensorId};
use gpu_mnist::data::Dataset;
use gpu_mnist::Result;
use wasm_bindgen::prelude::*;

pub struct Yielding {
    inner: Box<dyn Backend>,
}

impl Yielding {
    pub fn new(inner: Box<dyn Backend>) -> Self {
        Yielding { inner }
    }
}

/// One turn of the event loop: a promise that `setTimeout(resolve, 0)` resolves.
async fn next_turn() {
    let promise = js_sys::Promise::new(&mut |resolve, _reject| {
        let global = js_sys::global();
        let set_timeout = js_sys::Reflect::get(&global, &JsValue::from_str("setTimeout"))
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        match set_timeout {
            Some(f) => {
                let _ = f.call2(&global, &resolve, &JsValue::from(0));
            }
            None => {
                let _ = resolve.call0(&JsValue::NULL);
            }
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

impl Backend for Yielding {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn alloc(&mut self, len: usize) -> Result<TensorId> {
        self.inner.alloc(len)
    }
    fn alloc_packed(&mut self, lens: &[usize]) -> Result<Packed> {
        self.inner.alloc_packed(lens)
    }
    fn limits(&self) -> DeviceLimits {
        self.inner.limits()
    }
    fn write(&mut self, t: TensorId, data: &[f32]) -> Result<()> {
        self.inner.write(t, data)
    }
    fn read(&mut self, t: TensorId) -> Readback<'_, Vec<f32>> {
        self.inner.read(t)
    }
    fn upload_dataset(&mut self, data: &Dataset) -> Result<DatasetId> {
        self.inner.upload_dataset(data)
    }
    fn set_order(&mut self, ds: DatasetId, order: &[u32]) -> Result<()> {
        self.inner.set_order(ds, order)
    }
    fn reserve_stats(&mut self, slots: usize) -> Result<()> {
        self.inner.reserve_stats(slots)
    }
    fn fusions(&self) -> Fusions {
        self.inner.fusions()
    }
    fn prepare(&mut self, ops: &[Op]) -> Result<()> {
        self.inner.prepare(ops)
    }
    fn run(&mut self, op: &Op, at: StepAt) -> Result<()> {
        self.inner.run(op, at)
    }
    fn request_stats(&mut self, first: usize, count: usize) -> Result<()> {
        self.inner.request_stats(first, count)
    }
    fn collect_stats(&mut self) -> Readback<'_, Vec<StepStats>> {
        Box::pin(async move {
            next_turn().await;
            self.inner.collect_stats().await
        })
    }
    fn runs_behind_host(&self) -> bool {
        self.inner.runs_behind_host()
    }
    fn sync(&mut self) -> Readback<'_, ()> {
        self.inner.sync()
    }
    fn counters(&self) -> Counters {
        self.inner.counters()
    }
    fn start_profile(&mut self, ops: u32) -> Result<bool> {
        self.inner.start_profile(ops)
    }
    fn finish_profile(&mut self) -> Readback<'_, Vec<(String, f64)>> {
        self.inner.finish_profile()
    }
}
