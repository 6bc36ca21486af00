//! rolegate: a PostgreSQL wire-protocol proxy that keeps app identities out of the schema
//! and every session in the owner role.
//!
//! A message's path: `listener` accepts → `session` runs the connection → `startup`
//! (TLS, StartupMessage, SCRAM) → `backend` (login role, `SET ROLE`) → `relay` (frames
//! each way; `policy` judges Query/Parse/FunctionCall). In transaction mode `session`
//! hands the client to `relay::pooled`, which borrows backend sessions from `pool`.

pub mod admin;
pub mod backend;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod provision;
pub mod proxy;
pub mod relay;
pub mod scram;
pub mod session;
pub mod sql;
pub mod startup;
pub mod tls;
pub mod wire;
