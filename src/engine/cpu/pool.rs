//! The persistent compute pool every kernel of one model runs on.
//!
//! Like ggml's thread pool: the worker threads live as long as the pool, spin briefly after a
//! job so the next one (an engine runs hundreds per token) is picked up within microseconds,
//! then park until woken. The calling thread takes part, so a pool of `n` threads starts
//! `n - 1` workers and a pool of one runs everything inline.
//!
//! A job is `n` shares. Each share is claimed by whichever thread gets to it first: the caller
//! takes its own and then any a worker has not started. On a machine busy with other programs
//! a worker can be descheduled for milliseconds; with fixed shares every one of the hundreds of
//! jobs per token then waited for it (2 threads decoded several times slower than 1).

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Most threads a pool ever starts, whatever is asked (a thread per share of every job; far more
/// than the cores only slows each job down).
pub const MAX_THREADS: usize = 256;

/// Spin iterations a worker waits for the next job before parking.
const SPIN_ITERATIONS: usize = 20_000;

/// A job as the threads see it: `(share index, share count)`.
type Job = dyn Fn(usize, usize) + Sync + 'static;

/// State shared between the caller and the workers.
struct Shared {
    /// Bumped once per job; a worker looks for a share to claim when it sees a new value.
    epoch: AtomicUsize,
    /// The current job's epoch (high 32 bits) and its next unclaimed share (low 32 bits). A
    /// claim is a compare-and-swap on both, so a worker that wakes up late cannot claim a
    /// share of a job that already ended.
    claims: AtomicU64,
    /// The current job, valid while one of its shares is claimed and not completed.
    job: UnsafeCell<Option<*const Job>>,
    /// Shares of the current job completed (or given up after a panic).
    completed: AtomicUsize,
    /// Workers currently parked (or about to park) on `wake`.
    sleeping: AtomicUsize,
    /// A worker's job panicked.
    panicked: AtomicBool,
    /// The pool is being dropped.
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller of `run` while no worker reads it (before the
// epoch is bumped, after every worker finished), and the job it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced during `run`.
unsafe impl Send for Shared {}

/// A fixed set of compute threads that run one job at a time.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
}

impl Pool {
    /// A pool of `threads` threads (the caller included); 0 means one per physical core. More
    /// than [`max_threads`] is cut to it.
    pub fn new(threads: usize) -> Self {
        let n_threads = if threads == 0 {
            physical_cores()
        } else {
            threads
        }
        .clamp(1, max_threads());
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            claims: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            completed: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(n_threads - 1);
        for index in 1..n_threads {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("smoldesk-compute-{index}"))
                .spawn(move || worker_loop(&shared, n_threads));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(err) => {
                    log::warn!("cannot start compute thread {index}: {err}");
                    break;
                }
            }
        }
        let n_threads = workers.len() + 1;
        Self {
            shared,
            workers,
            n_threads,
        }
    }

    /// Threads that run each job (the caller included).
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `job(share, n_threads)` once for every share `0..n_threads`, spread over the pool's
    /// threads (one thread may run several), and returns when all are done. Must not be called
    /// from inside a job.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, job: F) {
        let n = self.n_threads;
        if n == 1 {
            job(0, 1);
            return;
        }
        let shared = &*self.shared;
        let job_ref: &(dyn Fn(usize, usize) + Sync + '_) = &job;
        // SAFETY: the lifetime is erased only for the duration of this call: `FinishJob`
        // below does not return (or unwind past this frame) before every share is completed
        // or closed, and no thread reads the job without holding a claimed share.
        let job_ptr: *const Job = unsafe {
            std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(job_ref)
        };
        // SAFETY: no thread reads `job` now: every share of the previous job was completed.
        unsafe { *shared.job.get() = Some(job_ptr) };
        shared.completed.store(0, Ordering::Relaxed);
        let epoch = shared.epoch.load(Ordering::Relaxed).wrapping_add(1);
        shared.claims.store(claim_word(epoch, 0), Ordering::Release);
        shared.epoch.store(epoch, Ordering::SeqCst);
        if shared.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let finish = FinishJob { shared, epoch, n };
        let mut caller_panic = None;
        while let Some(share) = claim(shared, epoch, n) {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(share, n)));
            shared.completed.fetch_add(1, Ordering::Release);
            if let Err(payload) = result {
                caller_panic = Some(payload);
                break;
            }
        }
        drop(finish);
        if let Some(payload) = caller_panic {
            shared.panicked.store(false, Ordering::Relaxed);
            std::panic::resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a compute thread panicked");
        }
    }

    /// Calls `f(range)` for consecutive ranges of `0..n` of `chunk` items each (the last may be
    /// shorter), handed out to the threads by an atomic counter so faster threads take more.
    pub fn for_each_chunk<F: Fn(Range<usize>) + Sync>(&self, n: usize, chunk: usize, f: F) {
        let chunk = chunk.max(1);
        let n_chunks = n.div_ceil(chunk);
        if n_chunks <= 1 || self.n_threads == 1 {
            for c in 0..n_chunks {
                f(c * chunk..((c + 1) * chunk).min(n));
            }
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(|_, _| {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= n_chunks {
                    break;
                }
                f(c * chunk..((c + 1) * chunk).min(n));
            }
        });
    }

    /// Calls `f(range)` for consecutive ranges covering `0..n`, claimed by whichever thread
    /// gets to them first: large at first and shrinking as the work runs out (half of what is
    /// left per thread, at least `min`), each a multiple of `align` long but the last.
    /// The threads claim a few times per job instead of once per fixed chunk, and still finish
    /// together.
    pub fn for_each_guided<F: Fn(Range<usize>) + Sync>(
        &self,
        n: usize,
        align: usize,
        min: usize,
        f: F,
    ) {
        let min = min.max(align).max(1);
        if self.n_threads == 1 || n <= min {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        let next = AtomicUsize::new(0);
        let parts = 2 * self.n_threads;
        self.run(|_, _| {
            while let Some(range) = claim_guided(&next, n, align, min, parts) {
                f(range);
            }
        });
    }

    /// Calls `f(range)` once per thread with that thread's share of `0..n` (see
    /// [`split_evenly`]); threads with an empty share are not called.
    pub fn for_each_split<F: Fn(Range<usize>) + Sync>(&self, n: usize, align: usize, f: F) {
        if self.n_threads == 1 || n <= align.max(1) {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        self.run(|thread, n_threads| {
            let range = split_evenly(n, align, thread, n_threads);
            if !range.is_empty() {
                f(range);
            }
        });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Claims the next range of a [`Pool::for_each_guided`] job: `1 / parts` of what is left, at
/// least `min`, rounded up to a multiple of `align`.
fn claim_guided(
    next: &AtomicUsize,
    n: usize,
    align: usize,
    min: usize,
    parts: usize,
) -> Option<Range<usize>> {
    let mut start = next.load(Ordering::Relaxed);
    loop {
        if start >= n {
            return None;
        }
        let size = ((n - start) / parts)
            .max(min)
            .next_multiple_of(align.max(1));
        let end = (start + size).min(n);
        match next.compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(start..end),
            Err(now) => start = now,
        }
    }
}

/// The claim word of share `share` of the job of `epoch`.
fn claim_word(epoch: usize, share: usize) -> u64 {
    ((epoch as u64 & 0xffff_ffff) << 32) | share as u64
}

/// Claims the next unclaimed share of the job of `epoch` (of `n`), if there is one.
fn claim(shared: &Shared, epoch: usize, n: usize) -> Option<usize> {
    let mut word = shared.claims.load(Ordering::Acquire);
    loop {
        let share = (word & 0xffff_ffff) as usize;
        if word >> 32 != epoch as u64 & 0xffff_ffff || share >= n {
            return None;
        }
        match shared.claims.compare_exchange_weak(
            word,
            word + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Some(share),
            Err(now) => word = now,
        }
    }
}

/// Ends a job: shares nobody claimed are closed without running (after a panic), then it
/// waits until every claimed share is completed.
struct FinishJob<'a> {
    shared: &'a Shared,
    epoch: usize,
    n: usize,
}

impl Drop for FinishJob<'_> {
    fn drop(&mut self) {
        while claim(self.shared, self.epoch, self.n).is_some() {
            self.shared.completed.fetch_add(1, Ordering::Release);
        }
        let mut spins = 0usize;
        while self.shared.completed.load(Ordering::Acquire) < self.n {
            spins += 1;
            if spins < SPIN_ITERATIONS * 10 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn worker_loop(shared: &Shared, n: usize) {
    let mut seen = 0usize;
    loop {
        let Some(epoch) = next_epoch(shared, seen) else {
            return;
        };
        seen = epoch;
        // Shares of a later job are left to the next pass (its epoch differs).
        while let Some(share) = claim(shared, epoch, n) {
            // SAFETY: the caller set `job` before publishing the claims, and keeps it alive
            // until this claimed share is reported completed.
            let job = unsafe { (*shared.job.get()).map(|p| &*p) };
            if let Some(job) = job {
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(share, n)));
                if result.is_err() {
                    shared.panicked.store(true, Ordering::Relaxed);
                }
            }
            shared.completed.fetch_add(1, Ordering::Release);
        }
    }
}

/// Waits for an epoch other than `seen`: spins, then parks. `None` when the pool stops.
fn next_epoch(shared: &Shared, seen: usize) -> Option<usize> {
    for _ in 0..SPIN_ITERATIONS {
        let epoch = shared.epoch.load(Ordering::Acquire);
        if epoch != seen {
            return Some(epoch);
        }
        if shared.stop.load(Ordering::Relaxed) {
            return None;
        }
        std::hint::spin_loop();
    }
    let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
    shared.sleeping.fetch_add(1, Ordering::SeqCst);
    let result = loop {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if epoch != seen {
            break Some(epoch);
        }
        if shared.stop.load(Ordering::SeqCst) {
            break None;
        }
        guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
    };
    shared.sleeping.fetch_sub(1, Ordering::SeqCst);
    result
}

/// Thread `thread`'s share of `0..n` when split into `n_threads` nearly equal ranges whose
/// boundaries are multiples of `align` (the last range takes the remainder).
pub fn split_evenly(n: usize, align: usize, thread: usize, n_threads: usize) -> Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let start = (units * thread / n_threads * align).min(n);
    let end = (units * (thread + 1) / n_threads * align).min(n);
    start..end
}

