//! kaguard: a reverse proxy whose upstream pool does not lose the keep-alive race.
//!
//! Modules in request order:
//! - [`config`]: the TOML file and the command line -> a validated, typed [`config::Config`].
//! - [`route`]: host and path prefix -> upstream group.
//! - [`balance`]: which server of the group takes a try (round robin, least_conn, p2c).
//! - [`health`]: whether a server may take tries: nginx's max_fails, active checks.
//! - [`resolve`]: server names to addresses, again and again, for servers DNS moves.
//! - [`tools`]: `kaguard upstream` and the other helper subcommands.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod clock;
pub mod config;
pub mod downstream;
pub mod error;
pub mod health;
pub mod hop;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod resolve;
pub mod retry;
pub mod reuse;
pub mod route;
pub mod server;
pub mod tools;
pub mod upstream;
pub mod wire;
pub mod worker;
