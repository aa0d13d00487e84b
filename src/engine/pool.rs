//! The engine's thread pool for matmuls: persistent workers that take chunks of a job from a shared counter, so a
//! worker that the OS deschedules (another process holding its core) delays only the chunk it holds, never the
//! whole job. The calling thread works too, and waits only for workers that actually entered the job: a worker
//! that wakes after the caller has finished every chunk finds the job closed and leaves it alone. Idle workers spin
//! briefly (the gaps between a decode step's matmuls are microseconds), then sleep on a condition variable.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Set in [`Shared::state`] when no worker may enter the current job.
const CLOSED: usize = 1 << (usize::BITS - 1);
/// Spin iterations of an idle worker before it sleeps (about 100 µs).
const SPIN: usize = 20_000;

/// One call of [`run`]: the chunk function, the next chunk to hand out and the number of chunks.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    next: AtomicUsize,
    total: usize,
}

impl Job<'_> {
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.total {
                return;
            }
            (self.f)(i);
        }
    }
}

struct Shared {
    /// The current job (a `Job` on the stack of the thread in [`run`], valid while the job is open or entered).
    job: AtomicPtr<Job<'static>>,
    /// Workers inside the current job, with [`CLOSED`] set once the caller stops admitting them.
    state: AtomicUsize,
    /// Incremented for every job, so idle workers notice it.
    generation: AtomicUsize,
    /// Sleeping workers, and the condition variable they wait on.
    sleepers: Mutex<usize>,
    wake: Condvar,
}

/// A pool of `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// Held while a job runs: a second concurrent caller runs its job on its own thread instead of waiting.
    busy: Mutex<()>,
}

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

/// Set the number of threads of the global pool (caller included). Effective only before its first use; returns
/// whether it took effect.
pub fn set_threads(n: usize) -> bool {
    if POOL.get().is_some() {
        return n == threads();
    }
    THREADS.store(n.max(1), Ordering::Relaxed);
    true
}

/// The global pool's thread count: [`set_threads`], else the cores available to this process.
pub fn threads() -> usize {
    match POOL.get() {
        Some(p) => p.threads,
        None => match THREADS.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        },
    }
}

/// Run `f(i)` for every chunk `i < total` on the global pool; returns when all have run.
pub fn run(total: usize, f: &(dyn Fn(usize) + Sync)) {
    POOL.get_or_init(|| Pool::new(threads())).run(total, f);
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            state: AtomicUsize::new(CLOSED),
            generation: AtomicUsize::new(0),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        for i in 1..threads {
            let s = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("mor-pool-{i}"))
                .spawn(move || worker(&s))
                .expect("spawning a pool thread");
        }
        Pool {
            shared,
            threads,
            busy: Mutex::new(()),
        }
    }

    fn run(&self, total: usize, f: &(dyn Fn(usize) + Sync)) {
        let job = Job {
            f,
            next: AtomicUsize::new(0),
            total,
        };
        let guard = (self.threads > 1 && total > 1)
            .then(|| self.busy.try_lock().ok())
            .flatten();
        if guard.is_none() {
            job.work();
            return;
        }
        let s = &*self.shared;
        // The pointer is only dereferenced by workers that enter before the job is closed below, and the job
        // outlives them: this function waits for every entered worker to leave before returning.
        s.job
            .store(&job as *const Job as *mut Job<'static>, Ordering::Release);
        s.state.store(0, Ordering::Release);
        s.generation.fetch_add(1, Ordering::Release);
        if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        job.work();
        s.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut spins = 0usize;
        while s.state.load(Ordering::Acquire) & !CLOSED != 0 {
            spins += 1;
            if spins < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        s.job.store(std::ptr::null_mut(), Ordering::Release);
        drop(guard);
    }
}

fn worker(s: &Shared) {
    let mut seen = s.generation.load(Ordering::Acquire);
    loop {
        let mut spins = 0;
        while s.generation.load(Ordering::Acquire) == seen {
            spins += 1;
            if spins < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut n = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            while s.generation.load(Ordering::Acquire) == seen {
                n = s.wake.wait(n).unwrap_or_else(|e| e.into_inner());
            }
            *n -= 1;
        }
        seen = s.generation.load(Ordering::Acquire);
        let mut st = s.state.load(Ordering::Acquire);
        let entered = loop {
            if st & CLOSED != 0 {
                break false;
            }
            match s
                .state
                .compare_exchange_weak(st, st + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(v) => st = v,
            }
        };
        if !entered {
            continue;
        }
        // SAFETY: the job is open and this worker is counted in `state`, so the caller of `run` keeps the job
        // alive (it waits for the count to drop to zero) and the pointer was published before the job opened.
        let job = unsafe { &*s.job.load(Ordering::Acquire) };
        if catch_unwind(AssertUnwindSafe(|| job.work())).is_err() {
            // Unwinding past the count would leave the caller waiting forever.
            std::process::abort();
        }
        s.state.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once() {
        let pool = Pool::new(3);
        for total in [0, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..total).map(|_| AtomicUsize::new(0)).collect();
            pool.run(total, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }
}
