//! The uniform parameter blocks of the kernels, as Rust structs that mirror the WGSL `Params`
//! structs field by field, and the kernels' flag bits by name.
//!
//! Contract: each struct here is `#[repr(C)]` and `Pod`, declared through `kernel_params!`, which
//! also records its field names and types in order; the test below reads every shader in
//! `shaders/` and fails when a WGSL `Params` and its Rust struct disagree on a field's name,
//! order or type, or when a flag constant has another value on the two sides. A block is at most
//! `PARAM_WORDS` words and travels as `ParamWords` (the key of the bind-group cache).

/// The most 32-bit words a parameter block holds.
pub const PARAM_WORDS: usize = 32;

/// A parameter block as the words of its uniform buffer.
pub type ParamWords = [u32; PARAM_WORDS];

/// A kernel's parameter block: its shader file and its fields (name, WGSL type) in order.
pub trait KernelParams: bytemuck::Pod {
    const FILE: &'static str;
    const FIELDS: &'static [(&'static str, &'static str)];

    /// The block as uniform words, zero-padded.
    fn words(&self) -> ParamWords {
        let mut words = [0u32; PARAM_WORDS];
        let mine: &[u32] = bytemuck::cast_slice(bytemuck::bytes_of(self));
        words[..mine.len()].copy_from_slice(mine);
        words
    }
}

macro_rules! kernel_params {
    ($(#[$doc:meta])* $name:ident in $file:literal { $($(#[$fdoc:meta])* $field:ident: $ty:ident),* $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        impl KernelParams for $name {
            const FILE: &'static str = $file;
            const FIELDS: &'static [(&'static str, &'static str)] = &[$((stringify!($field), stringify!($ty))),*];
        }
    };
}

/// Flag bits of a kernel's `flags` word, by name, with the shader file that declares them.
pub struct Flags {
    pub file: &'static str,
    pub bits: &'static [(&'static str, u32)],
}

kernel_params! {
    /// gather.wgsl: x (rows, 4 * words_per_image) from images[order[start + r]]; augmented, each
    /// image under its transform of the step (step base + `slot`) drawn with `key`.
    GatherParams in "gather.wgsl" {
        start: u32,
        rows: u32,
        words_per_image: u32,
        slot: u32,
        key: u32,
        shift: f32,
        rotate: f32,
        scale: f32,
    }
}

kernel_params! {
    /// matmul.wgsl: c (m, n) = epilogue(a @ b) through strides or a convolution's operand maps,
    /// and the optimizer step of a weight and bias at word offsets of their packed buffers (its
    /// rate and bias corrections from the step table's row of `slot`). The
    /// convolution's geometry (`ConvGeometry`, its filters and its output size) follows; a dense
    /// product leaves it 0.
    MatmulParams in "matmul.wgsl" {
        m: u32,
        n: u32,
        k: u32,
        a_row_stride: u32,
        a_col_stride: u32,
        b_row_stride: u32,
        b_col_stride: u32,
        flags: u32,
        /// The step's statistics slot: its row of the step table is the table's word 0 + slot.
        slot: u32,
        rho: f32,
        eps: f32,
        beta1: f32,
        beta2: f32,
        momentum: f32,
        l2: f32,
        w_value: u32,
        w_velocity: u32,
        w_momentum: u32,
        b_value: u32,
        b_velocity: u32,
        b_momentum: u32,
        h: u32,
        w: u32,
        in_ch: u32,
        out_ch: u32,
        kh: u32,
        kw: u32,
        pad: u32,
        oh: u32,
        ow: u32,
        _pad0: u32,
        _pad1: u32,
    }
}

kernel_params! {
    /// softmax_xent.wgsl, and output_layer.wgsl (compiled after it, sharing its block): the
    /// loss over rows of logits, and for the output layer its inputs, flags and packed offsets.
    LossParams in "softmax_xent.wgsl" {
        rows: u32,
        classes: u32,
        start: u32,
        slot: u32,
        write_dlogits: u32,
        c: u32,
        flags: u32,
        w_value: u32,
        b_value: u32,
        w_velocity: u32,
        b_velocity: u32,
        w_grad: u32,
        b_grad: u32,
        lr: f32,
        rho: f32,
        eps: f32,
    }
}

kernel_params! {
    /// pool.wgsl: max pooling of size x size windows over images h x w x ch (NHWC), output oh x
    /// ow; `count` invocations (output values forward, input values backward).
    PoolParams in "pool.wgsl" {
        count: u32,
        h: u32,
        w: u32,
        ch: u32,
        size: u32,
        oh: u32,
        ow: u32,
        flags: u32,
    }
}

kernel_params! {
    /// dropout.wgsl: `count` values, kept where the step's word is at least `threshold` (the
    /// step is the step base's word plus `slot`).
    DropoutParams in "dropout.wgsl" {
        count: u32,
        key: u32,
        threshold: u32,
        scale: f32,
        slot: u32,
        flags: u32,
        _pad0: u32,
        _pad1: u32,
    }
}

kernel_params! {
    /// batch_norm.wgsl: (rows, channels), the parameters' word offsets in the packed values
    /// (gamma, beta, moving averages) and gradients (dgamma, dbeta).
    BatchNormParams in "batch_norm.wgsl" {
        rows: u32,
        channels: u32,
        count: u32,
        flags: u32,
        gamma: u32,
        beta: u32,
        moving_mean: u32,
        moving_variance: u32,
        dgamma: u32,
        dbeta: u32,
        momentum: f32,
        eps: f32,
    }
}

