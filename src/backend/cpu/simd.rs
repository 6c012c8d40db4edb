//! The fast CPU path's vector instructions: which ones this CPU has (AVX-512, AVX2, or neither),
//! chosen once at run time, the cap a caller may put on them (`GPU_MNIST_CPU_SIMD`, handed in
//! through `CpuSettings`), and `simd_variants!`, the one way a kernel is compiled for each level
//! and dispatched to the right copy.
//!
//! Contract: `simd()` never names instructions the CPU lacks, whatever the cap; every level has
//! FMA where it is not `Portable`. `configure` takes effect only before the first `simd()` (the
//! level is fixed for the process from then on, as the thread count is).

use std::sync::OnceLock;

/// The vector instructions the kernels use, ordered from narrowest to widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub enum Simd {
    Portable,
    Avx2,
    Avx512,
}

/// The widest vector instructions the CPU kernels may use (`GPU_MNIST_CPU_SIMD`), so that every
/// variant can be tested on one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimdLimit {
    /// Whatever the CPU has (AVX-512, else AVX2, else none).
    #[default]
    Best,
    Avx2,
    Portable,
}

impl SimdLimit {
    /// `avx512` (the best the CPU has), `avx2` or `portable`.
    pub fn parse(v: &str) -> Result<SimdLimit, String> {
        match v {
            "avx512" => Ok(SimdLimit::Best),
            "avx2" => Ok(SimdLimit::Avx2),
            "portable" => Ok(SimdLimit::Portable),
            _ => Err(format!("'{v}' is not one of avx512, avx2, portable")),
        }
    }

    /// The name `bench --json` prints.
    pub fn name(self) -> &'static str {
        match self {
            SimdLimit::Best => "best",
            SimdLimit::Avx2 => "avx2",
            SimdLimit::Portable => "portable",
        }
    }
}

/// The cap handed to `configure`, read once by `simd()`.
static LIMIT: OnceLock<SimdLimit> = OnceLock::new();

/// Cap the vector instructions of this process (the first call before any kernel runs wins).
pub fn configure(limit: SimdLimit) {
    let _ = LIMIT.set(limit);
}

/// The vector instructions of this CPU under the configured cap (detected once).
pub fn simd() -> Simd {
    static SIMD: OnceLock<Simd> = OnceLock::new();
    *SIMD.get_or_init(|| detect(LIMIT.get().copied().unwrap_or_default()))
}

/// The best this CPU has, at most `limit`.
fn detect(limit: SimdLimit) -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::is_x86_feature_detected!("fma");
        let avx512 = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl");
        if fma && avx512 && limit == SimdLimit::Best {
            return Simd::Avx512;
        }
        if fma && std::is_x86_feature_detected!("avx2") && limit != SimdLimit::Portable {
            return Simd::Avx2;
        }
    }
    let _ = limit;
    Simd::Portable
}

/// The levels this process may run, narrowest first (for tests that check every variant).
#[cfg(test)]
pub fn levels() -> impl Iterator<Item = Simd> {
    [Simd::Portable, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|&l| l <= simd())
}

/// a + x * y, fused where the CPU has FMA (a call to a software fma would be far slower).
#[inline(always)]
pub fn mul_add<const FMA: bool>(x: f32, y: f32, a: f32) -> f32 {
    if FMA {
        x.mul_add(y, a)
    } else {
        a + x * y
    }
}

/// `$vis fn $name(args)`: a kernel compiled for each level of `Simd` and run at the level
/// `simd()` says, or at the one the caller names where the first argument is `level: Simd`
/// (never above `simd()`). Three forms:
///
/// - `fn name(args) => any`: the same `#[inline(always)]` function compiled for AVX-512, AVX2
///   and the crate's baseline (for loops of element-wise IEEE operations, which give the same
///   bits at any width: never a fused multiply-add or a reassociated sum);
/// - `fn name(args) => { avx512: a, avx2: b, portable: c }`: a path per level (for example a
///   generic kernel instantiated with FMA and the level's block width);
/// - `fn name(level: Simd, args) => { avx512: a, avx2: b, portable: c }`: the same, at `level`.
///
/// The AVX-512 copy is compiled with AVX-512F, AVX-512VL and FMA, the AVX2 copy with AVX2 and
/// FMA, which is what `Simd::Avx512` and `Simd::Avx2` promise.
macro_rules! simd_variants {
    ($(#[$meta:meta])* $vis:vis fn $name:ident(level: Simd, $($arg:ident: $ty:ty),* $(,)?) => {
        avx512: $avx512:path, avx2: $avx2:path, portable: $portable:path $(,)?
    }) => {
        $(#[$meta])*
        $vis fn $name(level: $crate::backend::cpu::simd::Simd, $($arg: $ty),*) {
            simd_variants!(@dispatch level; ($($arg: $ty),*); $avx512, $avx2, $portable)
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => {
        avx512: $avx512:path, avx2: $avx2:path, portable: $portable:path $(,)?
    }) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            simd_variants!(@dispatch $crate::backend::cpu::simd::simd(); ($($arg: $ty),*); $avx512, $avx2, $portable)
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $any:path) => {
        simd_variants! {
            $(#[$meta])* $vis fn $name($($arg: $ty),*) => { avx512: $any, avx2: $any, portable: $any }
        }
    };
    (@dispatch $level:expr; ($($arg:ident: $ty:ty),*); $avx512:path, $avx2:path, $portable:path) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                $avx512($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                $avx2($($arg),*)
            }
            use $crate::backend::cpu::simd::{simd, Simd};
            match Ord::min($level, simd()) {
                // SAFETY: `simd()` found AVX-512F, AVX-512VL and FMA.
                Simd::Avx512 => return unsafe { avx512($($arg),*) },
                // SAFETY: `simd()` found AVX2 and FMA.
                Simd::Avx2 => return unsafe { avx2($($arg),*) },
                Simd::Portable => {}
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = $level;
        $portable($($arg),*)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_is_parsed_and_levels_are_ordered() {
        assert_eq!(SimdLimit::parse("avx2"), Ok(SimdLimit::Avx2));
        assert!(SimdLimit::parse("sse").is_err());
        assert!(Simd::Portable < Simd::Avx2 && Simd::Avx2 < Simd::Avx512);
        assert_eq!(detect(SimdLimit::Portable), Simd::Portable);
        assert!(detect(SimdLimit::Avx2) <= Simd::Avx2);
        assert_eq!(levels().last(), Some(simd()));
    }
}
