//! The request queue and the dynamic batcher.
//!
//! HTTP handlers [`Queue::submit`] a [`Job`] (already tokenized) and await its oneshot reply; they
//! never touch the model. One inference worker — a dedicated OS thread running [`run_worker`] —
//! takes jobs off the queue, gathers those with the same generation settings into a batch (up to
//! `max_batch_size` queries, waiting at most `max_wait` after the first one arrived or after
//! the previous batch finished), runs one batched generation and answers every job. Jobs whose client gave up or whose deadline passed
//! are dropped before generation, and a job whose client goes away (disconnected, or answered
//! 504 at its deadline) while its batch generates leaves the batch at the next decoding step;
//! a panic in generation is caught and answered as an error.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::backend::{GenParams, Generate, Output};
use crate::metrics::Metrics;

/// The answer to a job.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// One output per input row, in order.
    pub outputs: Vec<Output>,
    /// Queries in the (largest) batch this job ran in.
    pub batch_size: usize,
    /// Time between submission and the start of generation.
    pub queue_time: Duration,
    /// Time generation took.
    pub inference_time: Duration,
}

/// Why a job produced no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// Its deadline passed before generation started.
    Timeout,
    /// Generation failed or panicked.
    Failed(String),
}

/// One request's worth of work.
#[derive(Debug)]
pub struct Job {
    /// Token ids, one row per query.
    pub inputs: Vec<Vec<u32>>,
    /// Generation settings (jobs are only batched with jobs that share them).
    pub params: GenParams,
    /// When the job was submitted.
    pub enqueued: Instant,
    /// After this the job is dropped rather than generated.
    pub deadline: Instant,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<JobResult, JobError>>,
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// `max_queue` jobs are already waiting.
    Full,
    /// The inference worker has stopped.
    Closed,
}

/// Admission to the queue: how many jobs wait for the model (queued or being gathered into a
/// batch), never more than the capacity (`--max_queue`).
#[derive(Debug)]
pub struct QueueDepth {
    waiting: AtomicUsize,
    capacity: usize,
}

impl QueueDepth {
    /// An empty queue admitting at most `capacity` waiting jobs.
    pub fn new(capacity: usize) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            capacity,
        }
    }

    /// Admits one more job, unless `capacity` jobs already wait.
    pub fn try_admit(&self) -> bool {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < self.capacity).then_some(d + 1)
            })
            .is_ok()
    }

    /// Marks `n` admitted jobs as no longer waiting (taken into a batch, or never queued).
    pub fn release(&self, n: usize) {
        self.waiting.fetch_sub(n, Ordering::AcqRel);
    }

    /// Jobs waiting now.
    pub fn get(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// The most jobs that may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// The sending side of the job queue, bounded to `capacity` waiting jobs.
#[derive(Debug, Clone)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    depth: Arc<QueueDepth>,
}

/// The receiving side, handed to [`run_worker`].
#[derive(Debug)]
pub struct QueueReceiver {
    rx: mpsc::Receiver<Job>,
    depth: Arc<QueueDepth>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// A queue holding at most `capacity` waiting jobs; the worker records its batches in
    /// `metrics`.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> (Queue, QueueReceiver) {
        let (tx, rx) = mpsc::channel();
        let depth = Arc::new(QueueDepth::new(capacity));
        (
            Queue {
                tx,
                depth: depth.clone(),
            },
            QueueReceiver { rx, depth, metrics },
        )
    }

    /// Enqueues a job without blocking.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if !self.depth.try_admit() {
            return Err(SubmitError::Full);
        }
        self.tx.send(job).map_err(|_| {
            self.depth.release(1);
            SubmitError::Closed
        })
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.depth.capacity()
    }

    /// Jobs waiting for the model now.
    pub fn depth(&self) -> usize {
        self.depth.get()
    }
}

/// How the worker forms batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// Most queries per generation.
    pub max_batch_size: usize,
    /// How long to wait for more jobs after the first job of a batch was submitted.
    pub max_wait: Duration,
}

