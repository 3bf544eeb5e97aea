//! A team of spinning helper threads for the kernels' small parallel loops.
//!
//! At batch 1 a layer takes tens of microseconds. Rayon's idle workers go to sleep within
//! about 20 µs, and waking one costs as much as the layer: with two threads, a 40 µs loop split
//! in two took 59 µs when the calls were 20 µs apart. The team's helpers instead spin for
//! [`SPIN`] after each loop before they sleep, so the next layer finds them awake (ONNX
//! Runtime's intra-op pool spins too, by default).
//!
//! [`for_each`] runs `f(0..n)` on the calling thread and the helpers, as many threads in all as
//! rayon's current pool has (`--threads`). A spinning helper holds a core: a rayon loop that
//! starts within [`SPIN`] of a team loop shares the cores with it. Which thread runs which index never
//! changes a result: callers split work into tasks that write disjoint outputs. The team is one
//! per process: a second caller while it is busy (another model running on another thread)
//! runs its loop in order.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins for the next loop before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// A loop's body with its lifetime erased: valid while its [`for_each`] call lasts, which
/// returns only when no helper holds it any more.
#[derive(Clone, Copy)]
struct Body(*const (dyn Fn(usize) + Sync));
// SAFETY: the body is `Sync`, and the pointer is used only while `for_each` keeps it alive.
unsafe impl Send for Body {}

struct Job {
    body: Body,
    /// Helpers `0..helpers` take part (the caller's pool may be smaller than the team).
    helpers: usize,
}

#[derive(Default)]
struct Slot {
    epoch: usize,
    job: Option<Job>,
    sleepers: usize,
}

struct Team {
    /// A caller holds the team; a nested or concurrent call runs its loop alone.
    busy: AtomicBool,
    /// The slot's epoch, which helpers spin on.
    epoch: AtomicUsize,
    /// The tasks not yet claimed, `lo..hi` packed as `hi << 32 | lo`: the caller claims from
    /// the front, the helpers from the back.
    claim: AtomicU64,
    done: AtomicUsize,
    /// Helpers inside the current job (joined under the slot's lock, while the job is open).
    joined: AtomicUsize,
    panicked: AtomicBool,
    slot: Mutex<Slot>,
    wake: Condvar,
    spawned: Mutex<usize>,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team {
        busy: AtomicBool::new(false),
        epoch: AtomicUsize::new(0),
        claim: AtomicU64::new(0),
        done: AtomicUsize::new(0),
        joined: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        slot: Mutex::new(Slot::default()),
        wake: Condvar::new(),
        spawned: Mutex::new(0),
    })
}

/// Run `f(i)` for every `i` in `0..n`, on this thread and the team's helpers; in order on
/// this thread when rayon's pool has one thread, `n < 2`, inside [`alone`], a helper cannot be
/// started, or the team is busy (a call from inside a loop, or from another thread meanwhile).
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let threads = threads();
    let t = team();
    let inline = n < 2 || threads < 2 || n > u32::MAX as usize || t.busy.load(Ordering::Relaxed);
    if inline || !t.ensure(threads - 1) || t.busy.swap(true, Ordering::Acquire) {
        (0..n).for_each(f);
        return;
    }
    let body: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: only the lifetime is erased; this call outlives every use (it waits below until
    // every task is done and no helper has joined the job).
    let body = Body(unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(body) });
    {
        let mut slot = t.slot.lock().unwrap_or_else(|e| e.into_inner());
        t.claim.store((n as u64) << 32, Ordering::Relaxed);
        t.done.store(0, Ordering::Relaxed);
        slot.epoch += 1;
        slot.job = Some(Job {
            body,
            helpers: threads - 1,
        });
        t.epoch.store(slot.epoch, Ordering::Release);
        if slot.sleepers > 0 {
            t.wake.notify_all();
        }
    }
    let mine = t.work(&f, false);
    wait_until(|| t.done.load(Ordering::Acquire) >= n);
    t.slot.lock().unwrap_or_else(|e| e.into_inner()).job = None;
    wait_until(|| t.joined.load(Ordering::Acquire) == 0);
    let helper_panicked = t.panicked.swap(false, Ordering::Relaxed);
    t.busy.store(false, Ordering::Release);
    if let Some(p) = mine {
        resume_unwind(p);
    }
    assert!(!helper_panicked, "a kernel task panicked on a helper thread");
}

/// The threads a [`for_each`] on this thread may use: rayon's current pool, or 1 inside
/// [`alone`] and on a helper.
pub fn threads() -> usize {
    match ALONE.get() {
        true => 1,
        false => rayon::current_num_threads(),
    }
}

