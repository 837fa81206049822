//! kaguard: a reverse proxy whose upstream pool does not lose the keep-alive race.
//!
//! Modules in request order:
//! - [`config`]: the TOML file and the command line -> a validated, typed [`config::Config`].
//! - [`route`]: host and path prefix -> upstream group.
//! - [`tools`]: `kaguard upstream` and the other helper subcommands.

pub mod config;
pub mod route;
pub mod tools;
