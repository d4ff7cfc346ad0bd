//! Decode steps of concurrent requests run as one forward pass.
//!
//! Each generation keeps its own thread (prompt, sampling, stop checks, events), but hands its
//! decode steps to one batching thread: a step waits there until every generation that is
//! decoding has sent its own (or [`WINDOW`] has passed), and then all of them run in one
//! [`feed_together`]. Each base weight is then read once per step for all requests, not once
//! per request; each row still gets its own blend and its own KV cache, so an answer is token
//! for token the one it gets alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::runtime::{feed_together, RowPlan, Session};
use crate::{Error, Result};

/// How long a step waits for the other decoding generations' steps before running without
/// them (a generation may be busy sending, or about to finish).
pub const WINDOW: Duration = Duration::from_millis(3);

/// One generation's step: its session goes to the batching thread and comes back fed.
struct Step {
    session: Session,
    token: u32,
    plan: RowPlan,
    back: mpsc::Sender<(Session, Result<Vec<f32>>)>,
}

/// The batching thread's handle, shared by all generations.
pub struct Batcher {
    tx: mpsc::Sender<Step>,
    decoding: Arc<AtomicUsize>,
    /// Steps run and rows they held, for the metrics: (batched forward passes, steps).
    stats: Arc<(AtomicUsize, AtomicUsize)>,
}

/// Held by a generation while it decodes: the batcher waits for its steps.
pub struct Decoding(Arc<AtomicUsize>);

impl Drop for Decoding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Start the batching thread (it ends when the last handle is dropped).
    pub fn start() -> Result<Batcher> {
        let (tx, rx) = mpsc::channel::<Step>();
        let decoding = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let (d, st) = (decoding.clone(), stats.clone());
        std::thread::Builder::new()
            .name("stancemix-batch".into())
            .spawn(move || run(rx, d, st))
            .map_err(|e| Error::Internal(format!("cannot start the batching thread: {e}")))?;
        Ok(Batcher {
            tx,
            decoding,
            stats,
        })
    }

    /// Count a generation as decoding until the guard drops.
    pub fn enter(&self) -> Decoding {
        self.decoding.fetch_add(1, Ordering::SeqCst);
        Decoding(self.decoding.clone())
    }

    /// Feed `token` to `session` under `plan` in the next batched step; blocks until it ran.
    /// Returns the session with the next-token logits (on an error the generation is over and
    /// the session with it).
    pub fn feed(
        &self,
        session: Session,
        token: u32,
        plan: &RowPlan,
    ) -> Result<(Session, Vec<f32>)> {
        let (back, answer) = mpsc::channel();
        let step = Step {
            session,
            token,
            plan: plan.clone(),
            back,
        };
        match self.tx.send(step) {
            Ok(()) => {
                let (session, z) = answer.recv().map_err(|_| {
                    Error::Candle(candle_core::Error::Msg(
                        "the batching thread stopped mid-step".into(),
                    ))
                })?;
                Ok((session, z?))
            }
            // The batching thread is gone: feed alone.
            Err(mpsc::SendError(mut step)) => {
                let z = step.session.feed(&[step.token], &step.plan)?;
                Ok((step.session, z))
            }
        }
    }

    /// Batched forward passes run, and the steps they held.
    pub fn stats(&self) -> (usize, usize) {
        (
            self.stats.0.load(Ordering::Relaxed),
            self.stats.1.load(Ordering::Relaxed),
        )
    }
}

fn run(
    rx: mpsc::Receiver<Step>,
    decoding: Arc<AtomicUsize>,
    stats: Arc<(AtomicUsize, AtomicUsize)>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + WINDOW;
        while batch.len() < decoding.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(step) => batch.push(step),
                Err(_) => break,
            }
        }
        stats.0.fetch_add(1, Ordering::Relaxed);
        stats.1.fetch_add(batch.len(), Ordering::Relaxed);
        let results = {
            let mut items: Vec<(&mut Session, u32, &RowPlan)> = batch
                .iter_mut()
                .map(|s| (&mut s.session, s.token, &s.plan))
                .collect();
            feed_together(&mut items)
        };
        for (step, z) in batch.into_iter().zip(results) {
            // A generation that went away meanwhile drops its answer: nothing to do.
            let _ = step.back.send((step.session, z));
        }
    }
}
