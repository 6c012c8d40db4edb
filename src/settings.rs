//! The tuning knobs and testing aids that come from the environment, read in this one place,
//! once per process, into one `Settings` value (`bench --json` prints it), whose parts are handed
//! to the backends (`CpuBackend::fast(&settings.cpu)`, `WgpuBackend::open(.., &settings.gpu)`):
//! nothing below this module reads the environment's knobs.
//!
//! Contract: `settings()` never fails: a variable whose value it can not take reads as unset, and
//! `check()` (called before any device opens) turns such a value into a usage error naming the
//! variable. Where the data lives (`GPU_MNIST_DATA`, `GPU_MNIST_MIRRORS`) is not a knob: `data`
//! reads those.

use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::backend::cpu::{CpuSettings, SimdLimit};
use crate::backend::wgpu::{GpuSettings, TileConfig};
use crate::error::{Error, Result};

/// The most threads `GPU_MNIST_CPU_THREADS` may ask for.
pub const MAX_CPU_THREADS: usize = 1024;

/// Every knob, as read from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// For `CpuBackend::fast`: `GPU_MNIST_CPU_THREADS`, threads of the CPU path (None: one per
    /// core), and `GPU_MNIST_CPU_SIMD=avx512|avx2|portable`, the widest vector instructions it
    /// uses, so that every variant can be tested on one machine.
    pub cpu: CpuSettings,
    /// For `WgpuBackend::open`: `GPU_MNIST_MATMUL_TILES=TM,TN,KC,S`, one tiling for every GPU
    /// matmul (None: per shape); `GPU_MNIST_OUTPUT_FUSION=0|1`, run the output layer's step as one
    /// GPU dispatch or not (None: the adapter's default); `GPU_MNIST_INJECT_DEVICE_LOSS=N`
    /// (testing aid), the GPU reports a lost device from its N-th read-back on, so that the
    /// recovery paths can be tested without a failing GPU.
    pub gpu: GpuSettings,
    /// `GPU_MNIST_AUTO_ACCEPTS_SOFTWARE=1` (testing aid): `--device auto` takes a software adapter
    /// as if it were a hardware GPU, so that the GPU-to-CPU hand-over can be tested without one.
    pub auto_accepts_software: bool,
}

/// The settings of this process.
pub fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| read(|name| std::env::var(name).ok()).0)
}

/// A usage error naming the first variable whose value can not be taken.
pub fn check() -> Result<()> {
    match read(|name| std::env::var(name).ok()).1.into_iter().next() {
        Some((name, why)) => Err(Error::usage(name, why)),
        None => Ok(()),
    }
}

/// The settings from `var`, and (variable, why) for each value that was refused.
fn read(var: impl Fn(&str) -> Option<String>) -> (Settings, Vec<(&'static str, String)>) {
    let mut refused = Vec::new();
    let mut take = |name: &'static str, parse: &dyn Fn(&str) -> std::result::Result<(), String>| -> Option<String> {
        let v = var(name).filter(|v| !v.is_empty())?;
        match parse(&v) {
            Ok(()) => Some(v),
            Err(why) => {
                refused.push((name, why));
                None
            }
        }
    };
    let cpu_threads = take("GPU_MNIST_CPU_THREADS", &|v| parse_threads(v).map(|_| ()));
    let cpu_simd = take("GPU_MNIST_CPU_SIMD", &|v| SimdLimit::parse(v).map(|_| ()));
    let matmul_tiles = take("GPU_MNIST_MATMUL_TILES", &|v| TileConfig::parse(v).map(|_| ()));
    let output_layer_fusion = take("GPU_MNIST_OUTPUT_FUSION", &|v| parse_switch(v).map(|_| ()));
    let inject_device_loss = take("GPU_MNIST_INJECT_DEVICE_LOSS", &|v| {
        v.parse::<u64>()
            .map(|_| ())
            .map_err(|_| format!("'{v}' is not a read-back count"))
    });
    let auto_accepts_software = take("GPU_MNIST_AUTO_ACCEPTS_SOFTWARE", &|v| parse_switch(v).map(|_| ()));
    let settings = Settings {
        cpu: CpuSettings {
            threads: cpu_threads.and_then(|v| parse_threads(&v).ok()),
            simd: cpu_simd.and_then(|v| SimdLimit::parse(&v).ok()).unwrap_or_default(),
        },
        gpu: GpuSettings {
            matmul_tiles: matmul_tiles.and_then(|v| TileConfig::parse(&v).ok()),
            output_layer_fusion: output_layer_fusion.and_then(|v| parse_switch(&v).ok()),
            inject_device_loss: inject_device_loss.and_then(|v| v.parse().ok()),
        },
        auto_accepts_software: auto_accepts_software.and_then(|v| parse_switch(&v).ok()) == Some(true),
    };
    (settings, refused)
}

