//! The wgpu context: instance (from the environment, so `WGPU_BACKEND` works), adapter choice,
//! device with the limits we need checked up front, and errors captured instead of panicking.
//!
//! Contract: `GpuContext::open_async` either returns a device whose limits cover every kernel of the
//! crate, or an `Error::Gpu` naming the adapter and the missing limit. wgpu reports validation,
//! out-of-memory and device-lost errors through callbacks; they are stored in `ErrorSlot` and
//! turned into `Error::Gpu` at the next check (after each submit and read-back).

use std::sync::{Arc, Mutex};

use super::tiling::WORKGROUP_BYTES;
use crate::error::{Error, Result};

/// A summary of one adapter, for `devices` and for choosing.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
    hardware: bool,
}

impl AdapterSummary {
    fn from_adapter(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let hardware = matches!(
            info.device_type,
            wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
        );
        AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: device_type_text(info.device_type).to_string(),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            hardware,
        }
    }

    /// A discrete or integrated GPU (not a software or virtual adapter).
    pub fn is_hardware(&self) -> bool {
        self.hardware
    }

    /// Whether the name contains `filter` (case-insensitive); no filter matches all.
    pub fn matches(&self, filter: Option<&str>) -> bool {
        filter.is_none_or(|f| self.name.to_lowercase().contains(&f.to_lowercase()))
    }
}

fn device_type_text(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "software (cpu)",
        wgpu::DeviceType::Other => "other",
    }
}

/// Preference order when several adapters match: hardware first.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn instance() -> (wgpu::Instance, wgpu::Backends) {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        // Vulkan, Metal, DX12: the GL backend is only tried when asked for (WGPU_BACKEND=gl),
        // which also keeps its display probing quiet.
        desc.backends = wgpu::Backends::PRIMARY;
    }
    let backends = desc.backends;
    (wgpu::Instance::new(desc), backends)
}

/// Every adapter wgpu can see, best first.
#[cfg(not(target_arch = "wasm32"))]
async fn adapters() -> Vec<wgpu::Adapter> {
    let (instance, backends) = instance();
    let mut all = instance.enumerate_adapters(backends).await;
    all.sort_by_key(|a| rank(a.get_info().device_type));
    all
}

/// The adapter the browser offers (WebGPU lists none: a page asks for one).
#[cfg(target_arch = "wasm32")]
async fn adapters() -> Vec<wgpu::Adapter> {
    let (instance, _) = instance();
    let options = wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    };
    instance.request_adapter(&options).await.into_iter().collect()
}

/// Every adapter wgpu can see, best first.
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters() -> Vec<AdapterSummary> {
    pollster::block_on(adapters())
        .iter()
        .map(AdapterSummary::from_adapter)
        .collect()
}

/// Storage buffers the fused output layer binds (output_layer.wgsl).
pub const OUTPUT_LAYER_STORAGE_BUFFERS: u32 = 9;

/// The limits every kernel of the crate needs (buffer sizes are raised to the adapter's).
fn required_limits(adapter: &wgpu::Adapter, name: &str) -> Result<wgpu::Limits> {
    let have = adapter.limits();
    let mut need = wgpu::Limits::downlevel_defaults();
    // The matmul binds 8 storage buffers and uses up to 256 threads and 16 KiB of workgroup memory.
    let checks: [(&str, u64, u64); 4] = [
        (
            "max_storage_buffers_per_shader_stage",
            8,
            have.max_storage_buffers_per_shader_stage as u64,
        ),
        (
            "max_compute_invocations_per_workgroup",
            256,
            have.max_compute_invocations_per_workgroup as u64,
        ),
        (
            "max_compute_workgroup_size_x",
            256,
            have.max_compute_workgroup_size_x as u64,
        ),
        (
            "max_compute_workgroup_storage_size",
            WORKGROUP_BYTES as u64,
            have.max_compute_workgroup_storage_size as u64,
        ),
    ];
    for (limit, needed, has) in checks {
        if has < needed {
            return Err(Error::Gpu(format!(
                "adapter '{name}' has {limit} = {has}, gpu-mnist needs at least {needed}; use --device cpu"
            )));
        }
    }
    // The fused output layer (output_layer.wgsl) binds 9; it is used only where the device has them.
    need.max_storage_buffers_per_shader_stage = have
        .max_storage_buffers_per_shader_stage
        .min(OUTPUT_LAYER_STORAGE_BUFFERS);
    need.max_compute_workgroup_storage_size = WORKGROUP_BYTES;
    need.max_compute_invocations_per_workgroup = 256;
    need.max_compute_workgroup_size_x = 256;
    need.max_storage_buffer_binding_size = have.max_storage_buffer_binding_size;
    need.max_buffer_size = have.max_buffer_size;
    need.max_compute_workgroups_per_dimension = have.max_compute_workgroups_per_dimension;
    Ok(need)
}

