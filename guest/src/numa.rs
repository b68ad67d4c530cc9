//! The `numa` command: the NUMA topology the VMM describes in the ACPI SRAT and SLIT
//! ([`crate::acpi::find`]).

use ray_guest_abi::acpi_numa::{self as acpi, SratEntry};

use crate::acpi::find;

/// Most proximity domains the command prints.
const MAX_NODES: u32 = 256;

/// `numa nodes=N`, then per node `numa node=D cpus=... memory=BYTES ranges=...` and
/// `numa distances node=D d0,d1,...`; `numa nodes=1 srat=none` without an SRAT.
pub fn command() {
    let Some(srat) = find(b"SRAT") else {
        println!("numa nodes=1 srat=none");
        return;
    };
    let domain = |e: &SratEntry| match *e {
        SratEntry::Cpu { domain, .. } | SratEntry::Memory { domain, .. } => domain,
    };
    let nodes = acpi::srat_entries(srat)
        .map(|e| domain(&e) + 1)
        .max()
        .unwrap_or(0);
    let nodes = nodes.min(MAX_NODES);
    println!("numa nodes={nodes}");
    for d in 0..nodes {
        crate::serial::print_fmt(format_args!("numa node={d} cpus="));
        let mut first = true;
        for e in acpi::srat_entries(srat) {
            if let SratEntry::Cpu { apic_id, domain } = e {
                if domain == d {
                    let sep = if first { "" } else { "," };
                    crate::serial::print_fmt(format_args!("{sep}{apic_id}"));
                    first = false;
                }
            }
        }
        let memory: u64 = acpi::srat_entries(srat)
            .filter_map(|e| match e {
                SratEntry::Memory { domain, len, .. } if domain == d => Some(len),
                _ => None,
            })
            .sum();
        crate::serial::print_fmt(format_args!(" memory={memory} ranges="));
        let mut first = true;
        for e in acpi::srat_entries(srat) {
            if let SratEntry::Memory { domain, base, len } = e {
                if domain == d {
                    let sep = if first { "" } else { "," };
                    crate::serial::print_fmt(format_args!("{sep}{base:#x}-{:#x}", base + len));
                    first = false;
                }
            }
        }
        crate::serial::write_str("\n");
    }
    let Some(slit) = find(b"SLIT") else {
        println!("numa distances none");
        return;
    };
    let n = acpi::slit_localities(slit).min(u64::from(MAX_NODES));
    for from in 0..n {
        crate::serial::print_fmt(format_args!("numa distances node={from} "));
        for to in 0..n {
            let sep = if to == 0 { "" } else { "," };
            let d = acpi::slit_distance(slit, from, to).unwrap_or(0);
            crate::serial::print_fmt(format_args!("{sep}{d}"));
        }
        crate::serial::write_str("\n");
    }
}
