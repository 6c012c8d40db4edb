//! Recording a chunk of work: dispatches go into one command encoder and one compute pass (a
//! pass per dispatch while profiling), submitted at a synchronisation point with any copies the
//! caller adds; read-back buffers are kept and reused.
//!
//! Contract: `record` binds what a dispatch names (`Bound`), opening the encoder and pass if none
//! is open; nothing reaches the device before `submit`, which checks the device's error scope.

use super::buffers::{self, PendingRead, Slice};
use super::params::ParamWords;
use super::pipelines::Kernel;
use super::WgpuBackend;
use crate::backend::{DatasetId, TensorId};
use crate::error::{Error, Result};

/// The encoder being recorded and its open compute pass.
pub(super) struct Recording {
    pub(super) encoder: wgpu::CommandEncoder,
    pub(super) pass: Option<wgpu::ComputePass<'static>>,
}

/// What a binding of a dispatch refers to.
#[derive(Clone, Copy)]
pub(super) enum Bound {
    Tensor(TensorId),
    Images(DatasetId),
    Labels(DatasetId),
    Order(DatasetId),
    Stats,
    Dummy,
    DummyOut,
    /// The whole buffer that holds this tensor (a packed group).
    BufferOf(TensorId),
    /// The optimizer's step table (`optimizer::select_step` made it).
    StepTable,
    /// Dropout's step base (`dropout::select_step_base` made it).
    StepBase,
}

impl WgpuBackend {
    /// Record one dispatch, opening an encoder and pass if none is open.
    pub(super) fn record(
        &mut self,
        kernel: Kernel,
        params: ParamWords,
        bind: &[(u32, Bound)],
        grid: (u32, u32, u32),
    ) -> Result<()> {
        let recording = self.recording.get_or_insert_with(|| Recording {
            encoder: self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("steps") }),
            pass: None,
        });
        if recording.pass.is_none() || self.profile.is_some() {
            // One pass for everything, or, while profiling, one pass per dispatch.
            drop(recording.pass.take());
            let timestamp_writes = self.profile.as_mut().and_then(|p| p.next(kernel.label()));
            let pass = recording
                .encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("steps"),
                    timestamp_writes,
                })
                .forget_lifetime();
            recording.pass = Some(pass);
        }
        let (mut table_read, mut base_read) = (false, false);
        let buffers: Vec<(u32, Slice)> = bind
            .iter()
            .map(|&(binding, b)| -> Result<(u32, Slice)> {
                let slice = match b {
                    Bound::Tensor(t) => self.tensors[t.0].slice(),
                    Bound::Images(d) => self.datasets[d.0].images.whole(),
                    Bound::Labels(d) => self.datasets[d.0].labels.whole(),
                    Bound::Order(d) => self.datasets[d.0].order.whole(),
                    // Callers check the slot against stats_slots, so stats exists here.
                    Bound::Stats => self.stats.as_ref().unwrap_or(&self.dummy).whole(),
                    Bound::Dummy => self.dummy.whole(),
                    Bound::DummyOut => match self.dummy_out.get(binding as usize) {
                        Some(buffer) => buffer.whole(),
                        None => return Err(Error::Gpu(format!("binding {binding} is past the unused outputs"))),
                    },
                    Bound::BufferOf(t) => self.tensors[t.0].buf.whole(),
                    Bound::StepTable => match &self.step_table {
                        Some(table) => {
                            table_read = true;
                            table.buf.whole()
                        }
                        None => return Err(Error::Gpu("no optimizer step table to bind".to_string())),
                    },
                    Bound::StepBase => match &self.step_base {
                        Some(base) => {
                            base_read = true;
                            base.buf.whole()
                        }
                        None => return Err(Error::Gpu("no dropout step base to bind".to_string())),
                    },
                };
                Ok((binding, slice))
            })
            .collect::<Result<_>>()?;
        let pass = recording
            .pass
            .as_mut()
            .ok_or_else(|| Error::Gpu("no open compute pass".to_string()))?;
        self.pipelines
            .dispatch(&self.ctx, pass, kernel, params, &buffers, grid)?;
        self.counters.dispatches += 1;
        if let Some(table) = self.step_table.as_mut().filter(|_| table_read) {
            table.read_pending = true;
        }
        if let Some(base) = self.step_base.as_mut().filter(|_| base_read) {
            base.read_pending = true;
        }
        Ok(())
    }

    /// Close the pass, let `copy` add copies, and submit everything recorded.
    pub(super) fn submit(
        &mut self,
        copy: impl FnOnce(&mut Self, &mut wgpu::CommandEncoder),
    ) -> Result<wgpu::SubmissionIndex> {
        let mut encoder = match self.recording.take() {
            Some(mut r) => {
                drop(r.pass.take());
                r.encoder
            }
            None => self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("copy") }),
        };
        copy(self, &mut encoder);
        let index = self.ctx.queue.submit([encoder.finish()]);
        if let Some(table) = self.step_table.as_mut() {
            table.read_pending = false;
        }
        if let Some(base) = self.step_base.as_mut() {
            base.read_pending = false;
        }
        self.counters.submits += 1;
        self.ctx.errors.check("running the recorded GPU work")?;
        Ok(index)
    }

    /// Submit pending work (if any) so that a queue write lands after it.
    pub(super) fn flush(&mut self) -> Result<()> {
        if self.recording.is_some() {
            self.submit(|_, _| {})?;
        }
        Ok(())
    }

    /// A free read-back buffer of at least `bytes`, or a new one.
    pub(super) fn take_staging(&mut self, bytes: u64) -> wgpu::Buffer {
        match self.free_staging.iter().position(|b| b.size() >= bytes) {
            Some(i) => self.free_staging.swap_remove(i),
            None => buffers::create_staging(&self.ctx, bytes),
        }
    }

    /// Submit pending work with a copy of the first `bytes` of tensor `t`; wait and return them.
    pub(super) async fn read_bytes(&mut self, t: TensorId, bytes: u64) -> Result<Vec<u8>> {
        let bytes = bytes.max(4);
        let staging = self.take_staging(bytes);
        let index = self.submit(|me, encoder| {
            let src = me.tensors[t.0].slice();
            encoder.copy_buffer_to_buffer(&src.buf.buffer, src.offset, &staging, 0, bytes.min(src.size));
        })?;
        let (data, staging) = PendingRead::start(staging, bytes, index).finish(&self.ctx).await?;
        self.free_staging.push(staging);
        self.counters.readbacks += 1;
        Ok(data)
    }
}
