//! GPU time of each dispatch, from timestamps the device writes at compute-pass boundaries.
//!
//! Contract: while a `Profile` is active the backend records every dispatch in a compute pass of
//! its own whose beginning and end write timestamps `2i` and `2i + 1`; `Profile::resolve` adds
//! the copy of those timestamps to the final encoder and `Profile::read` returns, per dispatch,
//! its label and its duration in microseconds. Passes of their own add barriers and gaps, so a
//! profile measures each kernel, not the step's total (for that, time a run of steps).

use super::context::GpuContext;
use crate::error::{Error, Result};

pub struct Profile {
    pub query_set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    capacity: u32,
    labels: Vec<String>,
}

impl Profile {
    /// Room for `dispatches` dispatches; fails when the device cannot write timestamps.
    pub fn new(ctx: &GpuContext, dispatches: u32) -> Result<Profile> {
        if !ctx.timestamps {
            return Err(Error::Gpu(format!(
                "adapter '{}' cannot write timestamps (no TIMESTAMP_QUERY)",
                ctx.summary.name
            )));
        }
        let count = dispatches.clamp(1, wgpu::QUERY_SET_MAX_QUERIES / 2) * 2;
        let query_set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let bytes = count as u64 * 8;
        let resolved = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile read-back"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.errors.check("creating the timestamp queries")?;
        Ok(Profile {
            query_set,
            resolved,
            readback,
            capacity: count / 2,
            labels: Vec::new(),
        })
    }

    /// The timestamp writes for the next dispatch, named `label`; None once the set is full.
    pub fn next(&mut self, label: String) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        let i = self.labels.len() as u32;
        if i >= self.capacity {
            return None;
        }
        self.labels.push(label);
        Some(wgpu::ComputePassTimestampWrites {
            query_set: &self.query_set,
            beginning_of_pass_write_index: Some(2 * i),
            end_of_pass_write_index: Some(2 * i + 1),
        })
    }

    /// Record the copy of the written timestamps into the read-back buffer.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        let n = self.labels.len() as u32 * 2;
        if n > 0 {
            encoder.resolve_query_set(&self.query_set, 0..n, &self.resolved, 0);
            encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, n as u64 * 8);
        }
    }

    /// After the resolve was submitted: (label, microseconds) of each profiled dispatch.
    pub fn read(self, ctx: &GpuContext) -> Result<Vec<(String, f64)>> {
        let n = self.labels.len() as u64 * 2;
        if n == 0 {
            return Ok(Vec::new());
        }
        let slice = self.readback.slice(0..n * 8);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        ctx.wait("reading the profile")?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(
            &slice
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("reading the profile failed: {e}")))?,
        );
        let ns_per_tick = ctx.queue.get_timestamp_period() as f64;
        Ok(self
            .labels
            .into_iter()
            .zip(ticks.chunks_exact(2))
            .map(|(label, t)| (label, t[1].saturating_sub(t[0]) as f64 * ns_per_tick / 1e3))
            .collect())
    }
}
