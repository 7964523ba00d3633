//! Test support: runs AVX-512 (F/BW/VL/VNNI) code on any x86-64 Linux machine, so the AVX-512
//! kernels are checked bit for bit where the CPU lacks them.
//!
//! Natively when the CPU has AVX-512; otherwise in Bochs's CPU core (emulating a Tiger Lake),
//! which `scripts/emulator/setup.sh DIR` installs with its launcher `DIR/run`, named by
//! `SMOLDESK_AVX512_EMULATOR` (`scripts/test.sh` does both). An emulated run dumps this process's
//! memory (`/proc/self/maps`, `/proc/self/mem`) to a temporary folder, the emulator
//! (`scripts/emulator/run_calls.py`) maps the dump, runs the calls on it and writes back the
//! output ranges, which are copied into place here.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What an emulated or native AVX-512 run calls: one pointer to an argument struct the test owns.
///
/// In the emulator only the CPU is there: an entry must not allocate, make system calls or
/// panic (the unwinder allocates), and reads the memory as it was when the run started. Its
/// results must go to memory listed in `outputs`; nothing else is copied back.
pub(crate) type Entry = unsafe extern "C" fn(*mut u8);

/// How a run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ran {
    /// On this CPU, which has AVX-512 F/BW/VL/VNNI.
    Natively,
    /// In the emulator named by `SMOLDESK_AVX512_EMULATOR`.
    Emulated,
}

/// The variable naming the emulator's launcher (`DIR/run` from `scripts/emulator/setup.sh`).
const EMULATOR_VAR: &str = "SMOLDESK_AVX512_EMULATOR";
/// Set to `1`, a test that cannot run its AVX-512 code fails instead of skipping.
const REQUIRE_VAR: &str = "SMOLDESK_REQUIRE_AVX512";
/// Larger file mappings (memory-mapped models, the test binary mapped for backtraces) are left
/// out of the dump. Anonymous memory is dumped whatever its size: the kernel joins neighbouring
/// malloc arenas into one mapping of 128 MiB or more, and a test's data may lie in it.
const MAX_FILE_MAPPING: u64 = 64 << 20;
/// The most memory one emulated run may dump.
const MAX_DUMP: u64 = 2 << 30;
/// How long one emulated run may take.
const TIMEOUT: Duration = Duration::from_secs(600);
/// The dump's page size: all-zero pages are left out (the emulator's memory starts zeroed).
const PAGE: usize = 4096;

/// The emulator's launcher: None when `SMOLDESK_AVX512_EMULATOR` is unset or empty, Err when it
/// names no file.
fn launcher() -> Result<Option<PathBuf>, String> {
    match std::env::var_os(EMULATOR_VAR) {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            if path.is_file() {
                Ok(Some(path))
            } else {
                Err(format!(
                    "{EMULATOR_VAR}={} is not a file (make it with scripts/emulator/setup.sh DIR, \
                     then point {EMULATOR_VAR} at DIR/run)",
                    path.display()
                ))
            }
        }
        _ => Ok(None),
    }
}

/// Runs each `(entry, arg)` in order on a CPU with AVX-512 F/BW/VL/VNNI: natively when this CPU
/// has them, otherwise in the emulator named by SMOLDESK_AVX512_EMULATOR (the launcher `DIR/run`).
/// `outputs` are the memory ranges the calls write; after an emulated run their bytes are copied
/// back from the emulator. Err(reason) when neither is possible or the run failed.
///
/// The calls are made as given: each `arg` must be what its `entry` expects, valid for the whole
/// run, and the entries must follow the rules on [`Entry`]. Natively, a faulting entry crashes
/// the process; emulated, any exception is an Err.
pub(crate) fn run_on_avx512(
    calls: &[(Entry, *mut u8)],
    outputs: &mut [&mut [u8]],
) -> Result<Ran, String> {
    if crate::engine::cpu::avx512_available() {
        for &(entry, arg) in calls {
            // SAFETY: the caller vouches for each entry and its argument (see the doc above).
            unsafe { entry(arg) };
        }
        return Ok(Ran::Natively);
    }
    let Some(launcher) = launcher()? else {
        return Err(format!(
            "this CPU lacks AVX-512 F/BW/VL/VNNI and {EMULATOR_VAR} is not set \
             (scripts/test.sh sets it up)"
        ));
    };
    emulate(&launcher, calls, outputs)?;
    Ok(Ran::Emulated)
}

