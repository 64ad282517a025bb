//! pgwarden: a PostgreSQL credential proxy in the style of AWS RDS Proxy.
//!
//! The data flow, one module per stage:
//!
//! ```text
//!  client ─TCP─▶ listener ─▶ session ─▶ auth (SCRAM) ─▶ pool::checkout ─▶ relay ◀──▶ Postgres
//!                                                        │ miss                ▲ release at
//!                                                        ▼                     │ ReadyForQuery 'I'
//!                                                 backend::connect ◀── credentials (file source,
//!                                                 (CURRENT → PENDING → PREVIOUS)  refresh loop)
//! ```
//!
//! `protocol` is sans-io and depends on nothing else here; `session` is the only module that
//! sees the whole flow and the only one that decides what a client is told.

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
pub mod pool;
pub mod protocol;
pub mod relay;
pub mod session;

pub use config::Config;
pub use listener::{Server, Shared};
