//! What the relay knows of the transaction it carries: the requests the backend still owes
//! an answer, extended-protocol messages not yet synced, the status of the last ReadyForQuery,
//! and what the client's SQL leaves on the backend beyond the transaction
//! ([`super::session_state`]). Fed message by message by both of the relay's paths.

use std::time::Instant;

use super::SQL_READ_LIMIT;
use super::session_state::{self, PinReason};
use crate::protocol::{TxStatus, frontend_tag};

/// What the relay has seen of the transaction so far.
#[derive(Debug)]
pub(super) struct Tracker {
    /// ReadyForQuery messages the backend still owes.
    pub(super) pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub(super) unsynced: bool,
    pub(super) status: TxStatus,
    /// Partial bytes of a message were forwarded that the backend will never see the end of.
    pub(super) poisoned: bool,
    pub(super) request_at: Option<Instant>,
    /// Requests seen, added to the QueryRequests counters once, when the relay ends.
    pub(super) requests: u64,
    /// The client created state that lives on this backend only (the first reason seen).
    pub(super) pins_session: Option<PinReason>,
    /// Whether a SET the proxy does not follow pins (`PoolConfig::pin_variable_sets`).
    pub(super) pin_variable_sets: bool,
    /// Parameters set so far (see `RelayEnd::sets`).
    pub(super) sets: Vec<String>,
    /// A `RESET ALL` was sent (see `RelayEnd::resets_all`).
    pub(super) resets_all: bool,
    /// After a `RESET ALL`: what was set after the last one (see `RelayEnd::after_reset`).
    pub(super) after_reset: Vec<String>,
    /// A Query dropped prepared statements ([`session_state::SessionEffects::drops_statements`])
    /// that the relay has not yet forgotten.
    pub(super) drops_statements: bool,
    /// The client's stream is inside a message (what was forwarded ends mid-message).
    pub(super) client_mid_message: bool,
    /// What was forwarded ends with a whole request the backend answers (Query, Sync,
    /// FunctionCall): the client now waits, and so may the relay, on the backend alone.
    pub(super) awaits_reply: bool,
    /// The backend started a COPY from the client and waits for its data (it ignores a Sync
    /// meanwhile): the relay never waits on the backend alone then.
    pub(super) copy_in: bool,
    /// The Query just booked is one statement that resets the session's settings (`RESET
    /// ALL`, `DISCARD ALL`), sent with nothing else in flight outside a transaction block: what
    /// the client sent after it waits for its answer, the next ReadyForQuery (see
    /// `Relay::reset_hold`).
    pub(super) reset_cut: bool,
}

impl Tracker {
    /// Books a client message (`body`: as far as the scanner copied it): what the backend will
    /// owe for it, and what its SQL leaves behind. `tracked`: a named Parse is rewritten, not
    /// pinned. Returns whether it is a request (answered by ReadyForQuery).
    pub(super) fn client_message(&mut self, tag: u8, body: &[u8], tracked: bool) -> bool {
        match tag {
            frontend_tag::QUERY => self.client_query(body, None),
            frontend_tag::FUNCTION_CALL => {
                self.pending += 1;
                true
            }
            frontend_tag::SYNC => {
                self.pending += 1;
                self.unsynced = false;
                true
            }
            frontend_tag::PARSE => {
                self.unsynced = true;
                if self.pins_session.is_none() {
                    // A Parse body starts with the statement name (empty: unnamed), then the SQL.
                    let after_name = body.iter().position(|&b| b == 0).map(|nul| (nul, &body[nul + 1..]));
                    match after_name {
                        Some((0, rest)) => self.read_parse_sql(rest.split(|&b| b == 0).next().unwrap_or_default()),
                        Some((_, rest)) if tracked => match rest.split(|&b| b == 0).next() {
                            Some(sql) if sql.len() <= SQL_READ_LIMIT => self.read_parse_sql(sql),
                            _ => self.pins_session = Some(PinReason::Unread),
                        },
                        Some(_) => self.pins_session = Some(PinReason::NamedStatement),
                        // Not copied (longer than SQL_READ_LIMIT), or malformed.
                        None => self.pins_session = Some(PinReason::Unread),
                    }
                }
                false
            }
            frontend_tag::BIND | frontend_tag::DESCRIBE | frontend_tag::EXECUTE | frontend_tag::CLOSE | frontend_tag::FLUSH => {
                self.unsynced = true;
                false
            }
            _ => false,
        }
    }

    /// Books a Query (`body` as for [`Self::client_message`]); `looked`: what the first look
    /// ([`session_state::may_pin`]) already said of its SQL, if it was taken.
    pub(super) fn client_query(&mut self, body: &[u8], looked: Option<bool>) -> bool {
        let in_block = self.in_block();
        let alone = self.pending == 0 && !self.unsynced && !in_block;
        self.pending += 1;
        if self.pins_session.is_none() {
            match body.split_last() {
                // The SQL runs to the NUL that ends the body.
                Some((0, sql)) => {
                    let may = looked.unwrap_or_else(|| session_state::may_pin(sql));
                    let effects = session_state::session_effects_looked(sql, self.pin_variable_sets, may).discard_all_judged(in_block);
                    self.reset_cut = effects.resets_all && effects.single && alone;
                    self.note_effects(&effects);
                }
                // Malformed: the database refuses it.
                Some(_) => {}
                // Not copied: longer than SQL_READ_LIMIT.
                None => self.pins_session = Some(PinReason::Unread),
            }
        }
        true
    }

    /// Whether a Query booked now is known to start inside a transaction block: nothing sent
    /// since the last ReadyForQuery is unanswered, and it said so.
    pub(super) fn in_block(&self) -> bool {
        self.pending == 0 && !self.unsynced && self.status != TxStatus::Idle
    }

    /// The client's Terminate, at `start` in its chunk (`None`: it began in an earlier chunk,
    /// part of it already forwarded): where the chunk's bytes for the backend end.
    pub(super) fn terminate_at(&mut self, start: Option<usize>) -> usize {
        start.unwrap_or_else(|| {
            self.poisoned = true;
            0
        })
    }

    /// Notes what a Parse's statement text leaves on the backend beyond the transaction.
    pub(super) fn read_parse_sql(&mut self, sql: &[u8]) {
        let effects = session_state::parse_effects(sql, self.pin_variable_sets);
        self.note_effects(&effects);
    }

    /// Notes what running a statement does to the session.
    pub(super) fn note_effects(&mut self, effects: &session_state::SessionEffects) {
        self.pins_session = self.pins_session.or(effects.pin);
        self.drops_statements |= effects.drops_statements;
        for name in &effects.sets {
            session_state::push_capped(&mut self.sets, name);
        }
        if effects.resets_all {
            self.after_reset.clear();
            self.resets_all = true;
        }
        if self.resets_all {
            for name in &effects.after_reset {
                session_state::push_capped(&mut self.after_reset, name);
            }
        }
    }
}