/// For tests: `run_on_avx512`, except that when no AVX-512 CPU and no emulator is available it
/// logs/prints a line and returns None (skips) — unless SMOLDESK_REQUIRE_AVX512=1, then it
/// panics. A failed run always panics with the reason.
#[track_caller]
pub(crate) fn run_or_skip(calls: &[(Entry, *mut u8)], outputs: &mut [&mut [u8]]) -> Option<Ran> {
    if !crate::engine::cpu::avx512_available() && !emulator_or_skip() {
        return None;
    }
    match run_on_avx512(calls, outputs) {
        Ok(ran) => Some(ran),
        Err(reason) => panic!("AVX-512 run failed: {reason}"),
    }
}

/// Whether an emulator is set; if not, skips (prints a line, false) or, with
/// SMOLDESK_REQUIRE_AVX512=1, panics. A launcher that does not exist panics.
#[track_caller]
fn emulator_or_skip() -> bool {
    match launcher() {
        Ok(Some(_)) => true,
        Err(reason) => panic!("{reason}"),
        Ok(None) if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") => panic!(
            "{REQUIRE_VAR}=1 but this CPU lacks AVX-512 F/BW/VL/VNNI and {EMULATOR_VAR} is not \
             set (scripts/test.sh sets it up)"
        ),
        Ok(None) => {
            let line = format!(
                "{}: skipped: this CPU lacks AVX-512 F/BW/VL/VNNI and {EMULATOR_VAR} is not set \
                 (scripts/test.sh sets it up)",
                std::panic::Location::caller()
            );
            log::warn!("{line}");
            // Straight to stderr, past the test harness's capture, so the skip is seen.
            let _ = writeln!(std::io::stderr(), "{line}");
            false
        }
    }
}

/// Runs the calls in the emulator on a dump of this process and copies the outputs back.
fn emulate(
    launcher: &Path,
    calls: &[(Entry, *mut u8)],
    outputs: &mut [&mut [u8]],
) -> Result<(), String> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("smoldesk-avx512-")
        .tempdir()
        .map_err(|e| format!("no temporary folder for the emulator: {e}"))?;
    let path = |name: &str| dir.path().join(name);
    let dump = dump_memory(&path("dump"))?;
    let spec = serde_json::json!({
        "fs_base": fs_base(),
        "regions": dump.regions,
        "calls": calls.iter().map(|&(entry, arg)| [entry as usize, arg as usize]).collect::<Vec<_>>(),
        "outputs": outputs.iter().map(|o| [o.as_ptr() as usize, o.len()]).collect::<Vec<_>>(),
    });
    std::fs::write(path("spec.json"), spec.to_string())
        .map_err(|e| format!("could not write the emulator's spec: {e}"))?;
    let dumped = started.elapsed();

    let log = File::create(path("log")).map_err(|e| format!("no emulator log file: {e}"))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("no emulator log file: {e}"))?;
    let mut child = Command::new(launcher)
        .args([path("spec.json"), path("dump"), path("out")])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", launcher.display()))?;
    let status = wait(&mut child, started + TIMEOUT)?;
    if !status.success() {
        let log = std::fs::read_to_string(path("log")).unwrap_or_default();
        return Err(format!("the emulator failed ({status}): {}", log.trim()));
    }

    let out =
        std::fs::read(path("out")).map_err(|e| format!("no output from the emulator: {e}"))?;
    if out.len() != outputs.iter().map(|o| o.len()).sum::<usize>() {
        return Err(format!(
            "the emulator wrote {} output bytes, not the {} asked for",
            out.len(),
            outputs.iter().map(|o| o.len()).sum::<usize>()
        ));
    }
    let mut rest = &out[..];
    for output in outputs.iter_mut() {
        let (bytes, tail) = rest.split_at(output.len());
        output.copy_from_slice(bytes);
        rest = tail;
    }
    log::debug!(
        "emulated {} call(s): {} regions, {} MiB mapped, {} MiB dumped in {dumped:.2?}; {:.2?} in all",
        calls.len(),
        dump.regions.len(),
        dump.mapped >> 20,
        dump.written >> 20,
        started.elapsed()
    );
    Ok(())
}

/// Waits for the emulator until `deadline`, then kills it.
fn wait(child: &mut std::process::Child, deadline: Instant) -> Result<ExitStatus, String> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the emulator took over {TIMEOUT:?}; killed it"));
            }
            Err(e) => return Err(format!("could not wait for the emulator: {e}")),
        }
    }
}

/// What [`dump_memory`] wrote.
struct Dump {
    /// `[start, size, writable]` of each mapping in the dump, as the emulator's spec wants.
    regions: Vec<(u64, u64, bool)>,
    /// The bytes those cover.
    mapped: u64,
    /// The bytes written (the non-zero pages).
    written: u64,
}

