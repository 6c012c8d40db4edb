//! gpu-mnist: train MNIST classifiers with WGSL compute shaders on wgpu, with a plain-loop CPU
//! reference that every kernel is checked against and a fast CPU fallback.
//!
//! Layout: `data` (IDX files, download, shuffling), `model` (the layer graph and its cached
//! plans), `plan` (a step's ops and the fusion pass), `backend` (the `Backend` trait, the typed
//! ops of a step, and the CPU and wgpu implementations), `train` (the training loop as a library:
//! `fit` with an `Observer`, evaluation, prediction), `optim` (optimizers and each step's
//! scalars), `schedule` (learning-rate schedules), `recipe` (presets such as `--model fast`),
//! `settings` (the environment's knobs, read once), `checkpoint` (safetensors), `records` (the run folder), `device` (choosing a backend),
//! `bench` (the measurements behind `gpu-mnist bench`). The library also builds for
//! wasm32 (the browser page in `web/`), without the downloader, progress bars, `device` (the
//! command line's choice of backend) and `bench`.

pub mod backend;
#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod checkpoint;
pub mod data;
#[cfg(not(target_arch = "wasm32"))]
pub mod device;
pub mod error;
pub mod image;
#[cfg(not(target_arch = "wasm32"))]
pub mod lock;
pub mod model;
pub mod optim;
pub mod plan;
#[cfg(not(target_arch = "wasm32"))]
pub mod progress;
pub mod recipe;
pub mod records;
pub mod schedule;
pub mod settings;
pub mod spec;
pub mod train;

pub use error::{Error, Result};
