//! The library half of the `ray` binary: what the CLI and the end-to-end test harness
//! share (the per-VM API client, the runtime directory, exit codes, size parsing, output formats).
pub mod client;
pub mod disks;
pub mod exit;
pub mod jail;
pub mod netns;
pub mod numa;
pub mod output;
pub mod runtime;
pub mod sizes;
