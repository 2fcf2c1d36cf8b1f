//! The state every handler shares: the model once it is ready, the job queue, the limits, and
//! the round trip of one request through the queue ([`AppState::infer`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};
use utoipa::OpenApi as _;

use super::error::ApiError;
use super::{ApiDoc, HttpOptions};
use crate::backend::{GenParams, ModelInfo};
use crate::metrics::{Metrics, Sampled};
use crate::queue::{Job, JobError, JobResult, Queue, SubmitError};

/// State shared by every handler.
#[derive(Debug)]
pub struct AppState {
    model: OnceLock<Arc<ModelInfo>>,
    queue: Queue,
    /// Server metrics.
    pub metrics: Arc<Metrics>,
    concurrency: Arc<Semaphore>,
    max_concurrent: usize,
    api_key: Option<String>,
    timeout: Duration,
    max_body_bytes: usize,
    shutting_down: AtomicBool,
    openapi: String,
}

/// The state as handlers receive it.
pub type SharedState = Arc<AppState>;

impl AppState {
    /// State for a server with `options`, feeding `queue` and recording into `metrics`.
    pub fn new(options: &HttpOptions, queue: Queue, metrics: Arc<Metrics>) -> Self {
        Self {
            model: OnceLock::new(),
            queue,
            metrics,
            concurrency: Arc::new(Semaphore::new(options.max_concurrent)),
            max_concurrent: options.max_concurrent,
            api_key: options.api_key.clone(),
            timeout: options.timeout,
            max_body_bytes: options.max_body_bytes,
            shutting_down: AtomicBool::new(false),
            openapi: ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| {
                serde_json::json!({ "error": format!("cannot render the OpenAPI document: {e}") }).to_string()
            }),
        }
    }

    /// Publishes the loaded (and warmed-up) model: from now on the server is ready.
    pub fn set_ready(&self, info: ModelInfo) {
        let _ = self.model.set(Arc::new(info));
        self.metrics.set_ready(true);
    }

    /// Marks the server as shutting down (`/ready` answers 503 from now on).
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Whether the server is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The model, or 503 while it loads.
    pub fn ready_model(&self) -> Result<Arc<ModelInfo>, ApiError> {
        self.model.get().cloned().ok_or_else(|| {
            ApiError::Unavailable(
                "the model is still loading; retry shortly (see GET /ready)".into(),
            )
        })
    }

    /// The API key keyword routes require, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// The limit on keyword requests handled at once.
    pub fn concurrency(&self) -> (&Arc<Semaphore>, usize) {
        (&self.concurrency, self.max_concurrent)
    }

    /// The time limit of one keyword request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The 504 of a request over its time limit.
    pub fn timeout_error(&self) -> ApiError {
        ApiError::Timeout(self.timeout.as_millis() as u64)
    }

    /// The body size limit.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The OpenAPI document, rendered once.
    pub fn openapi(&self) -> &str {
        &self.openapi
    }

    /// The gauges `/metrics` shows, sampled now.
    pub fn sample(&self) -> Sampled {
        Sampled {
            queue_depth: self.queue.depth(),
            in_flight: self
                .max_concurrent
                .saturating_sub(self.concurrency.available_permits()),
        }
    }

    /// Tokenizes `queries` off the async runtime, queues them and awaits the worker's answer,
    /// all by `deadline`.
    pub async fn infer(
        &self,
        info: Arc<ModelInfo>,
        queries: Vec<String>,
        params: GenParams,
        field: fn(usize) -> String,
        deadline: Instant,
    ) -> Result<(Vec<String>, JobResult), ApiError> {
        let (queries, inputs) = tokio::task::spawn_blocking(move || {
            let inputs = info.encode(&queries, field);
            (queries, inputs)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("tokenization failed: {e}")))?;
        let inputs = inputs?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inputs,
            params,
            enqueued: Instant::now(),
            deadline,
            reply,
        };
        self.queue.submit(job).map_err(|e| match e {
            SubmitError::Full => ApiError::Overloaded(format!(
                "the queue is full ({} requests waiting, --max_queue); retry later",
                self.queue.capacity()
            )),
            SubmitError::Closed => ApiError::Unavailable("the inference worker has stopped".into()),
        })?;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Err(_) | Ok(Ok(Err(JobError::Timeout))) => Err(self.timeout_error()),
            Ok(Err(_)) => Err(ApiError::Internal(
                "the inference worker dropped the request".into(),
            )),
            Ok(Ok(Err(JobError::Failed(m)))) => {
                Err(ApiError::Internal(format!("generation failed: {m}")))
            }
            Ok(Ok(Ok(result))) => Ok((queries, result)),
        }
    }
}
