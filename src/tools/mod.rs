//! Subcommands that help diagnose keep-alive problems, with or without kaguard in the path.

pub mod audit;
pub mod demo;
pub mod probe;
pub mod race;
pub mod target;
pub mod upstream;
