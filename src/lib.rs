//! pgwarden: a PostgreSQL credential proxy in the style of AWS RDS Proxy.
//!
//! The data flow, one module per stage:
//!
//! ```text
//!  client ─TCP/TLS─▶ listener ─▶ session ─▶ auth (IAM token | SCRAM) ─▶ pool::checkout ─▶ relay ◀──▶ Postgres
//!                                  │  └──▶ audit                       │ miss                ▲ release at
//!                                  │                                   ▼                     │ ReadyForQuery 'I'
//!                                tls (certs, reload)            backend::connect ◀── credentials (Secrets Manager
//!                                                               (CURRENT → PENDING → PREVIOUS)   or file, refresh loop)
//!                                                                                      ▲
//!                                                                rotation: the four Secrets Manager steps
//!                                                                (pgwarden rotate, the Lambda handler)
//! ```
//!
//! `stream` gives both sides one byte-stream type (TCP or TLS); `tls` configures both sides.
//! `reload` applies a changed configuration file on SIGHUP (credential entries and every
//! `[pool]` key) without dropping a client.
//!
//! `protocol` is sans-io and depends on nothing else here; `session` is the only module that
//! sees the whole flow and the only one that decides what a client is told.

pub mod audit;
pub mod auth;
pub mod backend;
pub mod bufpool;
pub mod cancel;
pub mod config;
pub mod credentials;
pub mod dev;
pub mod devdb;
pub mod listener;
pub mod metrics;
pub mod net;
pub mod periodic;
pub mod pool;
pub mod protocol;
pub mod relay;
pub mod reload;
pub mod rotation;
pub mod session;
pub mod shutdown;
pub mod stream;
pub mod tls;

pub use config::Config;
pub use listener::{Server, Shared};
