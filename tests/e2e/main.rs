//! End-to-end tests: the real `ray` binary, real KVM, rayvisor's own guest.
//! Build first: `cargo build --workspace` (the scripts/test command does).
mod api;
mod blk;
mod boot;
mod cluster;
mod devices;
mod display;
mod encode;
mod input;
mod lifecycle;
mod limits;
mod linux;
mod migration;
mod migration_wire;
mod net;
mod numa;
mod numa_attribution;
mod operator;
mod robustness;
mod security;
mod shell;
mod sim;
mod snapshot;
mod vhost;
mod vnc;
mod vsock;
mod web;
