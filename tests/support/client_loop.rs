//! Clients connecting over and over while a test does something to fluxd (restarts it): a few
//! threads inside a namespace, each running one attempt after another, bounded in count and
//! time, counting what was served and keeping what failed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::fluxd::wait_until;
use super::netns::Netns;

pub struct ClientLoop {
    served: Arc<AtomicU64>,
    slowest: Arc<Mutex<Duration>>,
    failures: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What the clients saw, once they stopped.
pub struct Outcome {
    pub served: u64,
    pub slowest: Duration,
    pub failures: Vec<String>,
}

impl ClientLoop {
    /// `clients` threads in `ns` running `attempt(i)` for i = 0, 1, ... (shared between them)
    /// until `max` attempts, `limit` of time, or [`ClientLoop::finish`].
    pub fn start(
        ns: &Netns,
        clients: usize,
        max: u64,
        limit: Duration,
        attempt: impl Fn(u64) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> ClientLoop {
        let attempt = Arc::new(attempt);
        let next = Arc::new(AtomicU64::new(0));
        let (served, slowest, failures, done) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(Duration::ZERO)),
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let threads = (0..clients)
            .map(|_| {
                let (attempt, next, served, slowest, failures, done) = (
                    attempt.clone(),
                    next.clone(),
                    served.clone(),
                    slowest.clone(),
                    failures.clone(),
                    done.clone(),
                );
                ns.spawn(move || {
                    let start = Instant::now();
                    while !done.load(Ordering::SeqCst) && start.elapsed() < limit {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= max {
                            break;
                        }
                        let t = Instant::now();
                        match attempt(i) {
                            Ok(()) => {
                                served.fetch_add(1, Ordering::SeqCst);
                                let mut s = slowest.lock().unwrap();
                                *s = (*s).max(t.elapsed());
                            }
                            Err(e) => failures.lock().unwrap().push(format!(
                                "connection {i} at {:?}: {e} ({:?})",
                                start.elapsed(),
                                e.kind()
                            )),
                        }
                    }
                })
            })
            .collect();
        ClientLoop {
            served,
            slowest,
            failures,
            done,
            threads,
        }
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Waits up to 10 s for `n` more connections served than `from`; on failure, says why in
    /// one string (how many failed so far, the first few).
    pub fn progressed(&self, from: u64, n: u64) -> Result<(), String> {
        if wait_until(Duration::from_secs(10), || self.served() >= from + n).is_some() {
            return Ok(());
        }
        let failures = self.failures.lock().unwrap();
        Err(format!(
            "{} served, {} failed: {:?}",
            self.served(),
            failures.len(),
            &failures[..failures.len().min(5)]
        ))
    }

    /// Stops the clients and waits for them.
    pub fn finish(self) -> Outcome {
        self.done.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        let slowest = *self.slowest.lock().unwrap();
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        Outcome {
            served: self.served.load(Ordering::SeqCst),
            slowest,
            failures,
        }
    }
}

impl Outcome {
    /// Panics, with the first failures and `log`, unless every connection was served.
    pub fn assert_none_failed(&self, what: &str, log: &str) {
        eprintln!(
            "{} {what} served, {} failed, slowest {:?}",
            self.served,
            self.failures.len(),
            self.slowest
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} {what} failed: {:?}\n{log}",
            self.failures.len(),
            self.served + self.failures.len() as u64,
            &self.failures[..self.failures.len().min(5)],
        );
    }
}