fn parse_threads(v: &str) -> std::result::Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if (1..=MAX_CPU_THREADS).contains(&n) => Ok(n),
        _ => Err(format!("'{v}' is not a thread count from 1 to {MAX_CPU_THREADS}")),
    }
}

fn parse_switch(v: &str) -> std::result::Result<bool, String> {
    match v {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(format!("'{v}' is not 0 or 1")),
    }
}

impl Settings {
    /// Every knob by its variable's name, for `bench --json` (null: unset).
    pub fn to_json(&self) -> Value {
        let tiles = self
            .gpu
            .matmul_tiles
            .map(|t| format!("{},{},{},{}", t.tm, t.tn, t.kc, t.s));
        json!({
            "GPU_MNIST_CPU_THREADS": self.cpu.threads,
            "GPU_MNIST_CPU_SIMD": self.cpu.simd.name(),
            "GPU_MNIST_MATMUL_TILES": tiles,
            "GPU_MNIST_OUTPUT_FUSION": self.gpu.output_layer_fusion,
            "GPU_MNIST_INJECT_DEVICE_LOSS": self.gpu.inject_device_loss,
            "GPU_MNIST_AUTO_ACCEPTS_SOFTWARE": self.auto_accepts_software,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> (Settings, Vec<(&'static str, String)>) {
        read(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn values_are_read_and_bad_ones_named() {
        let (s, refused) = from(&[]);
        assert!(refused.is_empty());
        assert_eq!(
            (s.cpu.threads, s.cpu.simd, s.gpu.output_layer_fusion),
            (None, SimdLimit::Best, None)
        );
        let (s, refused) = from(&[
            ("GPU_MNIST_CPU_THREADS", "3"),
            ("GPU_MNIST_CPU_SIMD", "avx2"),
            ("GPU_MNIST_MATMUL_TILES", "32,32,16,1"),
            ("GPU_MNIST_OUTPUT_FUSION", "0"),
            ("GPU_MNIST_AUTO_ACCEPTS_SOFTWARE", "1"),
        ]);
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(s.cpu.threads, Some(3));
        assert_eq!(s.cpu.simd, SimdLimit::Avx2);
        assert_eq!(
            s.gpu.matmul_tiles.map(|t| (t.tm, t.tn, t.kc, t.s)),
            Some((32, 32, 16, 1))
        );
        assert_eq!(s.gpu.output_layer_fusion, Some(false));
        assert!(s.auto_accepts_software);
        let (s, refused) = from(&[
            ("GPU_MNIST_CPU_THREADS", "0"),
            ("GPU_MNIST_CPU_SIMD", "sse"),
            ("GPU_MNIST_OUTPUT_FUSION", "yes"),
        ]);
        let names: Vec<&str> = refused.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["GPU_MNIST_CPU_THREADS", "GPU_MNIST_CPU_SIMD", "GPU_MNIST_OUTPUT_FUSION"]
        );
        assert_eq!((s.cpu.threads, s.cpu.simd), (None, SimdLimit::Best));
    }
}
