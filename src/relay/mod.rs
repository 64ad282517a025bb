//! The transaction relay: while a client holds a backend, bytes flow both ways untouched. The
//! relay only finds message boundaries (by the 5-byte header) and reads the few messages that
//! decide when the transaction is over: it counts the requests that will each end in a
//! ReadyForQuery (Query, Sync, FunctionCall), notes extended-protocol messages not yet followed
//! by Sync, and reads the status of each ReadyForQuery. The backend goes back to the pool when
//! every expected ReadyForQuery has arrived, the last one said idle ('I'), and neither stream is
//! in the middle of a message.
//!
//! Both directions run concurrently in the session's task, so a backend that writes while the
//! client writes (COPY, pipelining) cannot deadlock the proxy. Must not: decide what a client is
//! told on failure (the session does), or touch the pool.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::BackendConn;
use crate::backend::settings::Settings;
use crate::metrics::Metrics;
use crate::protocol::{MessageScanner, ProtocolError, TxStatus, backend_tag, frontend_tag, read_cstr};
use crate::stream::Stream;

/// The client's socket and what has been read from it but not yet forwarded.
pub struct ClientSide {
    pub stream: Stream,
    pub buf: BytesMut,
    pub scanner: MessageScanner,
}

/// Why a relay stopped.
#[derive(Debug)]
pub enum Outcome {
    /// The transaction is over and the backend is idle.
    TransactionDone,
    /// The client closed, failed, or sent Terminate.
    ClientGone,
    /// The client sent a message that breaks the protocol (e.g. a length beyond the cap).
    ClientProtocol(ProtocolError),
    /// The backend closed or failed; the client got whatever the backend said before.
    BackendGone,
    BackendProtocol(ProtocolError),
}

/// How the relay left the backend.
#[derive(Debug)]
pub struct RelayEnd {
    pub outcome: Outcome,
    /// Idle, at a message boundary, nothing outstanding: can be reused as is.
    pub backend_clean: bool,
    /// Nothing outstanding but a transaction is open: a ROLLBACK makes it clean.
    pub backend_rollbackable: bool,
    /// The client now depends on state that lives on this backend (a named prepared
    /// statement), so the backend must stay with it for the rest of the session.
    pub pins_session: bool,
}

#[derive(Debug)]
struct Tracker {
    /// ReadyForQuery messages the backend still owes.
    pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    status: TxStatus,
    /// A client chunk is being written to the backend.
    writing: bool,
    /// Partial bytes of a message were forwarded that the backend will never see the end of.
    poisoned: bool,
    request_at: Option<Instant>,
    /// Requests seen, added to the QueryRequests counters once, when the relay ends.
    requests: u64,
    /// The client created a named prepared statement: it lives on this backend only.
    pins_session: bool,
}

impl Tracker {
    fn settled(&self) -> bool {
        self.pending == 0 && !self.unsynced && !self.writing && !self.poisoned
    }
}

