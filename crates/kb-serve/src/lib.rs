//! # kb-serve
//!
//! The keyword HTTP server of kobart-keywords: a drop-in replacement for the original Flask
//! server (`POST /keyword_extract`), a JSON API (`POST /v1/keywords`), dynamic batching of
//! concurrent requests on one inference thread, input, load and connection limits with JSON
//! errors, Prometheus metrics, an OpenAPI document and graceful shutdown.
//!
//! Modules, in the spirit of text-embeddings-inference:
//! - [`cli`]: options (flags and `KB_…` environment variables) and the [`ServeOptions`] they
//!   make;
//! - [`http`]: request and response types, handlers, middleware, the router and OpenAPI
//!   document, and the connection loop (limits, timeouts, graceful shutdown);
//! - [`queue`]: the bounded job queue and the batching inference worker;
//! - [`backend`]: the model, its limits and tokenization (no HTTP, no command line);
//! - [`metrics`]: Prometheus metrics;
//! - [`server`]: startup and shutdown ([`serve`] in-process, [`run`] for the binary).

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod http;
pub mod metrics;
pub mod queue;
pub mod server;

pub use cli::{Args, LogFormat};
pub use server::{run, serve, serve_with, ServeOptions};
