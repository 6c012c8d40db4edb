//! Parallel loops for the fast CPU path: `for_each` runs a closure on every item of a small array,
//! the calling thread and the idle helper threads (one per extra core) taking items in turn from a
//! shared counter, so that a thread that falls behind (a core the host lends elsewhere for a
//! while) takes fewer. Between jobs a helper keeps polling for 200 us (yielding its core between
//! looks) before it sleeps, so that the parallel products of a training step, tens of microseconds
//! apart, do not each pay for waking a thread (tens of microseconds, against a few hundred of work).
//! A caller waiting for a helper spins 20 us, then sleeps until woken, so that two threads sharing
//! one core (as a virtual machine's two cores sometimes behave) do not hold the core each other
//! needs. The timings behind these choices are in benches/cpu.md.
//!
//! Contract: `for_each` returns after every item has been processed and every helper that took
//! part has finished; a helper that had not started by the time the caller ran out of items is
//! taken back without running. A panic in `work` is raised again on the caller once every
//! participant has finished, so nothing the items borrow is used after `for_each` returns or
//! unwinds. With no idle helper (all busy with other loops, one core, or helpers that could not
//! be started) the caller processes every item itself. Nothing is allocated per call.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long an idle helper polls for the next job before it sleeps: longer than the serial
/// stretches between a training step's parallel products, short enough that the core is given
/// back soon after training stops (a shorter window made epochs slower, a longer one no faster).
const POLL: Duration = Duration::from_micros(200);
/// How long a caller spins for a helper to finish before it yields between looks.
const SPIN_WAIT: Duration = Duration::from_micros(20);

/// The most helpers one loop uses (and so the most threads: one more).
const MAX_HELPERS: usize = 15;

/// A helper's states: waiting; claimed by a caller writing its job; job posted; job taken by the
/// helper; job done.
const IDLE: u8 = 0;
const CLAIMED: u8 = 1;
const POSTED: u8 = 2;
const RUNNING: u8 = 3;
const DONE: u8 = 4;

/// A caller's job, with its lifetime erased (see the SAFETY note in `for_each`).
#[derive(Clone, Copy)]
struct Job(*const (dyn Fn() + Sync + 'static));

/// One helper thread and the slot through which callers hand it jobs.
struct Helper {
    state: AtomicU8,
    /// Set while the helper is parked (or about to park): a caller must unpark it.
    sleeping: AtomicBool,
    /// Written by the caller that claimed the helper, before it stores POSTED.
    job: UnsafeCell<Option<Job>>,
    /// The job's panic, written by the helper before it stores DONE.
    panic: UnsafeCell<Option<Box<dyn Any + Send>>>,
    thread: OnceLock<Thread>,
    /// The caller of the posted job, written with the job; `caller_parked` is set while it
    /// sleeps waiting for DONE, and the helper then wakes it.
    caller: UnsafeCell<Option<Thread>>,
    caller_parked: AtomicBool,
}

// SAFETY: `job` and `panic` are only touched by the one caller that claimed the helper (between
// CLAIMED and POSTED, and after DONE or after taking a POSTED job back) and by the helper
// (between RUNNING and DONE); the state's release stores and acquire loads order those accesses.
// The job points at a `Sync` closure.
unsafe impl Sync for Helper {}
unsafe impl Send for Job {}

/// The thread count handed to `configure` (None: one per core), read when the helpers start.
static REQUESTED: OnceLock<Option<usize>> = OnceLock::new();

/// Set the threads of this process's loops (None: one per core); the first call before any loop
/// runs wins, since the helpers live as long as the process.
pub fn configure(threads: Option<usize>) {
    let _ = REQUESTED.set(threads);
}

/// The process's helpers: one fewer than the threads asked for, or than the cores (none on one).
fn helpers() -> &'static [&'static Helper] {
    static HELPERS: OnceLock<Vec<&'static Helper>> = OnceLock::new();
    HELPERS.get_or_init(|| {
        let cores = REQUESTED
            .get()
            .copied()
            .flatten()
            .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()));
        (1..cores.min(MAX_HELPERS + 1)).filter_map(start_helper).collect()
    })
}

/// Start helper `i`; None when the thread cannot be started (the callers then do its share).
fn start_helper(i: usize) -> Option<&'static Helper> {
    let helper: &'static Helper = Box::leak(Box::new(Helper {
        state: AtomicU8::new(IDLE),
        sleeping: AtomicBool::new(false),
        job: UnsafeCell::new(None),
        panic: UnsafeCell::new(None),
        thread: OnceLock::new(),
        caller: UnsafeCell::new(None),
        caller_parked: AtomicBool::new(false),
    }));
    let handle = thread::Builder::new()
        .name(format!("gpu-mnist-cpu-{i}"))
        .spawn(move || serve(helper))
        .ok()?;
    helper.thread.set(handle.thread().clone()).ok()?;
    Some(helper)
}

