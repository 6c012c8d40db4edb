//! Pipelines: each kernel of `shaders/` compiled once per process, and the bind groups and
//! parameter blocks of its dispatches, created once and reused.
//!
//! Contract: `Pipelines::dispatch` records one dispatch into a compute pass. A dispatch is named by
//! its kernel (for the matmul: with its `TileConfig`), its parameter block (`ParamWords`, the
//! shader's `Params` uniform) and its bindings (binding number and buffer range); bind groups and
//! uniform buffers are cached by that name, so after the first epoch a training step creates no
//! wgpu object at all. A kernel's WGSL is its shader file prepared by `shader_text`
//! (`Kernel::source`). `Pipelines::prepare` compiles a list of pipelines on parallel threads.

use std::collections::HashMap;

use super::buffers::Slice;
use super::context::GpuContext;
use super::params::ParamWords;
use super::shader_text::{expand_includes, expand_unrolls, select_variants, shader};
use super::tiling::{ConvProduct, TileConfig};
use crate::error::Result;

/// matmul.wgsl's operand maps (`//!variant` blocks) of a dense layer's products.
const DENSE_OPERANDS: [&str; 2] = ["a_dense", "b_dense"];

/// Every kernel entry point of `shaders/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    Gather,
    GatherAugmented,
    /// A dense layer's product (matmul.wgsl with the strided operand maps).
    Matmul(TileConfig),
    /// A convolution's product (matmul.wgsl with the product's operand maps).
    Conv(TileConfig, ConvProduct),
    SoftmaxXent,
    /// The output layer's whole step (output_layer.wgsl, compiled after softmax_xent.wgsl).
    OutputLayer,
    MaxPoolForward,
    MaxPoolBackward,
    Dropout,
    BatchNormStats,
    BatchNormForward,
    BatchNormBackwardParams,
    BatchNormBackwardInput,
    /// A lone optimizer step (update.wgsl, with optimizer.wgsl included).
    Update,
}

impl Kernel {
    /// The shader file that holds this kernel's entry point.
    fn file(self) -> &'static str {
        match self {
            Kernel::Gather | Kernel::GatherAugmented => "gather.wgsl",
            Kernel::Matmul(_) | Kernel::Conv(..) => "matmul.wgsl",
            Kernel::SoftmaxXent => "softmax_xent.wgsl",
            Kernel::OutputLayer => "output_layer.wgsl",
            Kernel::MaxPoolForward | Kernel::MaxPoolBackward => "pool.wgsl",
            Kernel::Dropout => "dropout.wgsl",
            Kernel::BatchNormStats
            | Kernel::BatchNormForward
            | Kernel::BatchNormBackwardParams
            | Kernel::BatchNormBackwardInput => "batch_norm.wgsl",
            Kernel::Update => "update.wgsl",
        }
    }

    /// The WGSL that is compiled: the matmul with its operand maps and its tiling's values, the
    /// output layer's step after the loss it shares code with, includes and `//!unroll` lines
    /// expanded.
    pub fn source(self) -> String {
        let matmul = |operands: [&str; 2]| select_variants(&expand_includes(shader("matmul.wgsl")), &operands);
        match self {
            Kernel::Matmul(tiles) => tiles.source(&matmul(DENSE_OPERANDS)),
            Kernel::Conv(tiles, product) => tiles.source(&matmul(product.operands())),
            Kernel::OutputLayer => {
                let joined = format!("{}\n{}", shader("softmax_xent.wgsl"), shader("output_layer.wgsl"));
                expand_unrolls(&expand_includes(&joined), |_| None)
            }
            _ => expand_unrolls(&expand_includes(shader(self.file())), |_| None),
        }
    }

    /// The entry point, with the tiling of a matmul: a profile's label.
    pub fn label(self) -> String {
        match self {
            Kernel::Matmul(t) => format!("matmul {}x{} kc {} s {}", t.tm, t.tn, t.kc, t.s),
            Kernel::Conv(t, p) => format!("matmul {}x{} kc {} s {} {}", t.tm, t.tn, t.kc, t.s, p.label()),
            _ => self.entry_point().to_string(),
        }
    }

    fn entry_point(self) -> &'static str {
        match self {
            Kernel::Gather => "gather_batch",
            Kernel::GatherAugmented => "gather_augmented",
            Kernel::Matmul(_) | Kernel::Conv(..) => "matmul",
            Kernel::SoftmaxXent => "softmax_xent_forward_backward",
            Kernel::OutputLayer => "output_layer_step",
            Kernel::MaxPoolForward => "maxpool_forward",
            Kernel::MaxPoolBackward => "maxpool_backward",
            Kernel::Dropout => "dropout",
            Kernel::BatchNormStats => "bn_stats",
            Kernel::BatchNormForward => "bn_forward",
            Kernel::BatchNormBackwardParams => "bn_backward_params",
            Kernel::BatchNormBackwardInput => "bn_backward_input",
            Kernel::Update => "update",
        }
    }
}

