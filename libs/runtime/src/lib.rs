//! What every lmforge service shares between its `main` and its domain code.
//!
//! - [`args`]: the flags shared by several services (Postgres, NATS, timeouts, peers).
//! - [`listeners`]: binding the gRPC and admin ports, with errors that name the setting.
//! - [`postgres`] and [`nats`]: validated, bounded-wait connections to the dependencies, a
//!   Postgres schema per service with its own migrations.
//! - [`probes`]: periodic dependency checks feeding both `/readyz` and `grpc.health.v1`.
//! - [`server`]: tonic server assembly (tracing, metrics, health, reflection) and the
//!   serve-until-shutdown loop with a bounded drain.
//! - [`shutdown`]: SIGTERM / Ctrl-C.
//! - [`main_entry`]: the whole of a service binary's `main`.

pub mod args;
pub mod error;
pub mod listeners;
pub mod main_entry;
pub mod nats;
pub mod postgres;
pub mod probes;
pub mod server;
pub mod shutdown;

pub use error::StartupError;
pub use listeners::Listeners;
