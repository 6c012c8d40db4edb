//! Kernels: WGSL sources from `shaders/`, compiled once per process into pipelines, and the
//! bind groups and parameter blocks of their dispatches, created once and reused.
//!
//! Contract: `Kernels::dispatch` records one dispatch into a compute pass. A dispatch is named by
//! its kernel, its parameter block (8 u32 words, the shader's `Params` uniform) and its bindings
//! (binding number and buffer range); bind groups and uniform buffers are cached by that name, so
//! after the first epoch a training step creates no wgpu object at all.

use std::collections::HashMap;

use super::buffers::Slice;
use super::context::GpuContext;
use crate::error::Result;

/// Every kernel entry point of `shaders/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    Gather,
    Matmul,
    BiasAdd,
    BiasBackward,
    ReluForward,
    ReluBackward,
    SoftmaxXent,
    RmsProp,
    Sgd,
}

impl Kernel {
    /// (file name, WGSL source) of the shader that holds this kernel.
    fn shader(self) -> (&'static str, &'static str) {
        match self {
            Kernel::Gather => ("gather.wgsl", include_str!("../../../shaders/gather.wgsl")),
            Kernel::Matmul => ("matmul.wgsl", include_str!("../../../shaders/matmul.wgsl")),
            Kernel::BiasAdd | Kernel::BiasBackward => ("bias.wgsl", include_str!("../../../shaders/bias.wgsl")),
            Kernel::ReluForward | Kernel::ReluBackward => ("relu.wgsl", include_str!("../../../shaders/relu.wgsl")),
            Kernel::SoftmaxXent => ("softmax_xent.wgsl", include_str!("../../../shaders/softmax_xent.wgsl")),
            Kernel::RmsProp | Kernel::Sgd => ("optim.wgsl", include_str!("../../../shaders/optim.wgsl")),
        }
    }

    fn entry_point(self) -> &'static str {
        match self {
            Kernel::Gather => "gather_batch",
            Kernel::Matmul => "matmul",
            Kernel::BiasAdd => "bias_add_forward",
            Kernel::BiasBackward => "bias_backward",
            Kernel::ReluForward => "relu_forward",
            Kernel::ReluBackward => "relu_backward",
            Kernel::SoftmaxXent => "softmax_xent_forward_backward",
            Kernel::RmsProp => "rmsprop_update",
            Kernel::Sgd => "sgd_update",
        }
    }
}

/// The `Params` uniform of a dispatch: 8 words (f32 values stored as their bits).
pub type ParamWords = [u32; 8];

#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    kernel: Kernel,
    params: ParamWords,
    /// (binding, buffer id, byte offset, byte size) of each bound slice.
    buffers: Vec<(u32, u64, u64, u64)>,
}

/// Pipelines, uniform blocks and bind groups, each created once.
#[derive(Default)]
pub struct Kernels {
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
    uniforms: HashMap<ParamWords, wgpu::Buffer>,
    bind_groups: HashMap<BindKey, wgpu::BindGroup>,
}

impl Kernels {
    fn pipeline(&mut self, ctx: &GpuContext, kernel: Kernel) -> Result<&wgpu::ComputePipeline> {
        if !self.pipelines.contains_key(&kernel) {
            let (file, source) = kernel.shader();
            let module = self.modules.entry(file).or_insert_with(|| {
                ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(file),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                })
            });
            let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.entry_point()),
                layout: None,
                module,
                entry_point: Some(kernel.entry_point()),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            });
            ctx.errors
                .check(&format!("compiling shaders/{file} ({})", kernel.entry_point()))?;
            self.pipelines.insert(kernel, pipeline);
        }
        Ok(&self.pipelines[&kernel])
    }

    /// Record `kernel` over `grid` workgroups with the given parameters and buffers.
    pub fn dispatch(
        &mut self,
        ctx: &GpuContext,
        pass: &mut wgpu::ComputePass<'static>,
        kernel: Kernel,
        params: ParamWords,
        buffers: &[(u32, Slice)],
        grid: (u32, u32, u32),
    ) -> Result<()> {
        let key = BindKey {
            kernel,
            params,
            buffers: buffers.iter().map(|(b, s)| (*b, s.buf.id, s.offset, s.size)).collect(),
        };
        if !self.bind_groups.contains_key(&key) {
            self.pipeline(ctx, kernel)?;
            let uniform = self.uniforms.entry(params).or_insert_with(|| {
                use wgpu::util::DeviceExt;
                ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("params"),
                    contents: bytemuck::cast_slice(&params),
                    usage: wgpu::BufferUsages::UNIFORM,
                })
            });
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: uniform.as_entire_binding(),
            }];
            entries.extend(buffers.iter().map(|(binding, s)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &s.buf.buffer,
                    offset: s.offset,
                    size: wgpu::BufferSize::new(s.size),
                }),
            }));
            let layout = self.pipelines[&kernel].get_bind_group_layout(0);
            let group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel.entry_point()),
                layout: &layout,
                entries: &entries,
            });
            ctx.errors
                .check(&format!("binding buffers for {}", kernel.entry_point()))?;
            self.bind_groups.insert(
                BindKey {
                    kernel,
                    params,
                    buffers: key.buffers.clone(),
                },
                group,
            );
        }
        let pipeline = self.pipeline(ctx, kernel)?;
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &self.bind_groups[&key], &[]);
        pass.dispatch_workgroups(grid.0, grid.1, grid.2);
        Ok(())
    }
}

/// Workgroups for `n` invocations of a 64-wide 1-D kernel, folded onto a 2-D grid when the count
/// passes the per-dimension limit (the shaders compute i = x + y * groups_x * 64).
pub fn grid_1d(n: usize, max_per_dim: u32) -> (u32, u32, u32) {
    let groups = n.div_ceil(64).max(1) as u64;
    let max = max_per_dim.max(1) as u64;
    if groups <= max {
        (groups as u32, 1, 1)
    } else {
        (max as u32, groups.div_ceil(max) as u32, 1)
    }
}

/// f32 as a parameter word.
pub fn bits(v: f32) -> u32 {
    v.to_bits()
}