/// Writes this process's memory to `path` as the emulator reads it: records of (u64 address,
/// u64 length, bytes) holding the non-zero pages of every readable mapping up to
/// [`MAX_FILE_MAPPING`] if it maps a file, except the kernel's `[vvar]`, `[vdso]` and `[vsyscall]`.
fn dump_memory(path: &Path) -> Result<Dump, String> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("could not read /proc/self/maps: {e}"))?;
    let mut wanted = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            return Err(format!("unexpected line in /proc/self/maps: {line}"));
        };
        let (_offset, _device, inode) = (fields.next(), fields.next(), fields.next());
        let name = fields.next().unwrap_or("");
        let maps_a_file = inode.is_some_and(|inode| inode != "0");
        let parse = |s: Option<&str>| s.and_then(|s| u64::from_str_radix(s, 16).ok());
        let mut bounds = range.split('-');
        let (Some(start), Some(end)) = (parse(bounds.next()), parse(bounds.next())) else {
            return Err(format!("unexpected range in /proc/self/maps: {line}"));
        };
        let too_large = maps_a_file && end - start > MAX_FILE_MAPPING;
        if perms.starts_with('r') && !too_large && !name.starts_with("[v") {
            wanted.push((start, end - start, perms.as_bytes().get(1) == Some(&b'w')));
        }
    }
    let wanted = disjoint(wanted);
    let mapped: u64 = wanted.iter().map(|&(_, size, _)| size).sum();
    if mapped > MAX_DUMP {
        return Err(format!(
            "this process has {} MiB of anonymous memory and file mappings of up to {} MiB, \
             more than the {} MiB an emulated run dumps",
            mapped >> 20,
            MAX_FILE_MAPPING >> 20,
            MAX_DUMP >> 20
        ));
    }

    let mem =
        File::open("/proc/self/mem").map_err(|e| format!("could not open /proc/self/mem: {e}"))?;
    let file =
        File::create(path).map_err(|e| format!("could not create {}: {e}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut dump = Dump {
        regions: Vec::with_capacity(wanted.len()),
        mapped: 0,
        written: 0,
    };
    let mut buf = vec![0u8; 1 << 20];
    let write_err = |e: std::io::Error| format!("could not write {}: {e}", path.display());
    for (start, size, writable) in wanted {
        // A mapping that went away since the listing (another thread) is dumped as far as it
        // could be read; an entry touching the rest faults in the emulator.
        let mut read = 0;
        while read < size {
            let len = (size - read).min(buf.len() as u64) as usize;
            if mem.read_exact_at(&mut buf[..len], start + read).is_err() {
                break;
            }
            for (run_start, run) in nonzero_runs(&buf[..len]) {
                let address = start + read + run_start as u64;
                out.write_all(&address.to_le_bytes()).map_err(write_err)?;
                out.write_all(&(run.len() as u64).to_le_bytes())
                    .map_err(write_err)?;
                out.write_all(run).map_err(write_err)?;
                dump.written += run.len() as u64;
            }
            read += len as u64;
        }
        // Neighbours are joined, so a buffer across two of them is still one region.
        match dump.regions.last_mut() {
            Some(last) if last.0 + last.1 == start && last.2 == writable => last.1 += read,
            _ if read > 0 => dump.regions.push((start, read, writable)),
            _ => {}
        }
        dump.mapped += read;
    }
    out.flush().map_err(write_err)?;
    Ok(dump)
}

