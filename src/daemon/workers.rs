//! A fixed set of threads that run the API's synchronous handlers.
//!
//! Why not a growing blocking pool: every thread keeps its own SQLite
//! connections (see `runtime::conns`), and every commit by one connection
//! empties the page caches of all the others. A few long-lived threads keep
//! the caches warm and context switches rare; a burst waits in the queue,
//! whose length `Limits::max_inflight_requests` bounds.

use anyhow::Result;

type Job = Box<dyn FnOnce() + Send>;

/// The worker threads and the queue that feeds them.
pub struct Workers {
    tx: smol::channel::Sender<Job>,
}

impl Workers {
    /// Starts `n` worker threads, each of which first runs `warm` (opens
    /// its database connections, say) so that the first requests after a
    /// start do not all pay for it at once. They end when the `Workers` is
    /// dropped and the queue is empty.
    pub fn start(n: usize, warm: impl Fn() + Clone + Send + 'static) -> Result<Workers> {
        let (tx, rx) = smol::channel::unbounded::<Job>();
        for i in 0..n.max(1) {
            let rx = rx.clone();
            let warm = warm.clone();
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    warm();
                    while let Ok(job) = rx.recv_blocking() {
                        job();
                    }
                })?;
        }
        Ok(Workers { tx })
    }

    /// Runs `f` on a worker and waits for its result; `None` if the
    /// workers are gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (reply, answer) = smol::channel::bounded(1);
        let job: Job = Box::new(move || {
            let _ = reply.try_send(f());
        });
        self.tx.send(job).await.ok()?;
        answer.recv().await.ok()
    }
}
