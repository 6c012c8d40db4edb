//! What a matmul.wgsl pipeline is compiled with: its tiling (`TileConfig`, chosen per product
//! shape by `TileConfig::for_shape` or set for every product by `GPU_MNIST_MATMUL_TILES`) and,
//! for a convolution, its operand maps (`ConvProduct`).
//!
//! Contract: every `TileConfig` that `new` or `parse` accepts fits the shader's workgroup limits
//! (`WORKGROUP_BYTES`, `WORKGROUP_THREADS`) and has threads enough to finish every column's sum.

use super::shader_text::{expand_unrolls, fill_placeholders};

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
    /// The tiling for software adapters, whose workgroups run on CPU threads that pay for every
    /// barrier: one 64x64 slice per workgroup.
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

    /// The tiling for an (m, n, k) product on a hardware GPU, from a sweep of every tiling
    /// (benches/gpu.md):
    /// - n <= 16 (the output layer): 16x16 tiles, K in chunks of 8 spread over 16 slices (also when
    ///   K is short, so that an epoch's last, partial batch needs no pipeline of its own);
    /// - outputs of 256 or more 32x32 tiles (a weight gradient): 32x64 tiles, 2 slices;
    /// - smaller outputs: 16x32 tiles and 8 slices, which spread a long K over the workgroup and,
    ///   when K is short, share the epilogue among more threads.
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

    /// matmul.wgsl (`template`, its includes expanded) with this tiling's values in its
    /// placeholders and its `//!unroll` lines expanded.
    pub(super) fn source(self, template: &str) -> String {
        let t = self.threads_per_slice();
        let filled = fill_placeholders(
            template,
            &[
                ("TM", self.tm),
                ("TN", self.tn),
                ("KC", self.kc),
                ("S", self.s),
                ("SMEM", self.smem_vec4s()),
            ],
        );
        expand_unrolls(&filled, |name| match name {
            "LA" => Some(self.tm * self.kc / t),
            "LB" => Some(self.kc * self.tn / t),
            "KC" => Some(self.kc),
            "S" => Some(self.s),
            "E" => Some(self.tm * self.tn / (t * self.s)),
            _ => None,
        })
    }
}

/// Which of a convolution's products a `Kernel::Conv` pipeline computes; it picks matmul.wgsl's
/// operand maps (its `//!variant` blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvProduct {
    /// out (pixels, out_ch) = im2col(inp) @ weight: a_im2col, b_dense.
    Forward,
    /// dinp (images*h*w, in_ch) = the full convolution of dout with the flipped kernel:
    /// a_dout_taps, b_weight_taps.
    BackwardInput,
    /// dweight (patch, out_ch) = im2col(inp)^T @ dout: a_im2col_t, b_dense.
    BackwardWeight,
}

impl ConvProduct {
    /// matmul.wgsl's operand maps for a and b.
    pub(super) fn operands(self) -> [&'static str; 2] {
        match self {
            ConvProduct::Forward => ["a_im2col", "b_dense"],
            ConvProduct::BackwardInput => ["a_dout_taps", "b_weight_taps"],
            ConvProduct::BackwardWeight => ["a_im2col_t", "b_dense"],
        }
    }

    /// How a profile names the product after its tiling.
    pub(super) fn label(self) -> &'static str {
        match self {
            ConvProduct::Forward => "conv forward",
            ConvProduct::BackwardInput => "conv input gradient",
            ConvProduct::BackwardWeight => "conv weight gradient",
        }
    }
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
