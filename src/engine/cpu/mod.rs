//! CPU compute: quantized block layouts, SIMD kernels chosen at run time, and the persistent
//! compute pool every kernel runs on.
//!
//! Kernels come in up to three versions: a portable one (plain Rust, summing in the same order
//! as the SIMD one where llama.cpp's numerics are matched, and the reference in tests), AVX2+FMA,
//! and AVX-512. [`simd_level`] picks the best the CPU has; `SMOLDESK_SIMD=portable|avx2|avx512`
//! forces a lower one so every path can be tested and benchmarked on one machine.

pub mod bandwidth;
pub mod blocks;
pub mod dequant;
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) mod emulator;
pub mod lanes;
pub mod matmul;
pub mod pool;
pub mod q2k;
pub mod q3k;
pub mod q4_0;
pub mod q4_1;
pub mod q4k;
pub mod q5k;
pub mod q6k;
pub mod q8_0;
pub mod q8k;
pub mod tiled_kquant;
pub mod tiles;

use std::sync::OnceLock;

/// A family of SIMD kernels, ordered from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL/VNNI (and AVX2): the Q4_K and Q6_K kernels; the others run
    /// their AVX2 forms. No machine this was written on has AVX-512, so these kernels are tested bit
    /// for bit against the AVX2 ones in an x86 emulator (`scripts/emulator/`), and natively
    /// wherever the tests run on such a CPU.
    Avx512,
}

impl SimdLevel {
    /// The name used by `SMOLDESK_SIMD` and in benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" | "none" => Some(Self::Portable),
            "avx2" => Some(Self::Avx2),
            "avx512" => Some(Self::Avx512),
            _ => None,
        }
    }
}

/// The best level this CPU supports, ignoring `SMOLDESK_SIMD`.
pub fn detected_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_available() {
            return SimdLevel::Avx512;
        }
        if avx2_available() {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Portable
}

/// Whether this CPU can run the AVX2 kernels (AVX2, FMA and F16C), whatever `SMOLDESK_SIMD` says.
/// Kernels check it before taking an AVX2 path, so a wrong [`SimdLevel`] cannot crash.
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU can run the AVX-512 kernels (AVX-512 F, BW, VL and VNNI, besides what
/// [`avx2_available`] needs), whatever `SMOLDESK_SIMD` says.
pub fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        avx2_available()
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The level kernels run at: [`detected_level`], lowered by `SMOLDESK_SIMD` if set (a level the
/// CPU lacks is never chosen). Decided once per process.
#[inline]
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detected_level();
        let forced = std::env::var("SMOLDESK_SIMD").ok();
        let level = resolve_level(detected, forced.as_deref());
        log::info!(
            "SIMD kernels: {} (CPU supports {})",
            level.name(),
            detected.name()
        );
        level
    })
}

/// `detected`, lowered to `forced` when that names a lower level.
fn resolve_level(detected: SimdLevel, forced: Option<&str>) -> SimdLevel {
    match forced.map(|name| (name, SimdLevel::parse(name))) {
        Some((_, Some(level))) => level.min(detected),
        Some((name, None)) => {
            log::warn!("ignoring SMOLDESK_SIMD={name:?}: use portable, avx2 or avx512");
            detected
        }
        None => detected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_a_level_only_lowers_it() {
        assert_eq!(
            resolve_level(SimdLevel::Avx2, Some("portable")),
            SimdLevel::Portable
        );
        assert_eq!(
            resolve_level(SimdLevel::Avx2, Some("AVX512")),
            SimdLevel::Avx2
        );
        assert_eq!(
            resolve_level(SimdLevel::Avx2, Some("fast")),
            SimdLevel::Avx2
        );
        assert_eq!(
            resolve_level(SimdLevel::Portable, None),
            SimdLevel::Portable
        );
    }
}
