//! The blocking pool: threads that run the backend requests a worker must not wait for.
//!
//! A worker executes reads, writes, flushes and `fallocate` of file-descriptor backends on its ring.
//! What the ring cannot do goes through the backend's own, synchronous `submit`: zeroing a range on a
//! device that refuses `fallocate` (a loop of zero writes, up to the whole volume), `BLKDISCARD` on a
//! zvol, reads and writes an `O_DIRECT` device cannot take as they are. Those run here, and their
//! results come back through the worker's mailbox like any asynchronous backend's: the worker keeps
//! serving every other connection meanwhile.
//!
//! Jobs are taken in the order they came (one queue for the server); the number of jobs waiting is
//! bounded by the workers' limits on requests in flight. The threads run at the lowest priority
//! (nice 19): where they share a core with a worker, the worker runs first.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// A fixed set of threads running jobs in arrival order. Cheap to clone.
#[derive(Clone)]
pub(super) struct BlockingPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BlockingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingPool").field("waiting", &self.shared.queue.lock().jobs.len()).finish()
    }
}

impl BlockingPool {
    /// Starts `threads` threads (at least one).
    pub(super) fn start(threads: usize) -> std::io::Result<(BlockingPool, Vec<JoinHandle<()>>)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false }),
            ready: Condvar::new(),
        });
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let mine = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("xatastor-blk{i}"))
                .spawn(move || Self::serve(&mine));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    BlockingPool { shared }.close();
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok((BlockingPool { shared }, handles))
    }

    fn serve(shared: &Shared) {
        // Background work: at the lowest priority, so that a worker sharing the core with a busy pool
        // thread (a node pinned to few cores) is scheduled as soon as it has input.
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
            tracing::debug!(error = %e, "could not lower the priority of a blocking-pool thread");
        }
        loop {
            let job = {
                let mut q = shared.queue.lock();
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    if q.closed {
                        return;
                    }
                    shared.ready.wait(&mut q);
                }
            };
            job();
        }
    }

    /// Queues `job`; gives it back if the pool is closed.
    pub(super) fn run(&self, job: Job) -> Result<(), Job> {
        let mut q = self.shared.queue.lock();
        if q.closed {
            return Err(job);
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Lets the threads end once the queued jobs are done.
    pub(super) fn close(&self) {
        self.shared.queue.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_jobs_on_its_threads_and_refuses_them_once_closed() {
        let (pool, handles) = BlockingPool::start(2).unwrap();
        let (tx, rx) = mpsc::channel();
        // A job that blocks does not hold up the next one (two threads).
        let (release, gate) = mpsc::channel::<()>();
        let t = tx.clone();
        assert!(pool
            .run(Box::new(move || {
                let _ = gate.recv();
                let _ = t.send("slow");
            }))
            .is_ok());
        let t = tx.clone();
        assert!(pool
            .run(Box::new(move || {
                let _ = t.send("quick");
            }))
            .is_ok());
        assert_eq!(rx.recv().unwrap(), "quick");
        release.send(()).unwrap();
        assert_eq!(rx.recv().unwrap(), "slow");
        pool.close();
        assert!(pool.run(Box::new(|| {})).is_err(), "a closed pool gives the job back");
        for h in handles {
            h.join().unwrap();
        }
    }
}