kernel_params! {
    /// update.wgsl: `count` values of a parameter at word offsets of the packed value, gradient
    /// and moments, stepped with the step table's row of `slot`.
    UpdateParams in "update.wgsl" {
        count: u32,
        flags: u32,
        slot: u32,
        value: u32,
        grad: u32,
        velocity: u32,
        moment: u32,
        rho: f32,
        eps: f32,
        beta1: f32,
        beta2: f32,
        momentum: f32,
        l2: f32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// matmul.wgsl's epilogue flags.
pub mod matmul_flags {
    pub const ADD_BIAS: u32 = 1;
    pub const RELU: u32 = 2;
    pub const MASK: u32 = 4;
    pub const COLSUM: u32 = 8;
}

/// optimizer.wgsl's flags, set in the `flags` word of every kernel that includes it.
pub mod optimizer_flags {
    pub const RMSPROP: u32 = 16;
    pub const SGD: u32 = 32;
    pub const MOMENTUM: u32 = 128;
    pub const NESTEROV: u32 = 256;
    pub const ADAM: u32 = 512;
}

/// pool.wgsl's flags.
pub mod pool_flags {
    /// Backward: the pool's input is a ReLU's output; also zero the gradient where it is <= 0.
    pub const RELU_BEFORE: u32 = 64;
}

/// dropout.wgsl's flags.
pub mod dropout_flags {
    /// Apply the step's mask (else copy: evaluation).
    pub const TRAIN: u32 = 1024;
    /// Also zero where the forward input is not > 0.
    pub const RELU_MASK: u32 = 2048;
}

/// batch_norm.wgsl's flags.
pub mod batch_norm_flags {
    pub const RELU: u32 = 4096;
    /// Normalise with the moving averages.
    pub const EVAL: u32 = 8192;
}

/// Every flag constant, by the shader file that declares it.
pub const FLAGS: &[Flags] = &[
    Flags {
        file: "matmul.wgsl",
        bits: &[
            ("ADD_BIAS", matmul_flags::ADD_BIAS),
            ("RELU", matmul_flags::RELU),
            ("MASK", matmul_flags::MASK),
            ("COLSUM", matmul_flags::COLSUM),
        ],
    },
    Flags {
        file: "optimizer.wgsl",
        bits: &[
            ("RMSPROP", optimizer_flags::RMSPROP),
            ("SGD", optimizer_flags::SGD),
            ("MOMENTUM", optimizer_flags::MOMENTUM),
            ("NESTEROV", optimizer_flags::NESTEROV),
            ("ADAM", optimizer_flags::ADAM),
        ],
    },
    Flags {
        file: "pool.wgsl",
        bits: &[("RELU_BEFORE", pool_flags::RELU_BEFORE)],
    },
    Flags {
        file: "dropout.wgsl",
        bits: &[("TRAIN", dropout_flags::TRAIN), ("RELU_MASK", dropout_flags::RELU_MASK)],
    },
    Flags {
        file: "batch_norm.wgsl",
        bits: &[("RELU", batch_norm_flags::RELU), ("EVAL", batch_norm_flags::EVAL)],
    },
];

#[cfg(test)]
mod tests {
    use super::super::shader_text::shader_file;
    use super::*;

    /// (name, type) of each field of the WGSL `struct Params`, in order.
    fn wgsl_fields(source: &str) -> Vec<(String, String)> {
        let body = source
            .split("struct Params {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .unwrap_or_default();
        body.lines()
            .map(|line| line.split("//").next().unwrap_or_default().trim())
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, ty) = line.trim_end_matches(',').split_once(':').unwrap_or((line, ""));
                (name.trim().to_string(), ty.trim().to_string())
            })
            .collect()
    }

    fn check<P: KernelParams>() {
        let source = shader_file(P::FILE).unwrap_or_else(|| panic!("no shader {}", P::FILE));
        let wgsl = wgsl_fields(source);
        let rust: Vec<(String, String)> = P::FIELDS.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
        assert_eq!(
            wgsl,
            rust,
            "{}: WGSL Params (left) against the Rust struct (right)",
            P::FILE
        );
        assert_eq!(std::mem::size_of::<P>(), 4 * P::FIELDS.len());
        assert!(P::FIELDS.len() <= PARAM_WORDS && std::mem::size_of::<P>().is_multiple_of(16));
    }

    #[test]
    fn params_structs_mirror_the_shaders() {
        check::<GatherParams>();
        check::<MatmulParams>();
        check::<LossParams>();
        check::<PoolParams>();
        check::<DropoutParams>();
        check::<BatchNormParams>();
        check::<UpdateParams>();
    }

    #[test]
    fn flag_values_agree_with_the_shaders() {
        for flags in FLAGS {
            let source = shader_file(flags.file).unwrap_or_else(|| panic!("no shader {}", flags.file));
            for &(name, value) in flags.bits {
                let line = format!("const {name}: u32 = {value}u;");
                assert!(
                    source.lines().any(|l| l.trim() == line),
                    "{}: no line `{line}` (the Rust side says {name} = {value})",
                    flags.file
                );
            }
        }
        // Each bit is used once across the flags a kernel can combine.
        let all: Vec<u32> = FLAGS.iter().flat_map(|f| f.bits.iter().map(|b| b.1)).collect();
        let mut seen = 0u32;
        for bit in all {
            assert_eq!(seen & bit, 0, "flag bit {bit} used twice");
            seen |= bit;
        }
    }

    #[test]
    fn the_test_parser_reads_a_struct() {
        let fields = wgsl_fields("struct Params {\n    a: u32, // x\n    b: f32,\n}\n");
        assert_eq!(
            fields,
            [
                ("a".to_string(), "u32".to_string()),
                ("b".to_string(), "f32".to_string())
            ]
        );
    }
}