#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    kernel: Kernel,
    params: ParamWords,
    /// (binding, buffer id, byte offset, byte size) of each bound slice.
    buffers: Vec<(u32, u64, u64, u64)>,
}

/// Pipelines, uniform blocks and bind groups, each created once.
#[derive(Default)]
pub struct Pipelines {
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
    uniforms: HashMap<ParamWords, wgpu::Buffer>,
    bind_groups: HashMap<BindKey, wgpu::BindGroup>,
}

/// Compile `kernel`'s shader module and pipeline (what a driver may take a few hundred
/// milliseconds over, the first time on a machine).
fn compile(device: &wgpu::Device, kernel: Kernel) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(kernel.file()),
        source: wgpu::ShaderSource::Wgsl(kernel.source().into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(kernel.entry_point()),
        layout: None,
        module: &module,
        entry_point: Some(kernel.entry_point()),
        compilation_options: wgpu::PipelineCompilationOptions::default(),
        cache: None,
    })
}

impl Pipelines {
    /// Compile the pipelines of `kernels` not compiled yet, each on a thread of its own, so that
    /// a step's first dispatch does not wait for them one after another.
    pub fn prepare(&mut self, ctx: &GpuContext, kernels: &[Kernel]) -> Result<()> {
        let mut todo: Vec<Kernel> = kernels
            .iter()
            .copied()
            .filter(|k| !self.pipelines.contains_key(k))
            .collect();
        todo.dedup();
        let device = &ctx.device;
        #[cfg(not(target_arch = "wasm32"))]
        let compiled: Vec<(Kernel, wgpu::ComputePipeline)> = std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .iter()
                .map(|&k| scope.spawn(move || (k, compile(device, k))))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        // A page has one thread (the browser compiles in the background anyway).
        #[cfg(target_arch = "wasm32")]
        let compiled: Vec<(Kernel, wgpu::ComputePipeline)> = todo.iter().map(|&k| (k, compile(device, k))).collect();
        ctx.errors.check("compiling the shaders")?;
        for (kernel, pipeline) in compiled {
            self.pipelines.insert(kernel, pipeline);
        }
        Ok(())
    }

    fn pipeline(&mut self, ctx: &GpuContext, kernel: Kernel) -> Result<&wgpu::ComputePipeline> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.pipelines.entry(kernel) {
            let pipeline = compile(&ctx.device, kernel);
            ctx.errors
                .check(&format!("compiling shaders/{} ({})", kernel.file(), kernel.label()))?;
            slot.insert(pipeline);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each matmul pipeline defines every operand function once, and the dense one holds none of
    /// the convolution's code (its text is matmul.wgsl's without the convolution maps).
    #[test]
    fn every_matmul_pipeline_has_one_operand_map_for_a_and_for_b() {
        let tiles = TileConfig::SOFTWARE;
        let products = [
            ConvProduct::Forward,
            ConvProduct::BackwardInput,
            ConvProduct::BackwardWeight,
        ];
        let kernels = std::iter::once(Kernel::Matmul(tiles)).chain(products.map(|p| Kernel::Conv(tiles, p)));
        let mut sources = Vec::new();
        for kernel in kernels {
            let source = kernel.source();
            for f in ["a_pos", "a_row", "load_a", "store_a", "b_pos", "load_b"] {
                let defined = source.matches(&format!("fn {f}(")).count();
                assert_eq!(defined, 1, "{}: fn {f} defined {defined} times", kernel.label());
            }
            // No directive or placeholder left outside the comments.
            let mut code = source.lines().map(|l| l.split("//").next().unwrap_or_default());
            assert!(
                source.lines().all(|l| !l.trim_start().starts_with("//!")) && code.all(|l| !l.contains("{{")),
                "{}",
                kernel.label()
            );
            sources.push(source);
        }
        assert!(
            !sources[0].contains("params.in_ch"),
            "the dense pipeline reads a convolution field"
        );
        for (i, a) in sources.iter().enumerate() {
            assert!(
                sources[i + 1..].iter().all(|b| b != a),
                "two pipelines compile the same text"
            );
        }
    }
}