/// `(start, size, writable)` ranges sorted by start, with overlapping ones joined (writable when
/// either is). `/proc/self/maps` is not read atomically: while other threads map, unmap or
/// grow memory (tests run side by side), one listing can name a range twice or two ranges that
/// overlap, which the emulator would refuse.
fn disjoint(mut ranges: Vec<(u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    ranges.sort_unstable_by_key(|&(start, _, _)| start);
    let mut joined: Vec<(u64, u64, bool)> = Vec::with_capacity(ranges.len());
    for (start, size, writable) in ranges {
        match joined.last_mut() {
            Some(last) if start < last.0 + last.1 => {
                last.1 = last.1.max(start + size - last.0);
                last.2 |= writable;
            }
            _ => joined.push((start, size, writable)),
        }
    }
    joined
}

/// The runs of whole pages in `data` that are not all zero, with their offsets.
fn nonzero_runs(data: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let zero: Vec<bool> = data
        .chunks(PAGE)
        .map(|p| p.iter().all(|&b| b == 0))
        .collect();
    let mut page = 0;
    std::iter::from_fn(move || {
        let first = page + zero[page..].iter().position(|&z| !z)?;
        page = first
            + zero[first..]
                .iter()
                .position(|&z| z)
                .unwrap_or(zero.len() - first);
        Some((
            first * PAGE,
            &data[first * PAGE..(page * PAGE).min(data.len())],
        ))
    })
}

/// The calling thread's fs base (its TLS block), which glibc keeps at `fs:0`.
fn fs_base() -> u64 {
    let base: u64;
    // SAFETY: on x86-64 Linux, fs:0 holds the thread control block's own address.
    unsafe {
        std::arch::asm!("mov {}, fs:0", out(reg) base, options(nostack, readonly, preserves_flags))
    };
    base
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::arch::x86_64::*;

    /// The argument of [`accumulate_dpbusd`].
    #[repr(C)]
    struct DotArgs {
        /// 64 unsigned bytes.
        a: *const u8,
        /// 64 signed bytes.
        b: *const i8,
        /// 16 i32 sums (unaligned), added to.
        sums: *mut u8,
    }

    /// `sums += dpbusd(a, b)` with AVX-512 VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe extern "C" fn accumulate_dpbusd(args: *mut u8) {
        // SAFETY: the test passes a DotArgs whose pointers cover 64 bytes each.
        unsafe {
            let args = &*args.cast::<DotArgs>();
            let sums = _mm512_loadu_si512(args.sums.cast());
            let a = _mm512_loadu_si512(args.a.cast());
            let b = _mm512_loadu_si512(args.b.cast());
            _mm512_storeu_si512(args.sums.cast(), _mm512_dpbusd_epi32(sums, a, b));
        }
    }

    /// Executes `ud2`, which no CPU completes.
    unsafe extern "C" fn undefined_instruction(_: *mut u8) {
        // SAFETY: raises #UD; only ever run in the emulator.
        unsafe { std::arch::asm!("ud2", options(nomem, nostack)) };
    }

    #[test]
    fn vnni_dot_products_match_scalar_over_two_calls() {
        let _ = env_logger::builder().is_test(true).try_init();
        let a: Vec<u8> = (0..64).map(|i| (i * 7 % 256) as u8).collect();
        let b: Vec<i8> = (0..64).map(|i| (i * 13 % 256) as u8 as i8).collect();
        let mut sums = [0u8; 64];
        sums[..4].copy_from_slice(&1000i32.to_le_bytes());
        let mut args = DotArgs {
            a: a.as_ptr(),
            b: b.as_ptr(),
            sums: sums.as_mut_ptr(),
        };
        let arg = (&raw mut args).cast::<u8>();
        let calls: [(Entry, *mut u8); 2] = [(accumulate_dpbusd, arg), (accumulate_dpbusd, arg)];
        let started = Instant::now();
        let Some(ran) = run_or_skip(&calls, &mut [&mut sums]) else {
            return;
        };
        eprintln!("ran {ran:?} in {:.2?}", started.elapsed());
        let got: Vec<i32> = sums
            .chunks(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let want: Vec<i32> = (0..16)
            .map(|l| {
                let dot: i32 = (0..4)
                    .map(|j| a[4 * l + j] as i32 * b[4 * l + j] as i32)
                    .sum();
                2 * dot + if l == 0 { 1000 } else { 0 }
            })
            .collect();
        assert_eq!(got, want, "ran {ran:?}");
    }

    #[test]
    fn a_listing_that_names_ranges_twice_or_overlapping_becomes_disjoint_ranges() {
        let listed = vec![
            (0x5000, 0x1000, false),
            (0x1000, 0x2000, false),
            (0x1000, 0x3000, true),
            (0x3000, 0x1000, false),
            (0x4000, 0x1000, false),
        ];
        assert_eq!(
            disjoint(listed),
            vec![
                (0x1000, 0x3000, true),
                (0x4000, 0x1000, false),
                (0x5000, 0x1000, false)
            ]
        );
    }

    #[test]
    fn an_instruction_the_emulator_cannot_complete_is_an_error() {
        if crate::engine::cpu::avx512_available() {
            eprintln!("skipped: runs natively, where ud2 would kill the process");
            return;
        }
        if !emulator_or_skip() {
            return;
        }
        let calls: [(Entry, *mut u8); 1] = [(undefined_instruction, std::ptr::null_mut())];
        let err = run_on_avx512(&calls, &mut []).expect_err("ud2 must fail the run");
        eprintln!("{err}");
        assert!(err.contains("#UD") && err.contains("call 0"), "{err}");
    }
}
