//! Choosing the backend for `--device auto|gpu|cpu|reference` and `--adapter`.
//!
//! Contract: `gpu` takes the best wgpu adapter (a software one counts) or fails listing what was
//! found; `auto` takes a hardware GPU when there is one, else the fast CPU path, and says why in
//! `OpenedDevice::note`; `cpu` is the fast CPU path; `reference` the plain-loop CPU reference.

use crate::backend::cpu::CpuBackend;
use crate::backend::wgpu::{self as gpu, WgpuBackend};
use crate::backend::Backend;
use crate::error::Result;

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
    /// The backend is a wgpu device (not a CPU path).
    pub is_gpu: bool,
}

pub fn open_device(choice: DeviceChoice, adapter_filter: Option<&str>) -> Result<OpenedDevice> {
    // Any choice may end on the CPU path (auto, or a failing GPU handing over).
    crate::settings::check()?;
    let settings = crate::settings::settings();
    let cpu = |be: CpuBackend, why: &str| OpenedDevice {
        note: format!("device: {} ({why})", be.name()),
        backend: Box::new(be),
        is_gpu: false,
    };
    let gpu = |be: WgpuBackend, why: &str| OpenedDevice {
        note: format!("device: {} ({why})", be.name()),
        backend: Box::new(be),
        is_gpu: true,
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu(CpuBackend::fast(&settings.cpu), "--device cpu")),
        DeviceChoice::Reference => Ok(cpu(CpuBackend::reference(), "--device reference")),
        DeviceChoice::Gpu => Ok(gpu(
            WgpuBackend::open(adapter_filter, false, &settings.gpu)?,
            "--device gpu",
        )),
        DeviceChoice::Auto => {
            let adapters = gpu::list_adapters();
            let software_ok = settings.auto_accepts_software;
            let usable = adapters
                .iter()
                .find(|a| (a.is_hardware() || software_ok) && a.matches(adapter_filter));
            match usable {
                Some(a) => match WgpuBackend::open(adapter_filter, !software_ok, &settings.gpu) {
                    Ok(be) => Ok(gpu(be, &format!("--device auto: {} GPU found", a.device_type))),
                    // A GPU that is there but can not be used: the CPU path runs instead.
                    Err(e) => Ok(cpu(
                        CpuBackend::fast(&settings.cpu),
                        &format!("--device auto: '{}' could not be used ({e})", a.name),
                    )),
                },
                None => {
                    let why = match adapters.iter().find(|a| a.matches(adapter_filter)) {
                        Some(a) => format!(
                            "only the software adapter '{}' was found, which runs 50 to 100 times slower than the CPU path",
                            a.name
                        ),
                        None => "no GPU adapter was found".to_string(),
                    };
                    Ok(cpu(CpuBackend::fast(&settings.cpu), &format!("--device auto: {why}")))
                }
            }
        }
    }
}