/// Number of threads a loop can spread over: the caller and the helpers.
pub fn threads() -> usize {
    1 + helpers().len()
}

/// The most pieces a parallel loop is cut into.
pub const MAX_CHUNKS: usize = 16;

/// Pieces to cut `units` of work into: about 4 per thread (so that a thread that falls behind
/// takes fewer), one per unit at most.
pub fn chunk_count(units: usize) -> usize {
    (4 * threads()).min(MAX_CHUNKS).min(units).max(1)
}

/// The helper's loop: wait for a posted job, take it, run it, report.
fn serve(helper: &'static Helper) {
    loop {
        let mut idle_since = Instant::now();
        loop {
            let state = helper.state.load(Ordering::Acquire);
            if state == POSTED
                && helper
                    .state
                    .compare_exchange(POSTED, RUNNING, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            if idle_since.elapsed() < POLL {
                thread::yield_now();
                continue;
            }
            helper.sleeping.store(true, Ordering::SeqCst);
            if helper.state.load(Ordering::SeqCst) != POSTED {
                thread::park();
            }
            helper.sleeping.store(false, Ordering::SeqCst);
            idle_since = Instant::now();
        }
        // SAFETY: RUNNING was taken from POSTED with acquire ordering after the caller wrote the job.
        let job = unsafe { *helper.job.get() };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if let Some(Job(f)) = job {
                // SAFETY: the caller keeps the closure alive until it sees DONE.
                unsafe { (*f)() }
            }
        }));
        // SAFETY: only this helper writes `panic` between RUNNING and DONE.
        unsafe { *helper.panic.get() = outcome.err() };
        // SAFETY: the caller wrote `caller` before POSTED and changes it only after DONE.
        let caller = unsafe { (*helper.caller.get()).clone() };
        helper.state.store(DONE, Ordering::SeqCst);
        if helper.caller_parked.load(Ordering::SeqCst) {
            if let Some(caller) = caller {
                caller.unpark();
            }
        }
    }
}

/// Wait for `helper` to finish its job: spin a little (the usual wait is a few microseconds),
/// then sleep until the helper wakes this thread. Sleeping matters on a virtual machine whose
/// cores the host sometimes runs on one physical core by turns: a caller that kept spinning
/// would hold the core the helper needs to finish.
fn wait_until_done(helper: &Helper) {
    let start = Instant::now();
    while helper.state.load(Ordering::Acquire) != DONE {
        if start.elapsed() < SPIN_WAIT {
            for _ in 0..16 {
                std::hint::spin_loop();
            }
            continue;
        }
        helper.caller_parked.store(true, Ordering::SeqCst);
        if helper.state.load(Ordering::SeqCst) != DONE {
            thread::park_timeout(Duration::from_millis(1));
        }
        helper.caller_parked.store(false, Ordering::SeqCst);
    }
}

/// Run `work(item)` for every item present, spread over the caller and the idle helpers.
pub fn for_each<T: Send, const N: usize>(items: [Option<T>; N], work: &(dyn Fn(T) + Sync)) {
    let count = items.iter().filter(|i| i.is_some()).count();
    let slots = items.map(Mutex::new);
    let next = AtomicUsize::new(0);
    // The first panic of any item; the other items still run, wherever it happened.
    let panicked: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);
    let run = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= N {
            break;
        }
        let item = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(item) = item {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| work(item))) {
                panicked.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
            }
        }
    };
    let run_ref: &(dyn Fn() + Sync) = &run;
    // SAFETY: the pointer erases the borrow's lifetime. A helper calls it between RUNNING and
    // DONE and keeps no copy after; this function waits for DONE (or takes a job back before it
    // runs) for every helper it posted to before it returns or unwinds (`run` catches the items'
    // panics), so the closure and what it borrows outlive every use.
    let job = Job(unsafe {
        std::mem::transmute::<*const (dyn Fn() + Sync + '_), *const (dyn Fn() + Sync + 'static)>(run_ref)
    });
    let mut posted: [Option<&Helper>; MAX_HELPERS] = [None; MAX_HELPERS];
    // Taken before any helper holds the job, so that nothing here can unwind while one does.
    let me = thread::current();
    let wanted = count.saturating_sub(1);
    let mut n_posted = 0;
    for helper in helpers() {
        if n_posted == wanted.min(MAX_HELPERS) {
            break;
        }
        if helper
            .state
            .compare_exchange(IDLE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // SAFETY: this caller claimed the helper; the helper reads the job and the caller only
        // after POSTED.
        unsafe {
            *helper.job.get() = Some(job);
            *helper.caller.get() = Some(me.clone());
        }
        helper.state.store(POSTED, Ordering::SeqCst);
        if helper.sleeping.load(Ordering::SeqCst) {
            if let Some(t) = helper.thread.get() {
                t.unpark();
            }
        }
        posted[n_posted] = Some(helper);
        n_posted += 1;
    }
    run();
    let mut panic = None;
    for helper in posted.iter().flatten() {
        // Not started yet: take the job back (the items are all done).
        if helper
            .state
            .compare_exchange(POSTED, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            wait_until_done(helper);
            // SAFETY: DONE was loaded with acquire ordering after the helper wrote its panic.
            let helper_panic = unsafe { (*helper.panic.get()).take() };
            panic = panic.or(helper_panic);
        }
        // SAFETY: the helper is CLAIMED or DONE: only this caller touches the slots now.
        unsafe { *helper.job.get() = None };
        helper.state.store(IDLE, Ordering::Release);
    }
    let item_panic = panicked.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = item_panic.or(panic) {
        resume_unwind(p);
    }
}