/// Most threads a pool starts on this computer: four per logical CPU (at least 16), and never
/// more than [`MAX_THREADS`].
pub fn max_threads() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    logical.saturating_mul(4).clamp(16, MAX_THREADS)
}

/// Physical CPU cores (hyper-threads of one core counted once), at least 1.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    linux_physical_cores().map_or(logical, |cores| cores.clamp(1, logical))
}

/// Distinct `(physical id, core id)` pairs of `/proc/cpuinfo`.
fn linux_physical_cores() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::HashSet::new();
    let mut package = "";
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "physical id" => package = value.trim(),
            "core id" => {
                cores.insert((package.to_string(), value.trim().to_string()));
            }
            _ => {}
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// A mutable slice that pool threads write disjoint parts of.
///
/// Kernels split their output by rows; each thread writes only its own rows, which the borrow
/// checker cannot see across the pool's closure.
#[derive(Clone, Copy)]
pub struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _slice: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: access is only through `range_mut`, whose callers promise disjoint ranges.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    /// Wraps `slice` for disjoint writes from several threads.
    pub fn new(slice: &'a mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _slice: std::marker::PhantomData,
        }
    }

    /// Length of the whole slice.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements `range`.
    ///
    /// # Safety
    /// No two live results may overlap (each thread takes its own range).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut(&self, range: Range<usize>) -> &'a mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked); disjointness is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn guided_ranges_cover_every_index_once_aligned_and_shrinking() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            for n in [0, 5, 8, 100, 11_008] {
                let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let ranges = Mutex::new(Vec::new());
                pool.for_each_guided(n, 8, 24, |range| {
                    for i in range.clone() {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    }
                    ranges.lock().unwrap().push(range);
                });
                assert!(
                    seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                    "n = {n}"
                );
                let mut ranges = ranges.into_inner().unwrap();
                ranges.sort_by_key(|r| r.start);
                for r in &ranges[..ranges.len().saturating_sub(1)] {
                    assert_eq!(r.start % 8, 0);
                    assert_eq!(r.len() % 8, 0);
                    assert!(r.len() >= 24 || threads == 1);
                }
                if threads > 1 && n == 11_008 {
                    assert!(ranges.len() < 11_008 / 128, "{} claims", ranges.len());
                    assert!(ranges[0].len() > ranges[ranges.len() - 1].len());
                }
            }
        }
    }

    #[test]
    fn run_calls_every_share_once_per_job() {
        for threads in [1, 2, 3, 5] {
            let pool = Pool::new(threads);
            assert_eq!(pool.n_threads(), threads);
            for _ in 0..200 {
                let seen: Vec<AtomicU32> = (0..threads).map(|_| AtomicU32::new(0)).collect();
                pool.run(|t, n| {
                    assert_eq!(n, threads);
                    seen[t].fetch_add(1, Ordering::Relaxed);
                });
                assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn chunks_and_splits_give_each_index_once() {
        let pool = Pool::new(3);
        for n in [0, 1, 7, 64, 1000] {
            for chunk in [1, 8, 33] {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                pool.for_each_chunk(n, chunk, |r| {
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "{n}/{chunk}"
                );
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                pool.for_each_split(n, chunk, |r| {
                    assert!(r.start % chunk == 0);
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "{n}/{chunk}"
                );
            }
        }
    }

    #[test]
    fn split_evenly_covers_the_range_in_aligned_parts() {
        for n in [0, 5, 8, 100, 128_256] {
            for threads in 1..5 {
                let mut next = 0;
                for t in 0..threads {
                    let r = split_evenly(n, 8, t, threads);
                    assert_eq!(r.start, next);
                    assert!(r.start.is_multiple_of(8) || r.start == n);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn a_parked_pool_wakes_up_for_the_next_job() {
        let pool = Pool::new(2);
        let count = AtomicU32::new(0);
        pool.run(|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.run(|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_pool_stays_usable() {
        let pool = Pool::new(2);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(|t, _| assert_ne!(t, 1, "worker fails"));
        }));
        assert!(result.is_err());
        let count = AtomicU32::new(0);
        pool.run(|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_caller_runs_the_shares_of_a_worker_that_has_not_started() {
        let pool = Pool::new(2);
        // Park the worker: after a long pause it sleeps on the condition variable.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let caller = std::thread::current().id();
        let by_caller = AtomicU32::new(0);
        for _ in 0..1000 {
            pool.run(|_, _| {
                if std::thread::current().id() == caller {
                    by_caller.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Every share ran (checked in other tests); here, the caller did not wait for a
        // parked worker to wake on every job: it took some shares itself.
        assert!(by_caller.load(Ordering::Relaxed) > 1000);
    }

    #[test]
    fn absurd_thread_counts_are_cut_to_the_limit() {
        let limit = max_threads();
        assert!((16..=MAX_THREADS).contains(&limit));
        let pool = Pool::new(usize::MAX);
        assert_eq!(pool.n_threads(), limit);
        let shares = AtomicUsize::new(0);
        pool.run(|_, n| {
            assert_eq!(n, limit);
            shares.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(shares.load(Ordering::Relaxed), limit);
        assert_eq!(Pool::new(limit + 1).n_threads(), limit);
    }

    #[test]
    fn zero_threads_means_the_physical_cores() {
        assert_eq!(Pool::new(0).n_threads(), physical_cores());
    }
}
