//! Kernels: WGSL sources from `shaders/`, compiled once per process into pipelines, and the
//! bind groups and parameter blocks of their dispatches, created once and reused.
//!
//! Contract: `Kernels::dispatch` records one dispatch into a compute pass. A dispatch is named by
//! its kernel (for the matmul: with its `TileConfig`), its parameter block (16 u32 words, the
//! shader's `Params` uniform) and its bindings (binding number and buffer range); bind groups and
//! uniform buffers are cached by that name, so after the first epoch a training step creates no
//! wgpu object at all. Shader sources with `//!unroll` lines are expanded before compiling
//! (`expand_unrolls`); `Kernels::prepare` compiles a list of pipelines on parallel threads.

use std::collections::HashMap;

use super::buffers::Slice;
use super::context::GpuContext;
use crate::error::Result;

/// The tiling of one matmul pipeline (see the contract of `shaders/matmul.wgsl`): a workgroup
/// computes a `tm` x `tn` tile of c with `s` slices of (tm/4) x (tn/4) threads splitting K in
/// chunks of `kc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileConfig {
    pub tm: u32,
    pub tn: u32,
    pub kc: u32,
    pub s: u32,
}

/// Workgroup memory the shader may use (WebGPU's guaranteed minimum, requested from the device).
pub const WORKGROUP_BYTES: u32 = 16384;
/// Threads per workgroup the shaders may use (WebGPU's guaranteed minimum).
pub const WORKGROUP_THREADS: u32 = 256;

impl TileConfig {
    /// The tiling for software adapters (llvmpipe: an epoch in 25 s against 34 s with `for_shape`'s).
    pub const SOFTWARE: TileConfig = TileConfig {
        tm: 64,
        tn: 64,
        kc: 16,
        s: 1,
    };

    /// Parse "TM,TN,KC,S" (the `GPU_MNIST_MATMUL_TILES` tuning aid), checked like `new`.
    pub fn parse(text: &str) -> std::result::Result<TileConfig, String> {
        let v: Vec<u32> = text
            .split(',')
            .map(|p| p.trim().parse::<u32>().map_err(|_| format!("'{p}' is not a number")))
            .collect::<std::result::Result<_, _>>()?;
        match v[..] {
            [tm, tn, kc, s] => TileConfig::new(tm, tn, kc, s),
            _ => Err(format!("'{text}' is not TM,TN,KC,S")),
        }
    }

    /// A tiling the shader supports: tm, tn in {8, 16, 32, 64}, kc in {4, 8, 16, 32}, s in {1, 2,
    /// 4, 8, 16}, at most 256 threads and at least tn, whole copies per thread and at most 16 KiB of
    /// workgroup memory.
    pub fn new(tm: u32, tn: u32, kc: u32, s: u32) -> std::result::Result<TileConfig, String> {
        let cfg = TileConfig { tm, tn, kc, s };
        let pow2 = |v: u32, lo: u32, hi: u32| v.is_power_of_two() && (lo..=hi).contains(&v);
        if !(pow2(tm, 8, 64) && pow2(tn, 8, 64) && pow2(kc, 4, 32) && pow2(s, 1, 16)) {
            return Err(format!(
                "tiles {tm},{tn},{kc},{s}: need TM, TN in 8..64, KC in 4..32 (powers of 2), S in 1..16 (all powers of 2)"
            ));
        }
        // The column sums are finished by one thread a column: a workgroup needs TN threads or more.
        if tm * s < 16 {
            return Err(format!("tiles {tm},{tn},{kc},{s}: TM x S must be at least 16"));
        }
        let threads = cfg.threads_per_slice() * s;
        if threads > WORKGROUP_THREADS
            || !(tm * kc).is_multiple_of(cfg.threads_per_slice())
            || !(kc * tn).is_multiple_of(cfg.threads_per_slice())
        {
            return Err(format!(
                "tiles {tm},{tn},{kc},{s}: {threads} threads, or copies that do not divide evenly"
            ));
        }
        if cfg.smem_vec4s() * 16 > WORKGROUP_BYTES {
            return Err(format!(
                "tiles {tm},{tn},{kc},{s}: needs {} bytes of workgroup memory",
                cfg.smem_vec4s() * 16
            ));
        }
        Ok(cfg)
    }

    fn threads_per_slice(self) -> u32 {
        (self.tm / 4) * (self.tn / 4)
    }

    /// The shader's SMEM: the chunks of a and b of every slice, or the sums of every slice.
    fn smem_vec4s(self) -> u32 {
        let chunks = self.s * self.kc * (self.tm + self.tn);
        let sums = self.s * self.tm * self.tn;
        chunks.max(sums) / 4
    }