/// The first error wgpu reported since the last check.
#[derive(Clone, Default)]
pub struct ErrorSlot(Arc<Mutex<Option<String>>>);

impl ErrorSlot {
    fn set(&self, message: String) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert(message);
        }
    }

    /// Err with the stored message, if wgpu reported one.
    pub fn check(&self, what: &str) -> Result<()> {
        let taken = self.0.lock().ok().and_then(|mut s| s.take());
        match taken {
            Some(msg) => Err(Error::Gpu(format!("{what} failed: {msg}"))),
            None => Ok(()),
        }
    }
}

/// An open device and what we know about it.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub summary: AdapterSummary,
    pub limits: wgpu::Limits,
    pub errors: ErrorSlot,
    /// The device can write timestamps at compute-pass boundaries (for `bench`'s profile).
    pub timestamps: bool,
}

impl GpuContext {
    /// Open the best adapter whose name contains `filter`; with `hardware_only`, skip software
    /// ones. Awaits the adapter and the device (a native caller blocks on it, a page awaits it).
    pub async fn open_async(filter: Option<&str>, hardware_only: bool) -> Result<GpuContext> {
        let all = adapters().await;
        let found: Vec<String> = all
            .iter()
            .map(|a| {
                let s = AdapterSummary::from_adapter(a);
                format!("'{}' ({}, {})", s.name, s.backend, s.device_type)
            })
            .collect();
        let chosen = all.into_iter().find(|a| {
            let s = AdapterSummary::from_adapter(a);
            s.matches(filter) && (!hardware_only || s.is_hardware())
        });
        let adapter = match chosen {
            Some(a) => a,
            None if found.is_empty() && cfg!(target_arch = "wasm32") => {
                return Err(Error::Gpu("the browser offers no WebGPU adapter".to_string()))
            }
            None if found.is_empty() => {
                return Err(Error::Gpu(
                    "no GPU adapter found (no Vulkan, Metal or DX12 driver answered; WGPU_BACKEND=gl tries \
                     OpenGL); install a driver (on Debian: apt-get install mesa-vulkan-drivers libvulkan1) or \
                     use --device cpu"
                        .to_string(),
                ))
            }
            None => {
                let wanted = filter.map(|f| format!(" matching --adapter '{f}'")).unwrap_or_default();
                return Err(Error::Gpu(format!(
                    "no adapter{wanted}; found {}; use --device cpu",
                    found.join(", ")
                )));
            }
        };
        let summary = AdapterSummary::from_adapter(&adapter);
        let limits = required_limits(&adapter, &summary.name)?;
        let features = adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        let desc = wgpu::DeviceDescriptor {
            label: Some("gpu-mnist"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = adapter
            .request_device(&desc)
            .await
            .map_err(|e| Error::Gpu(format!("could not open adapter '{}': {e}", summary.name)))?;
        let errors = ErrorSlot::default();
        let slot = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| slot.set(one_line(&e.to_string()))));
        let slot = errors.clone();
        device.set_device_lost_callback(move |reason, msg| {
            slot.set(format!("the GPU device was lost ({reason:?}): {}", one_line(&msg)))
        });
        Ok(GpuContext {
            device,
            queue,
            summary,
            limits,
            errors,
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        })
    }

    /// Block until the queue is idle; report any error wgpu stored meanwhile.
    pub fn wait(&self, what: &str) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("{what}: waiting for the GPU failed: {e}")))?;
        self.errors.check(what)
    }
}

/// wgpu's messages span lines; a user gets one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
