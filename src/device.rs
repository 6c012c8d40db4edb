//! Choosing the backend for `--device auto|gpu|cpu|reference` and `--adapter`.
//!
//! Contract: `gpu` takes the best wgpu adapter (a software one counts) or fails listing what was
//! found; `auto` takes a hardware GPU when there is one, else the fast CPU path, and says why in
//! `OpenedDevice::note`; `cpu` is the fast CPU path; `reference` the plain-loop CPU reference.

use crate::backend::cpu::CpuBackend;
use crate::backend::wgpu::{self as gpu, WgpuBackend};
use crate::backend::Backend;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Gpu,
    Cpu,
    Reference,
}

/// A ready backend and one line saying what was chosen and why.
pub struct OpenedDevice {
    pub backend: Box<dyn Backend>,
    pub note: String,
}

pub fn open_device(choice: DeviceChoice, adapter_filter: Option<&str>) -> Result<OpenedDevice> {
    match choice {
        DeviceChoice::Cpu => {
            let be = CpuBackend::fast();
            Ok(OpenedDevice {
                note: format!("device: {} (--device cpu)", be.name()),
                backend: Box::new(be),
            })
        }
        DeviceChoice::Reference => {
            let be = CpuBackend::reference();
            Ok(OpenedDevice {
                note: format!("device: {} (--device reference)", be.name()),
                backend: Box::new(be),
            })
        }
        DeviceChoice::Gpu => {
            let be = WgpuBackend::open(adapter_filter, false)?;
            Ok(OpenedDevice {
                note: format!("device: {} (--device gpu)", be.name()),
                backend: Box::new(be),
            })
        }
        DeviceChoice::Auto => {
            let adapters = gpu::list_adapters();
            let hardware = adapters.iter().find(|a| a.is_hardware() && a.matches(adapter_filter));
            match hardware {
                Some(a) => {
                    let be = WgpuBackend::open(adapter_filter, true)?;
                    let note = format!("device: {} (--device auto: {} GPU found)", be.name(), a.device_type);
                    Ok(OpenedDevice {
                        note,
                        backend: Box::new(be),
                    })
                }
                None => {
                    let be = CpuBackend::fast();
                    let why = match adapters.iter().find(|a| a.matches(adapter_filter)) {
                        Some(a) => format!(
                            "only the software adapter '{}' was found, which runs 60 to 100 times slower than the CPU path",
                            a.name
                        ),
                        None => "no GPU adapter was found".to_string(),
                    };
                    let note = format!("device: {} (--device auto: {why})", be.name());
                    Ok(OpenedDevice {
                        note,
                        backend: Box::new(be),
                    })
                }
            }
        }
    }
}

/// Parse a `--device` value.
pub fn parse_device(text: &str) -> Result<DeviceChoice> {
    match text {
        "auto" => Ok(DeviceChoice::Auto),
        "gpu" => Ok(DeviceChoice::Gpu),
        "cpu" => Ok(DeviceChoice::Cpu),
        "reference" => Ok(DeviceChoice::Reference),
        other => Err(Error::usage(
            "--device",
            format!("'{other}' is not one of auto, gpu, cpu, reference"),
        )),
    }
}