    /// The tiling for an (m, n, k) product, from sweeps of every tiling on an H200 (README):
    /// - n <= 16 (the output layer): 16x16 tiles, K in chunks of 8 spread over 16 slices (also when
    ///   K is short, so that an epoch's last, partial batch needs no pipeline of its own);
    /// - outputs of 256 or more 32x32 tiles (a weight gradient): 32x64 tiles, 2 slices;
    /// - smaller outputs: 16x32 tiles and 8 slices, which spread a long K over the workgroup and,
    ///   when K is short, share the epilogue among more threads (the first layer's forward
    ///   product 26 us, the input gradient with K = 10 8.6 us against 12.8 us with 1 slice).
    pub fn for_shape(m: usize, n: usize, k: usize) -> TileConfig {
        let chunks = |kc: usize| k.div_ceil(kc).max(1);
        let (tm, tn, kc, s) = if n <= 16 {
            (16, 16, 8, 16)
        } else if m.div_ceil(32) * n.div_ceil(32) >= 256 {
            (32, 64, 16, if chunks(16) >= 4 { 2 } else { 1 })
        } else {
            (16, 32, 8, 8)
        };
        // Every tiling above passes `new`; fall back to the plainest one if a change breaks that.
        TileConfig::new(tm, tn, kc, s).unwrap_or(TileConfig {
            tm: 32,
            tn: 32,
            kc: 16,
            s: 1,
        })
    }

    /// matmul.wgsl with this tiling's constants, its `//!unroll` lines expanded.
    fn source(self) -> String {
        let t = self.threads_per_slice();
        let with_constants: String = MATMUL_WGSL
            .lines()
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let constant = match words.get(1) {
                    Some(&"TM:") => Some(self.tm),
                    Some(&"TN:") => Some(self.tn),
                    Some(&"KC:") => Some(self.kc),
                    Some(&"S:") => Some(self.s),
                    Some(&"SMEM:") => Some(self.smem_vec4s()),
                    _ => None,
                };
                match constant {
                    Some(v) if words[0] == "const" => format!("const {} u32 = {v}u;\n", words[1]),
                    _ => format!("{line}\n"),
                }
            })
            .collect();
        expand_unrolls(&with_constants, |name| match name {
            "LA" => Some(self.tm * self.kc / t),
            "LB" => Some(self.kc * self.tn / t),
            "KC" => Some(self.kc),
            "S" => Some(self.s),
            "E" => Some(self.tm * self.tn / (t * self.s)),
            _ => None,
        })
    }
}

