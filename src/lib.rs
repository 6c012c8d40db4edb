//! gpu-mnist: train MNIST classifiers with WGSL compute shaders on wgpu, with a plain-loop CPU
//! reference that every kernel is checked against and a fast CPU fallback.
//!
//! Layout: `data` (IDX files, download, shuffling), `model` (the layer graph), `backend` (the
//! `Backend` trait and its CPU and wgpu implementations), `train` (the loop), `checkpoint`
//! (safetensors), `device` (choosing a backend).

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod image;
pub mod model;
pub mod optim;
pub mod plan;
pub mod progress;
pub mod records;
pub mod settings;
pub mod train;

pub use error::{Error, Result};