/// Spin until `ready`, yielding the core now and then (a helper holding the last task may be
/// waiting for it on a busy machine).
fn wait_until(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        spins += 1;
        if spins.is_multiple_of(1024) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// [`for_each`] over the chunks of `data` (`chunk` values each, the last one shorter):
/// `f(index, chunk)`.
pub fn for_chunks<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    // one image of single-value rows, in bands of `chunk`
    let chunk = chunk.max(1);
    for_bands(data, data.len(), 1, chunk, |_, r0, c| f(r0 / chunk, c));
}

/// [`for_each`] over bands of rows: `data` holds images of `rows` rows of `row_len` values,
/// cut into bands of `band` rows that never cross an image (an image's last band may be
/// shorter): `f(image, first_row, band_values)`.
pub fn for_bands<T: Send>(
    data: &mut [T],
    rows: usize,
    row_len: usize,
    band: usize,
    f: impl Fn(usize, usize, &mut [T]) + Sync,
) {
    struct Base<T>(*mut T);
    // SAFETY: the tasks take disjoint bands of `data`, which outlives the loop.
    unsafe impl<T: Send> Sync for Base<T> {}
    let per_image = rows * row_len;
    if per_image == 0 {
        return;
    }
    assert_eq!(data.len() % per_image, 0, "whole images");
    let (images, band) = (data.len() / per_image, band.clamp(1, rows));
    let bands = rows.div_ceil(band);
    let base = Base(data.as_mut_ptr());
    let base = &base;
    for_each(images * bands, |t| {
        let (img, r0) = (t / bands, (t % bands) * band);
        let r1 = (r0 + band).min(rows);
        // SAFETY: rows `r0..r1` of image `img`; no other task has them.
        let out =
            unsafe { std::slice::from_raw_parts_mut(base.0.add(img * per_image + r0 * row_len), (r1 - r0) * row_len) };
        f(img, r0, out)
    });
}

thread_local! {
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with every [`for_each`] on this thread in order: for the work of an outer parallel
/// loop (sub-batches on every thread), where the helpers would only oversubscribe the cores.
pub fn alone<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.set(self.0);
        }
    }
    let _restore = Restore(ALONE.replace(true));
    f()
}

impl Team {
    /// Claim and run tasks until none is left. Every task claimed is counted done, even one
    /// that panics (the caller waits for the count); the first panic's payload is returned.
    fn work(&self, f: &(dyn Fn(usize) + Sync), from_back: bool) -> Option<Box<dyn std::any::Any + Send>> {
        let mut first = None;
        loop {
            let Some(i) = self.claim_one(from_back) else {
                return first;
            };
            let r = catch_unwind(AssertUnwindSafe(|| f(i)));
            self.done.fetch_add(1, Ordering::Release);
            if let Err(p) = r {
                first.get_or_insert(p);
            }
        }
    }

    /// The next unclaimed task from the front (the caller) or the back (a helper), if any.
    /// From both ends, two threads each run a contiguous share of the tasks, the caller the
    /// first (with more, the helpers interleave among themselves in the back part):
    /// loops that split an image's rows the same way leave each band's data in the cache of
    /// the core that wrote it (a claimed-in-turn order sends it between the cores).
    fn claim_one(&self, from_back: bool) -> Option<usize> {
        let mut s = self.claim.load(Ordering::Relaxed);
        loop {
            let (lo, hi) = (s & 0xffff_ffff, s >> 32);
            if lo >= hi {
                return None;
            }
            let (next, i) = match from_back {
                false => (s + 1, lo),
                true => (s - (1 << 32), hi - 1),
            };
            match self
                .claim
                .compare_exchange_weak(s, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(i as usize),
                Err(now) => s = now,
            }
        }
    }

    /// At least `k` helpers started; false if the system refuses a thread.
    fn ensure(&'static self, k: usize) -> bool {
        let mut spawned = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
        while *spawned < k {
            let id = *spawned;
            let started = std::thread::Builder::new()
                .name(format!("tabconv-team-{id}"))
                .spawn(move || self.helper(id));
            if started.is_err() {
                return false;
            }
            *spawned += 1;
        }
        true
    }