/// The least number of values moved worth a piece of its own when a loop is split over threads
/// (a hand-off costs about a microsecond, copying this many values some ten).
const SPLIT_MIN_VALUES: usize = 1 << 15;

/// Pieces to cut `units` (rows or images) into, for `values` values moved in all.
pub fn pieces(units: usize, values: usize) -> usize {
    (values / SPLIT_MIN_VALUES).clamp(1, chunk_count(units))
}

/// Run `work(first unit, its part of out)` over `out` cut into pieces of whole units of
/// `unit_len` values each (`unit_len` > 0), spread over the threads.
pub fn split_units(out: &mut [f32], unit_len: usize, values: usize, work: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let units = out.len() / unit_len;
    let per = units.div_ceil(pieces(units, values)).max(1);
    let mut parts = out.chunks_mut(per * unit_len).enumerate();
    let items: [_; MAX_CHUNKS] = std::array::from_fn(|_| parts.next());
    for_each(items, &|(i, part): (usize, &mut [f32])| work(i * per, part));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ask for more threads than a small machine's cores, so that the loops have helpers to hand
    /// work to (it takes effect when these tests are the first loops of the process, as
    /// tests/run.sh runs them alone; otherwise they run on the helpers already started).
    fn more_threads_than_cores() {
        configure(Some(4));
    }

    /// Split v into 16 chunks (the last ones empty when v is short).
    fn chunks(v: &mut [u64]) -> [Option<&mut [u64]>; 16] {
        let size = v.len().div_ceil(16).max(1);
        let mut parts = v.chunks_mut(size);
        std::array::from_fn(|_| parts.next())
    }

    #[test]
    fn every_item_is_processed_once() {
        more_threads_than_cores();
        let mut v = vec![0u64; 1000];
        for round in 0..300u64 {
            for_each(chunks(&mut v), &|c: &mut [u64]| c.iter_mut().for_each(|x| *x += round));
        }
        let want: u64 = (0..300).sum();
        assert!(v.iter().all(|&x| x == want));
    }

    #[test]
    fn nested_and_concurrent_loops_finish() {
        more_threads_than_cores();
        fn add_one(v: &mut [u64], depth: u32) {
            if depth == 0 {
                v.iter_mut().for_each(|x| *x += 1);
                return;
            }
            for_each(chunks(v), &|c: &mut [u64]| add_one(c, depth - 1));
        }
        thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut v = vec![0u64; 4096];
                    for _ in 0..30 {
                        add_one(&mut v, 2);
                    }
                    assert!(v.iter().all(|&x| x == 30));
                });
            }
        });
    }

    #[test]
    fn a_panic_reaches_the_caller_after_every_item_is_done() {
        more_threads_than_cores();
        let done = AtomicUsize::new(0);
        let items: [Option<usize>; 8] = std::array::from_fn(Some);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            for_each(items, &|i: usize| {
                if i == 3 {
                    panic!("item 3");
                }
                thread::sleep(Duration::from_millis(2));
                done.fetch_add(1, Ordering::SeqCst);
            })
        }));
        assert!(outcome.is_err(), "the panic was lost");
        assert_eq!(
            done.load(Ordering::SeqCst),
            7,
            "returned before the other items were done"
        );
        // The helpers still work afterwards.
        let mut v = vec![0u64; 64];
        for_each(chunks(&mut v), &|c: &mut [u64]| c.iter_mut().for_each(|x| *x = 1));
        assert!(v.iter().all(|&x| x == 1));
    }
}