fn lock(t: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Relays one transaction (or more, if the client pipelines) between `client` and `backend`.
/// `desired` follows the client's own SET of reported parameters.
pub async fn relay(
    client: &mut ClientSide,
    backend: &mut BackendConn,
    desired: &mut Settings,
    metrics: &Metrics,
    max_message: usize,
) -> RelayEnd {
    // Both directions run in this one task; the Mutex and atomic are never contended, they only
    // make the shared state Send. No lock is held across an await.
    let tracker =
        Mutex::new(Tracker { pending: 0, unsynced: false, status: TxStatus::Idle, writing: false, poisoned: false, request_at: None, requests: 0, pins_session: false });
    let client_mid_message = AtomicBool::new(!client.scanner.at_boundary());
    let client_tls = client.stream.is_tls();
    let mut backend_scanner = MessageScanner::new(max_message);
    let ClientSide { stream: client_stream, buf: client_buf, scanner: client_scanner } = client;
    let (mut client_rd, mut client_wr) = client_stream.split();
    let BackendConn { stream: backend_stream, buf: backend_buf, applied, .. } = backend;
    let (mut backend_rd, mut backend_wr) = backend_stream.split();

    let client_to_backend = async {
        loop {
            if !client_buf.is_empty() {
                let mut forward_to = client_buf.len();
                let mut terminate = false;
                let mut requests = 0u64;
                {
                    let mut t = lock(&tracker);
                    let scanned = client_scanner.feed(client_buf, |tag| tag == frontend_tag::PARSE, |f| {
                        if terminate {
                            return;
                        }
                        match f.tag {
                            frontend_tag::QUERY | frontend_tag::FUNCTION_CALL => {
                                t.pending += 1;
                                requests += 1;
                            }
                            frontend_tag::SYNC => {
                                t.pending += 1;
                                t.unsynced = false;
                                requests += 1;
                            }
                            frontend_tag::PARSE => {
                                t.unsynced = true;
                                // A Parse body starts with the statement name; empty is unnamed.
                                if f.body.first().is_some_and(|&b| b != 0) {
                                    t.pins_session = true;
                                }
                            }
                            frontend_tag::BIND
                            | frontend_tag::DESCRIBE
                            | frontend_tag::EXECUTE
                            | frontend_tag::CLOSE
                            | frontend_tag::FLUSH => t.unsynced = true,
                            frontend_tag::TERMINATE => {
                                terminate = true;
                                match f.start {
                                    Some(start) => forward_to = start,
                                    None => {
                                        forward_to = 0;
                                        t.poisoned = true;
                                    }
                                }
                            }
                            _ => {}
                        }
                    });
                    if let Err(e) = scanned {
                        return Outcome::ClientProtocol(e);
                    }
                    t.writing = true;
                    t.requests += requests;
                    if requests > 0 && t.request_at.is_none() {
                        t.request_at = Some(Instant::now());
                    }
                }
                client_mid_message.store(!terminate && !client_scanner.at_boundary(), Ordering::Relaxed);
                if backend_wr.write_all(&client_buf[..forward_to]).await.is_err() || backend_wr.flush().await.is_err() {
                    return Outcome::BackendGone;
                }
                lock(&tracker).writing = false;
                client_buf.clear();
                if terminate {
                    return Outcome::ClientGone;
                }
            }
            match client_rd.read_buf(client_buf).await {
                Ok(0) | Err(_) => {
                    if client_mid_message.load(Ordering::Relaxed) {
                        lock(&tracker).poisoned = true;
                    }
                    return Outcome::ClientGone;
                }
                Ok(_) => {}
            }
        }
    };

    let backend_to_client = async {
        loop {
            match backend_rd.read_buf(backend_buf).await {
                Ok(0) | Err(_) => return Outcome::BackendGone,
                Ok(_) => {}
            }
            {
                let mut t = lock(&tracker);
                if let Some(at) = t.request_at.take() {
                    metrics.query_database_response_latency.record(at.elapsed().as_micros() as f64);
                }
                let mut bad_status = false;
                let scanned = backend_scanner.feed(
                    backend_buf,
                    |tag| tag == backend_tag::READY_FOR_QUERY || tag == backend_tag::PARAMETER_STATUS,
                    |f| match f.tag {
                        backend_tag::READY_FOR_QUERY => {
                            t.pending = t.pending.saturating_sub(1);
                            match f.body.first().copied().and_then(TxStatus::from_byte) {
                                Some(s) => t.status = s,
                                None => bad_status = true,
                            }
                        }
                        backend_tag::PARAMETER_STATUS => {
                            if let Ok((name, rest)) = read_cstr(f.body) {
                                if let Ok((value, _)) = read_cstr(rest) {
                                    if desired.track_reported(name, value) {
                                        applied.track_reported(name, value);
                                    }
                                }
                            }
                        }
                        _ => {}
                    },
                );
                if let Err(e) = scanned {
                    return Outcome::BackendProtocol(e);
                }
                if bad_status {
                    return Outcome::BackendProtocol(ProtocolError::Malformed("ReadyForQuery without a valid status"));
                }
            }
            if client_wr.write_all(backend_buf).await.is_err() || client_wr.flush().await.is_err() {
                backend_buf.clear();
                return Outcome::ClientGone;
            }
            backend_buf.clear();
            let t = lock(&tracker);
            if t.settled() && t.status == TxStatus::Idle && backend_scanner.at_boundary() && !client_mid_message.load(Ordering::Relaxed) {
                return Outcome::TransactionDone;
            }
        }
    };

    let outcome = tokio::select! {
        o = client_to_backend => o,
        o = backend_to_client => o,
    };
    let t = tracker.into_inner().unwrap_or_else(|p| p.into_inner());
    metrics.query_requests.increment(t.requests);
    if client_tls {
        metrics.query_requests_tls.increment(t.requests);
    } else {
        metrics.query_requests_no_tls.increment(t.requests);
    }
    let quiet = t.settled() && backend_scanner.at_boundary() && !client_mid_message.load(Ordering::Relaxed);
    RelayEnd {
        pins_session: t.pins_session,
        backend_clean: quiet && t.status == TxStatus::Idle && matches!(outcome, Outcome::TransactionDone | Outcome::ClientGone),
        backend_rollbackable: quiet && t.status != TxStatus::Idle && matches!(outcome, Outcome::ClientGone | Outcome::ClientProtocol(_)),
        outcome,
    }
}