    fn helper(&self, id: usize) {
        // a loop inside a task runs in order (and starts no helpers of its own)
        ALONE.set(true);
        let mut seen = self.epoch.load(Ordering::Acquire);
        // whether the last job wanted this helper: one beyond the current pool's size sleeps
        // at once instead of spinning
        let mut wanted = true;
        loop {
            let start = Instant::now();
            while self.epoch.load(Ordering::Acquire) == seen {
                if wanted && start.elapsed() < SPIN {
                    // a few pauses between looks: with 32, a helper joined a batch-1 layer's
                    // two tasks late enough that ResNet-18/16 at two threads took 3 % longer
                    // (0.371-0.375 ms with 4, 0.385-0.387 with 32: minimums of alternating runs)
                    for _ in 0..4 {
                        std::hint::spin_loop();
                    }
                    continue;
                }
                let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
                slot.sleepers += 1;
                while slot.epoch == seen {
                    slot = self.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                slot.sleepers -= 1;
            }
            // Join the job if it is still open (and meant for this helper).
            let job = {
                let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
                seen = slot.epoch;
                wanted = slot.job.as_ref().is_none_or(|j| id < j.helpers);
                match &slot.job {
                    Some(j) if id < j.helpers => {
                        self.joined.fetch_add(1, Ordering::Relaxed);
                        Some(j.body)
                    }
                    _ => None,
                }
            };
            if let Some(body) = job {
                // SAFETY: the caller keeps the body alive until `joined` is back to 0.
                let f = unsafe { &*body.0 };
                if self.work(f, true).is_some() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
                self.joined.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_at_every_pool_size() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                for n in [0, 1, 2, 7, 100] {
                    let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                    for_each(n, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                        // a nested call runs alone, all of it
                        let inner = AtomicU64::new(0);
                        for_each(3, |_| {
                            inner.fetch_add(1, Ordering::Relaxed);
                        });
                        assert_eq!(inner.load(Ordering::Relaxed), 3);
                    });
                    assert!(
                        hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                        "{threads} threads, n = {n}"
                    );
                }
            });
        }
    }

    /// With two threads each runs one contiguous share of the tasks, the caller's from task 0
    /// (the caller claims from the front, the helper from the back).
    #[test]
    fn the_caller_runs_the_first_tasks_and_the_helper_the_last() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let n = 48;
        // other tests may hold the team for a while: try until a helper takes part
        for _ in 0..200 {
            let on_helper: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
            pool.install(|| {
                for_each(n, |i| {
                    std::thread::sleep(std::time::Duration::from_micros(20));
                    let helper = std::thread::current()
                        .name()
                        .is_some_and(|t| t.starts_with("tabconv-team"));
                    on_helper[i].store(helper, Ordering::Relaxed);
                })
            });
            let on_helper: Vec<bool> = on_helper.iter().map(|h| h.load(Ordering::Relaxed)).collect();
            let first = on_helper.iter().position(|&h| h).unwrap_or(n);
            if first < n {
                // (a caller descheduled for the whole loop may run none)
                assert!(
                    on_helper[first..].iter().all(|&h| h),
                    "not one share each: {on_helper:?}"
                );
                return;
            }
        }
        panic!("no task ran on a helper");
    }

    #[test]
    fn a_helper_takes_part_and_a_smaller_pool_runs_alone() {
        let on_helper = || {
            std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("tabconv-team"))
        };
        let helped = AtomicU64::new(0);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        // other tests may hold the team for a while: try until it is free
        for _ in 0..200 {
            pool.install(|| {
                for_each(64, |_| {
                    std::thread::sleep(std::time::Duration::from_micros(20));
                    if on_helper() {
                        helped.fetch_add(1, Ordering::Relaxed);
                    }
                })
            });
            if helped.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
        assert!(helped.load(Ordering::Relaxed) > 0, "no task ran on a helper");
        // inside `alone`, or in a pool of one thread, everything runs on the caller
        let elsewhere = AtomicU64::new(0);
        let me = std::thread::current().id();
        let count = |_: usize| {
            if std::thread::current().id() != me {
                elsewhere.fetch_add(1, Ordering::Relaxed);
            }
        };
        alone(|| for_each(64, count));
        assert_eq!(threads(), rayon::current_num_threads());
        assert_eq!(alone(threads), 1);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        one.install(|| {
            let me = std::thread::current().id();
            let ran_here = AtomicU64::new(0);
            for_each(64, |_| {
                if std::thread::current().id() == me {
                    ran_here.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert_eq!(ran_here.load(Ordering::Relaxed), 64);
        });
        assert_eq!(elsewhere.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn chunks_and_bands_cover_every_value_once_where_they_say() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            let mut v = vec![0usize; 103];
            for_chunks(&mut v, 10, |i, c| c.iter_mut().for_each(|x| *x += i + 1));
            assert!(v.iter().enumerate().all(|(j, &x)| x == j / 10 + 1));
            // 3 images of 7 rows of 4 values, bands of 3 rows: 3 + 3 + 1 per image
            let mut v = vec![0usize; 3 * 7 * 4];
            for_bands(&mut v, 7, 4, 3, |img, r0, b| {
                assert_eq!(b.len(), 4 * 3.min(7 - r0));
                b.iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x += 1000 * img + 4 * r0 + j + 1);
            });
            assert!(v.iter().enumerate().all(|(j, &x)| x == 1000 * (j / 28) + j % 28 + 1));
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_recovers() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            let r = catch_unwind(|| for_each(50, |i| assert!(i != 31, "task 31")));
            assert!(r.is_err());
            let sum = AtomicU64::new(0);
            for_each(50, |i| {
                sum.fetch_add(i as u64, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 49 * 50 / 2);
        });
    }
}