/// How often an idle worker checks the shutdown flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// Serves jobs until `shutdown` is set and no job is left, or every [`Queue`] is dropped.
pub fn run_worker<G: Generate>(
    backend: &G,
    queue: QueueReceiver,
    policy: BatchPolicy,
    shutdown: &AtomicBool,
) {
    let QueueReceiver { rx, depth, metrics } = queue;
    let mut backlog: VecDeque<Job> = VecDeque::new();
    // When the worker last finished a batch: the batching window opens no earlier.
    let mut free_since = Instant::now();
    loop {
        if backlog.is_empty() {
            match rx.recv_timeout(IDLE_POLL) {
                Ok(job) => backlog.push_back(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        let batch = gather(&rx, &mut backlog, policy, free_since);
        depth.release(batch.len());
        run_batch(backend, batch, policy.max_batch_size, &metrics);
        free_since = Instant::now();
    }
}

/// Takes the jobs for the next batch: those sharing the oldest job's settings, up to
/// `max_batch_size` queries, waiting for more until `max_wait` after the oldest job's submission
/// or after the worker became free (`free_since`), whichever is later. Jobs with other settings
/// stay in `backlog` for later batches, in order.
///
/// The window counts from the end of the previous batch too: a job that arrived during a batch
/// (its window long past) would otherwise start a batch of its own the moment the worker is
/// free — just before the clients answered by that batch send their next requests, which then
/// wait a whole generation behind it. Under steady load that splits every batch in two (seen in
/// the load benchmark as alternating batches of 15 and 1); waiting `max_wait` once more lets them
/// join.
fn gather(
    rx: &mpsc::Receiver<Job>,
    backlog: &mut VecDeque<Job>,
    policy: BatchPolicy,
    free_since: Instant,
) -> Vec<Job> {
    let key = backlog[0].params;
    let deadline = backlog[0].enqueued.max(free_since) + policy.max_wait;
    let queued = |backlog: &VecDeque<Job>| -> usize {
        backlog
            .iter()
            .filter(|j| j.params == key)
            .map(|j| j.inputs.len())
            .sum()
    };
    // Whatever is already waiting joins without delay.
    while queued(backlog) < policy.max_batch_size {
        match rx.try_recv() {
            Ok(job) => backlog.push_back(job),
            Err(_) => break,
        }
    }
    // Then wait out the rest of the window for more.
    while queued(backlog) < policy.max_batch_size {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(job) => backlog.push_back(job),
            Err(_) => break,
        }
    }
    let mut batch = Vec::new();
    let mut rows = 0;
    let mut rest = VecDeque::with_capacity(backlog.len());
    for job in backlog.drain(..) {
        let fits = batch.is_empty() || rows + job.inputs.len() <= policy.max_batch_size;
        if job.params == key && fits {
            rows += job.inputs.len();
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *backlog = rest;
    batch
}

/// A job being generated: the outputs of its rows so far.
struct Pending {
    job: Job,
    outputs: Vec<Option<Output>>,
    missing: usize,
    batch_size: usize,
    answered: bool,
}

/// Generates for `jobs` (all with the same settings) in chunks of at most `max_batch_size`
/// rows and answers each job as soon as all of its rows are final — a short answer goes out
/// while the rest of its batch is still generating.
fn run_batch<G: Generate>(backend: &G, jobs: Vec<Job>, max_batch_size: usize, metrics: &Metrics) {
    let now = Instant::now();
    let mut pending = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.reply.is_closed() {
            metrics.record_dropped();
        } else if now >= job.deadline {
            metrics.record_dropped();
            let _ = job.reply.send(Err(JobError::Timeout));
        } else {
            let rows = job.inputs.len();
            pending.push(Pending {
                job,
                outputs: vec![None; rows],
                missing: rows,
                batch_size: 0,
                answered: false,
            });
        }
    }
    if pending.is_empty() {
        return;
    }
    let params = pending[0].job.params;
    // Every row of every job, as (job, row within the job).
    let rows: Vec<(usize, usize)> = pending
        .iter()
        .enumerate()
        .flat_map(|(j, p)| (0..p.job.inputs.len()).map(move |r| (j, r)))
        .collect();
    let started = Instant::now();
    let mut failure = None;
    for chunk in rows.chunks(max_batch_size.max(1)) {
        if let Err(e) = generate_chunk(backend, chunk, &mut pending, params, started, metrics) {
            failure = Some(e);
            break;
        }
    }
    let Some(error) = failure else {
        // Jobs whose clients went away during generation were left unanswered.
        for _ in pending.iter().filter(|p| !p.answered) {
            metrics.record_dropped();
        }
        return;
    };
    let batched = pending.len() > 1;
    let unanswered: Vec<Job> = pending
        .into_iter()
        .filter(|p| !p.answered)
        .map(|p| p.job)
        .collect();
    if batched {
        // Retry each request alone so that one bad request does not fail the others.
        tracing::warn!(%error, jobs = unanswered.len(), "batched generation failed; retrying the unanswered requests one by one");
        for job in unanswered {
            run_batch(backend, vec![job], max_batch_size, metrics);
        }
    } else {
        tracing::error!(%error, "generation failed");
        for job in unanswered {
            let _ = job.reply.send(Err(JobError::Failed(error.clone())));
        }
    }
}

/// Generates the rows `chunk` (`(job, row)` pairs into `pending`) as one batch, catching
/// panics, and answers every job whose last row this produced. The rows of a job whose client
/// went away (its reply channel closed: disconnected or timed out) leave the batch at the next
/// decoding step.
fn generate_chunk<G: Generate>(
    backend: &G,
    chunk: &[(usize, usize)],
    pending: &mut [Pending],
    params: GenParams,
    started: Instant,
    metrics: &Metrics,
) -> Result<(), String> {
    let inputs: Vec<Vec<u32>> = chunk
        .iter()
        .map(|&(j, r)| pending[j].job.inputs[r].clone())
        .collect();
    for &(j, _) in chunk {
        pending[j].batch_size = pending[j].batch_size.max(chunk.len());
    }
    let chunk_started = Instant::now();
    let (mut handed, mut tokens) = (0usize, 0usize);
    // `ready` updates the jobs and `wanted` reads them; generation calls one at a time.
    let jobs = RefCell::new(&mut *pending);
    let mut ready = |i: usize, out: Output| {
        let Some(&(j, r)) = chunk.get(i) else {
            return; // not a row of this chunk: ignored, and caught by the check below
        };
        let mut jobs = jobs.borrow_mut();
        let p = &mut jobs[j];
        if p.outputs[r].is_some() || p.answered {
            return;
        }
        handed += 1;
        tokens += out.tokens;
        p.outputs[r] = Some(out);
        p.missing -= 1;
        if p.missing == 0 {
            p.answered = true;
            let outputs = p
                .outputs
                .iter_mut()
                .map(|o| o.take().expect("all rows present"))
                .collect();
            let (tx, _) = oneshot::channel();
            let reply = std::mem::replace(&mut p.job.reply, tx);
            let _ = reply.send(Ok(JobResult {
                outputs,
                batch_size: p.batch_size,
                queue_time: started.saturating_duration_since(p.job.enqueued),
                inference_time: started.elapsed(),
            }));
        }
    };
    let wanted = |i: usize| {
        chunk.get(i).is_some_and(|&(j, _)| {
            let jobs = jobs.borrow();
            jobs[j].answered || !jobs[j].job.reply.is_closed()
        })
    };
    catch_unwind(AssertUnwindSafe(|| {
        backend.generate(&inputs, params, &mut ready, &wanted)
    }))
    .map_err(|payload| format!("the inference worker panicked: {}", panic_message(&payload)))??;
    metrics.record_batch(chunk.len(), tokens, chunk_started.elapsed());
    // Every row of a job still waiting must have come back.
    let missing = chunk
        .iter()
        .filter(|&&(j, r)| {
            let p = &pending[j];
            !p.answered && p.outputs[r].is_none() && !p.job.reply.is_closed()
        })
        .count();
    if missing > 0 {
        return Err(format!(
            "generation returned {handed} outputs for {} inputs ({missing} still awaited)",
            chunk.len()
        ));
    }
    Ok(())
}

pub(crate) fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Echoes the first token of each row; records batch sizes; panics on token 666, fails on 13.
    /// Rows are handed over shortest-second-token first (like generation, where short answers
    /// finish first), waiting `step` before each.
    #[derive(Default)]
    struct Fake {
        batches: Mutex<Vec<(usize, GenParams)>>,
        /// First tokens of the rows given up because they were no longer wanted.
        skipped: Mutex<Vec<u32>>,
        delay: Duration,
        step: Duration,
    }

    impl Generate for Fake {
        fn generate(
            &self,
            inputs: &[Vec<u32>],
            params: GenParams,
            ready: &mut dyn FnMut(usize, Output),
            wanted: &dyn Fn(usize) -> bool,
        ) -> Result<(), String> {
            std::thread::sleep(self.delay);
            self.batches.lock().unwrap().push((inputs.len(), params));
            if inputs.iter().any(|r| r[0] == 666) {
                panic!("boom");
            }
            if inputs.iter().any(|r| r[0] == 13) {
                return Err("unlucky input".into());
            }
            let mut order: Vec<usize> = (0..inputs.len()).collect();
            order.sort_by_key(|&i| inputs[i][1]);
            for i in order {
                std::thread::sleep(self.step);
                if !wanted(i) {
                    self.skipped.lock().unwrap().push(inputs[i][0]);
                    continue;
                }
                ready(
                    i,
                    Output {
                        keywords: vec![inputs[i][0].to_string()],
                        text: inputs[i][0].to_string(),
                        tokens: 1,
                    },
                );
            }
            Ok(())
        }
    }

    const P: GenParams = GenParams {
        num_beams: 5,
        max_length: 20,
        grounded: false,
    };

    fn job(first: u32, params: GenParams) -> (Job, oneshot::Receiver<Result<JobResult, JobError>>) {
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        (
            Job {
                inputs: vec![vec![first, 1]],
                params,
                enqueued: now,
                deadline: now + Duration::from_secs(30),
                reply: tx,
            },
            rx,
        )
    }

    fn run(fake: &Fake, jobs: Vec<Job>, policy: BatchPolicy) -> (Arc<Metrics>, Arc<QueueDepth>) {
        let metrics = Arc::new(Metrics::default());
        let (queue, rx) = Queue::new(100, metrics.clone());
        for j in jobs {
            queue.submit(j).unwrap();
        }
        drop(queue);
        let depth = rx.depth.clone();
        run_worker(fake, rx, policy, &AtomicBool::new(false));
        (metrics, depth)
    }

    fn answer(rx: oneshot::Receiver<Result<JobResult, JobError>>) -> Result<JobResult, JobError> {
        rx.blocking_recv().expect("every job is answered")
    }

    #[test]
    fn waiting_jobs_are_batched_and_grouped_by_settings() {
        let fake = Fake::default();
        let other = GenParams {
            num_beams: 1,
            max_length: 20,
            grounded: false,
        };
        let (mut jobs, mut rxs) = (Vec::new(), Vec::new());
        for (i, p) in [P, P, other, P, other].into_iter().enumerate() {
            let (j, r) = job(100 + i as u32, p);
            jobs.push(j);
            rxs.push(r);
        }
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_wait: Duration::ZERO,
        };
        let (metrics, queue) = run(&fake, jobs, policy);
        assert_eq!(*fake.batches.lock().unwrap(), vec![(3, P), (2, other)]);
        for (i, rx) in rxs.into_iter().enumerate() {
            let r = answer(rx).unwrap();
            assert_eq!(
                r.outputs[0].text,
                (100 + i).to_string(),
                "answers go to the right request"
            );
        }
        assert_eq!(queue.get(), 0);
        assert_eq!(metrics.batch_sizes().count(), 2);
    }

    #[test]
    fn batches_respect_max_batch_size_and_big_jobs_are_chunked() {
        let fake = Fake::default();
        let (a, ra) = job(1, P);
        let (b, rb) = job(2, P);
        let (mut c, rc) = job(3, P);
        c.inputs = (0..5).map(|i| vec![50 + i, 1]).collect();
        let policy = BatchPolicy {
            max_batch_size: 2,
            max_wait: Duration::ZERO,
        };
        run(&fake, vec![a, b, c], policy);
        let sizes: Vec<usize> = fake.batches.lock().unwrap().iter().map(|b| b.0).collect();
        assert_eq!(sizes, vec![2, 2, 2, 1]);
        assert_eq!(answer(ra).unwrap().batch_size, 2);
        assert_eq!(answer(rb).unwrap().batch_size, 2);
        let c = answer(rc).unwrap();
        assert_eq!(c.outputs.len(), 5);
        assert_eq!(c.outputs[4].text, "54");
    }

    #[test]
    fn a_panic_or_failure_only_fails_its_own_request() {
        let fake = Fake::default();
        let (a, ra) = job(1, P);
        let (b, rb) = job(666, P);
        let (c, rc) = job(13, P);
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_wait: Duration::ZERO,
        };
        run(&fake, vec![a, b, c], policy);
        assert!(answer(ra).is_ok());
        match answer(rb) {
            Err(JobError::Failed(m)) => {
                assert!(m.contains("panicked") && m.contains("boom"), "{m}")
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(
            answer(rc).unwrap_err(),
            JobError::Failed("unlucky input".into())
        );
    }

    #[test]
    fn a_request_is_answered_as_soon_as_its_rows_are_done() {
        let fake = Fake {
            step: Duration::from_millis(150),
            ..Fake::default()
        };
        // Job `slow` (two rows, one finishing last) and job `fast` (finishing first) share a batch.
        let (mut slow, r_slow) = job(7, P);
        slow.inputs = vec![vec![7, 9], vec![8, 2]];
        let (mut fast, r_fast) = job(5, P);
        fast.inputs = vec![vec![5, 1]];
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_wait: Duration::ZERO,
        };
        let metrics = Arc::new(Metrics::default());
        let (queue, rx) = Queue::new(10, metrics);
        queue.submit(slow).unwrap();
        queue.submit(fast).unwrap();
        drop(queue);
        let worker = std::thread::spawn(move || {
            run_worker(&fake, rx, policy, &AtomicBool::new(false));
            fake
        });
        let fast = answer(r_fast).unwrap();
        let slow = answer(r_slow).unwrap();
        let fake = worker.join().unwrap();
        assert_eq!(fake.batches.lock().unwrap().len(), 1, "one batch for both");
        assert_eq!(fast.outputs[0].text, "5");
        assert_eq!(fast.batch_size, 3);
        let texts: Vec<&str> = slow.outputs.iter().map(|o| o.text.as_str()).collect();
        assert_eq!(texts, ["7", "8"], "rows back in request order");
        // `fast` was sent when its row was done, two generation steps before the batch ended.
        assert!(
            slow.inference_time >= fast.inference_time + Duration::from_millis(250),
            "{:?} vs {:?}",
            fast.inference_time,
            slow.inference_time
        );
    }

    #[test]
    fn a_request_abandoned_during_generation_leaves_the_batch() {
        let fake = Fake {
            step: Duration::from_millis(200),
            ..Fake::default()
        };
        // `stays` finishes first; `gone`'s client leaves before its row is done.
        let (mut stays, r_stays) = job(4, P);
        stays.inputs = vec![vec![4, 1]];
        let (mut gone, r_gone) = job(9, P);
        gone.inputs = vec![vec![9, 5]];
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_wait: Duration::ZERO,
        };
        let metrics = Arc::new(Metrics::default());
        let (queue, rx) = Queue::new(10, metrics.clone());
        queue.submit(stays).unwrap();
        queue.submit(gone).unwrap();
        drop(queue);
        let worker = std::thread::spawn(move || {
            run_worker(&fake, rx, policy, &AtomicBool::new(false));
            fake
        });
        assert_eq!(answer(r_stays).unwrap().outputs[0].text, "4");
        drop(r_gone);
        let fake = worker.join().unwrap();
        assert_eq!(fake.batches.lock().unwrap().len(), 1, "one batch for both");
        assert_eq!(
            *fake.skipped.lock().unwrap(),
            vec![9],
            "its row was given up"
        );
        assert!(metrics
            .render(&Default::default())
            .contains("kb_dropped_requests_total 1"));
    }

    #[test]
    fn expired_and_abandoned_jobs_are_dropped_before_generation() {
        let fake = Fake::default();
        let (mut a, ra) = job(1, P);
        a.deadline = Instant::now();
        let (b, rb) = job(2, P);
        drop(rb);
        let (c, rc) = job(3, P);
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_wait: Duration::ZERO,
        };
        let (metrics, _) = run(&fake, vec![a, b, c], policy);
        assert_eq!(answer(ra).unwrap_err(), JobError::Timeout);
        assert!(answer(rc).is_ok());
        assert_eq!(*fake.batches.lock().unwrap(), vec![(1, P)]);
        assert!(metrics
            .render(&Default::default())
            .contains("kb_dropped_requests_total 2"));
    }

    #[test]
    fn the_worker_waits_for_late_jobs_within_the_window() {
        let fake = Fake::default();
        let metrics = Arc::new(Metrics::default());
        let (queue, rx) = Queue::new(100, metrics);
        let (a, ra) = job(1, P);
        queue.submit(a).unwrap();
        let q2 = queue.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let (b, rb) = job(2, P);
            q2.submit(b).unwrap();
            rb
        });
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_wait: Duration::from_millis(500),
        };
        let shutdown = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| run_worker(&fake, rx, policy, &shutdown));
            let rb = late.join().unwrap();
            assert_eq!(answer(ra).unwrap().batch_size, 2);
            assert_eq!(answer(rb).unwrap().batch_size, 2);
            shutdown.store(true, Ordering::Release);
        });
        drop(queue);
    }

    #[test]
    fn a_job_that_waited_through_a_batch_still_waits_for_newcomers() {
        let fake = Fake {
            delay: Duration::from_millis(800),
            ..Fake::default()
        };
        let metrics = Arc::new(Metrics::default());
        let (queue, rx) = Queue::new(100, metrics);
        let policy = BatchPolicy {
            max_batch_size: 8,
            max_wait: Duration::from_millis(300),
        };
        let shutdown = AtomicBool::new(false);
        std::thread::scope(|s| {
            let worker = s.spawn(|| run_worker(&fake, rx, policy, &shutdown));
            // `a` runs alone (its window closes at 300 ms); `b` arrives while it generates and
            // its own window is over when `a` is done (at ~1100 ms); `c` comes right after `a`'s
            // answer, as a client answered by that batch would.
            let (a, ra) = job(1, P);
            queue.submit(a).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            let (b, rb) = job(2, P);
            queue.submit(b).unwrap();
            assert_eq!(answer(ra).unwrap().batch_size, 1);
            let (c, rc) = job(3, P);
            queue.submit(c).unwrap();
            assert_eq!(answer(rb).unwrap().batch_size, 2, "b waited for c");
            assert_eq!(answer(rc).unwrap().batch_size, 2);
            shutdown.store(true, Ordering::Release);
            drop(queue);
            worker.join().unwrap();
        });
        let sizes: Vec<usize> = fake.batches.lock().unwrap().iter().map(|b| b.0).collect();
        assert_eq!(sizes, vec![1, 2]);
    }

    #[test]
    fn a_full_queue_refuses_jobs() {
        let metrics = Arc::new(Metrics::default());
        let (queue, rx) = Queue::new(1, metrics);
        let (a, _ra) = job(1, P);
        let (b, _rb) = job(2, P);
        queue.submit(a).unwrap();
        assert_eq!(queue.submit(b).unwrap_err(), SubmitError::Full);
        drop(rx);
        let (c, _rc) = job(3, P);
        queue.depth.release(1);
        assert_eq!(queue.submit(c).unwrap_err(), SubmitError::Closed);
        assert_eq!(queue.depth(), 0);
    }
}
