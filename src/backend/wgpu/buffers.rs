//! The buffer manager: device buffers with ids (for the bind-group cache), allocated once and
//! reused; uploads through the queue; read-backs through mappable staging buffers.
//!
//! Contract: `create` checks the size against the device's limits and fails with the limit named
//! instead of letting wgpu raise a validation error. Every read-back copies into a staging buffer
//! (`create_staging`) in some submission; a `PendingRead` starts mapping it at once, and `finish`
//! waits for that submission only, so later submissions keep the device busy meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};

use super::context::GpuContext;
use crate::error::{Error, Result};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A device buffer and its process-unique id.
pub struct GpuBuffer {
    pub id: u64,
    pub buffer: wgpu::Buffer,
}

impl GpuBuffer {
    /// The whole buffer as a slice.
    pub fn whole(&self) -> Slice<'_> {
        Slice {
            buf: self,
            offset: 0,
            size: self.buffer.size(),
        }
    }
}

/// A byte range of a device buffer: what a kernel binding or a read-back refers to.
#[derive(Clone, Copy)]
pub struct Slice<'a> {
    pub buf: &'a GpuBuffer,
    pub offset: u64,
    pub size: u64,
}

/// Usage of every storage buffer: bound by kernels, written by the queue, copied for read-back.
const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Create a zero-filled storage buffer of at least `bytes` (rounded up to 4, at least 4).
pub fn create(ctx: &GpuContext, bytes: u64, what: &str) -> Result<GpuBuffer> {
    let bytes = bytes.max(4).div_ceil(4) * 4;
    let limit = ctx
        .limits
        .max_storage_buffer_binding_size
        .min(ctx.limits.max_buffer_size);
    if bytes > limit {
        return Err(Error::Gpu(format!(
            "{what} needs a buffer of {bytes} bytes, but adapter '{}' allows at most {limit} \
             (max_storage_buffer_binding_size); use a smaller model or --device cpu",
            ctx.summary.name
        )));
    }
    let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(what),
        size: bytes,
        usage: STORAGE,
        mapped_at_creation: false,
    });
    ctx.errors.check(&format!("allocating {bytes} bytes for {what}"))?;
    Ok(GpuBuffer {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        buffer,
    })
}

/// A mappable buffer that read-backs are copied into.
pub fn create_staging(ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read-back"),
        size: bytes.max(8).div_ceil(8) * 8,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// A read-back whose copy was submitted in submission `index`: mapping starts at once, and
/// `finish` waits for that submission only (later ones may still run).
pub struct PendingRead {
    staging: wgpu::Buffer,
    bytes: u64,
    index: wgpu::SubmissionIndex,
    mapped: futures_intrusive::channel::shared::OneshotReceiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

impl PendingRead {
    pub fn start(staging: wgpu::Buffer, bytes: u64, index: wgpu::SubmissionIndex) -> PendingRead {
        let (sender, mapped) = futures_intrusive::channel::shared::oneshot_channel();
        staging.slice(0..bytes).map_async(wgpu::MapMode::Read, move |result| {
            let _ = sender.send(result);
        });
        PendingRead {
            staging,
            bytes,
            index,
            mapped,
        }
    }

    /// Wait for the copy, return its bytes and the (unmapped) buffer for reuse. Natively the
    /// poll blocks until the submission is done and the mapping is then ready; in a browser the
    /// poll returns at once and the mapping's callback wakes the await.
    pub async fn finish(self, ctx: &GpuContext) -> Result<(Vec<u8>, wgpu::Buffer)> {
        ctx.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(self.index),
                timeout: None,
            })
            .map_err(|e| Error::Gpu(format!("reading back results: waiting for the GPU failed: {e}")))?;
        ctx.errors.check("reading back results")?;
        match self.mapped.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Gpu(format!("mapping the read-back buffer failed: {e}"))),
            None => return Err(Error::Gpu("the read-back was dropped (device lost?)".to_string())),
        }
        let data = self
            .staging
            .slice(0..self.bytes)
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("reading the mapped buffer failed: {e}")))?
            .to_vec();
        self.staging.unmap();
        Ok((data, self.staging))
    }
}