/// Expand each `//!unroll V COUNT: statement` line of a shader into COUNT copies of the statement
/// with `{V}` replaced by 0, 1, ...; COUNT is a number or a name `count_of` knows. naga emits
/// loops that drivers do not unroll, and a loop of loads that is not unrolled waits for each load
/// before issuing the next: unrolled, the loads are in flight together.
pub fn expand_unrolls(source: &str, count_of: impl Fn(&str) -> Option<u32>) -> String {
    let mut out = String::new();
    for line in source.lines() {
        let unroll = line.trim_start().strip_prefix("//!unroll ").and_then(|rest| {
            let (head, statement) = rest.split_once(':')?;
            let mut head = head.split_whitespace();
            let var = head.next()?;
            let count = head.next()?;
            Some((var, count.parse().ok().or_else(|| count_of(count)), statement.trim()))
        });
        match unroll {
            // An unknown COUNT must not silently drop the statement: make the shader fail to compile.
            Some((var, None, _)) => out.push_str(&format!("unknown_unroll_count_for_{var};\n")),
            Some((var, Some(count), statement)) => {
                let indent = &line[..line.len() - line.trim_start().len()];
                let pattern = format!("{{{var}}}");
                for i in 0..count {
                    out.push_str(indent);
                    out.push_str(&statement.replace(&pattern, &i.to_string()));
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

const MATMUL_WGSL: &str = include_str!("../../../shaders/matmul.wgsl");
const SOFTMAX_XENT_WGSL: &str = include_str!("../../../shaders/softmax_xent.wgsl");
const OUTPUT_LAYER_WGSL: &str = include_str!("../../../shaders/output_layer.wgsl");

/// Every kernel entry point of `shaders/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    Gather,
    Matmul(TileConfig),
    BiasAdd,
    BiasBackward,
    ReluForward,
    ReluBackward,
    SoftmaxXent,
    /// The output layer's whole step (output_layer.wgsl, compiled after softmax_xent.wgsl).
    OutputLayer,
    RmsProp,
    Sgd,
}

impl Kernel {
    /// (file name, WGSL text as written) of the shader that holds this kernel.
    fn file(self) -> (&'static str, &'static str) {
        match self {
            Kernel::Matmul(_) => ("matmul.wgsl", MATMUL_WGSL),
            Kernel::Gather => ("gather.wgsl", include_str!("../../../shaders/gather.wgsl")),
            Kernel::BiasAdd | Kernel::BiasBackward => ("bias.wgsl", include_str!("../../../shaders/bias.wgsl")),
            Kernel::ReluForward | Kernel::ReluBackward => ("relu.wgsl", include_str!("../../../shaders/relu.wgsl")),
            Kernel::SoftmaxXent => ("softmax_xent.wgsl", SOFTMAX_XENT_WGSL),
            Kernel::OutputLayer => ("output_layer.wgsl", OUTPUT_LAYER_WGSL),
            Kernel::RmsProp | Kernel::Sgd => ("optim.wgsl", include_str!("../../../shaders/optim.wgsl")),
        }
    }

    /// The WGSL that is compiled: the matmul with its tiling's constants, the output layer's
    /// step after the loss it shares code with, and every shader with its `//!unroll` lines
    /// expanded.
    fn source(self) -> String {
        match self {
            Kernel::Matmul(tiles) => tiles.source(),
            Kernel::OutputLayer => expand_unrolls(&format!("{SOFTMAX_XENT_WGSL}\n{OUTPUT_LAYER_WGSL}"), |_| None),
            _ => expand_unrolls(self.file().1, |_| None),
        }
    }

    /// The entry point, with the tiling of a matmul: a profile's label.
    pub fn label(self) -> String {
        match self {
            Kernel::Matmul(t) => format!("matmul {}x{} kc {} s {}", t.tm, t.tn, t.kc, t.s),
            _ => self.entry_point().to_string(),
        }
    }

    fn entry_point(self) -> &'static str {
        match self {
            Kernel::Gather => "gather_batch",
            Kernel::Matmul(_) => "matmul",
            Kernel::BiasAdd => "bias_add_forward",
            Kernel::BiasBackward => "bias_backward",
            Kernel::ReluForward => "relu_forward",
            Kernel::ReluBackward => "relu_backward",
            Kernel::SoftmaxXent => "softmax_xent_forward_backward",
            Kernel::OutputLayer => "output_layer_step",
            Kernel::RmsProp => "rmsprop_update",
            Kernel::Sgd => "sgd_update",
        }
    }
}

/// The `Params` uniform of a dispatch: 16 words (f32 values stored as their bits); most kernels
/// read only the first 8.
pub type ParamWords = [u32; 16];

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
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
    uniforms: HashMap<ParamWords, wgpu::Buffer>,
    bind_groups: HashMap<BindKey, wgpu::BindGroup>,
}

/// Compile `kernel`'s shader module and pipeline (what a driver may take a few hundred
/// milliseconds over, the first time on a machine).
fn compile(device: &wgpu::Device, kernel: Kernel) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(kernel.file().0),
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

impl Kernels {
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
        let compiled: Vec<(Kernel, wgpu::ComputePipeline)> = std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .iter()
                .map(|&k| scope.spawn(move || (k, compile(device, k))))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
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
                .check(&format!("compiling shaders/{} ({})", kernel.file().0, kernel.label()))?;
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

/// f32 as a parameter word.
pub fn bits(v: f32) -> u32 {
    v.to_bits()
}

#[cfg(test)]
mod tests {
    use super::TileConfig;

    #[test]
    fn tilings_follow_the_sweep() {
        let t = |m, n, k| {
            let c = TileConfig::for_shape(m, n, k);
            (c.tm, c.tn, c.kc, c.s)
        };
        assert_eq!(t(128, 512, 784), (16, 32, 8, 8)); // layer 1 forward
        assert_eq!(t(784, 512, 128), (32, 64, 16, 2)); // layer 1 weight gradient
        assert_eq!(t(128, 10, 512), (16, 16, 8, 16)); // layer 2 forward
        assert_eq!(t(512, 10, 128), (16, 16, 8, 16)); // layer 2 weight gradient
        assert_eq!(t(128, 512, 10), (16, 32, 8, 8)); // layer 2 input gradient
        let s = TileConfig::SOFTWARE;
        assert!(TileConfig::new(s.tm, s.tn, s.kc, s.s).is_ok());
        // Too few threads to finish every column's sum.
        assert!(TileConfig::new(8, 8, 4, 1).is_err());
        assert!(TileConfig::new(8, 64, 8, 1).is_err());
        // The last partial batch of an epoch (96 rows) gets the tilings of a full one.
        assert_eq!(t(512, 10, 96), t(512, 10, 128));
        assert_eq!(t(784, 512, 96), t(784, 512, 128));
        assert_eq!(t(96, 512, 784), t(128, 512, 784));
        for m in [1, 7, 100, 5000] {
            for n in [1, 10, 17, 600] {
                for k in [1, 9, 300, 70000] {
                    let c = TileConfig::for_shape(m, n, k);
                    assert!(TileConfig::new(c.tm, c.tn, c.kc, c.s).is_ok(), "{m}x{n}x{k}: {c:?}");
                }
            }
        }
    }
}
