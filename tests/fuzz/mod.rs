//! The differential fuzzer of transaction pooling (issue 20): eight clients run seeded
//! random programs over a grammar of the protocol, at once, through rolegate; each
//! client's transcript (every message it receives, as text) must equal the transcript of
//! the same program on a private direct session to PostgreSQL in the same role.
//! Normalised only for what a pooler may change: process ids and cancel keys (not
//! recorded), notification timing (compared as a sorted list), the order of
//! ParameterStatus messages and ParameterStatus that repeat the value the client has.

pub mod client;
pub mod grammar;
pub mod runner;
