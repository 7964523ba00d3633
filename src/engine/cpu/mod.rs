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

/// How the streaming kernels (a generated token's products, which read each weight once) ask
/// for the weights they will need next: `prefetchnta` or `prefetcht1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPrefetch {
    /// As non-temporal data (`prefetchnta`): on AMD, the lines stay out of L2 and L3, where the
    /// activations and the KV cache are.
    NonTemporal,
    /// Into L2 (`prefetcht1`).
    L2,
}

/// The prefetch the streaming kernels use on this CPU, decided once per process; the
/// environment variable `SMOLDESK_PREFETCH=nta|l2` overrides it.
///
/// Measured on the 3B: on AMD Zen 3 (session 10, hints alternated token by token in one
/// process) `prefetchnta` generated 1.6-2.4% faster than `prefetcht0`, and `prefetcht1` was no
/// faster than t0. On a 2-core Intel Xeon with AVX-512 and AMX (session 17, alternated builds,
/// `smoldesk bench --prompt-tokens 1 --gen-tokens 32 --threads 2`), `prefetchnta` generated
/// 6.4-6.5 tok/s, no prefetch 9.5-9.8, `prefetcht0` 9.6-9.9, `prefetcht1` 10.9-12.0. So AMD (and
/// Hygon, the same cores) takes the non-temporal hint and every other CPU the L2 one.
#[inline]
pub fn stream_prefetch() -> StreamPrefetch {
    static CHOICE: OnceLock<StreamPrefetch> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let forced = std::env::var("SMOLDESK_PREFETCH").ok();
        let choice = resolve_prefetch(cpu_vendor().as_deref(), forced.as_deref());
        log::info!("weight prefetch: {choice:?}");
        choice
    })
}

/// The prefetch for a CPU of `vendor` (its CPUID vendor string), or the one `forced` names.
fn resolve_prefetch(vendor: Option<&str>, forced: Option<&str>) -> StreamPrefetch {
    match forced.map(str::to_ascii_lowercase).as_deref() {
        Some("nta") => return StreamPrefetch::NonTemporal,
        Some("l2") => return StreamPrefetch::L2,
        Some(other) => log::warn!("ignoring SMOLDESK_PREFETCH={other:?}: use nta or l2"),
        None => {}
    }
    match vendor {
        Some("AuthenticAMD" | "HygonGenuine") => StreamPrefetch::NonTemporal,
        _ => StreamPrefetch::L2,
    }
}

/// The CPUID vendor string ("GenuineIntel", "AuthenticAMD", …); `None` off x86-64.
pub fn cpu_vendor() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        let bytes: Vec<u8> = [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
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

    #[test]
    fn amd_cpus_prefetch_non_temporal_and_others_into_l2_unless_forced() {
        use StreamPrefetch::{L2, NonTemporal};
        assert_eq!(resolve_prefetch(Some("AuthenticAMD"), None), NonTemporal);
        assert_eq!(resolve_prefetch(Some("HygonGenuine"), None), NonTemporal);
        assert_eq!(resolve_prefetch(Some("GenuineIntel"), None), L2);
        assert_eq!(resolve_prefetch(None, None), L2);
        assert_eq!(resolve_prefetch(Some("AuthenticAMD"), Some("L2")), L2);
        assert_eq!(
            resolve_prefetch(Some("GenuineIntel"), Some("nta")),
            NonTemporal
        );
        assert_eq!(resolve_prefetch(Some("GenuineIntel"), Some("t0")), L2);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_cpu_vendor_is_twelve_characters() {
        let vendor = cpu_vendor().unwrap_or_default();
        assert_eq!(vendor.len(), 12, "{vendor:?}");
    }
}
