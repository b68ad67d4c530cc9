//! ACPI tables: how Linux learns the CPUs (MADT), the interrupt controllers, where PCI
//! configuration space is mapped (MCFG) and how to power off (FADT PM1a control +
//! `\_S5_`). Written by hand: they are a few hundred bytes whose every field is chosen
//! here.
//!
//! ```text
//! 0xe0000 RSDP ─▶ 0xe0040 XSDT ─┬─▶ 0xe0100 FADT ─▶ 0xe0300 DSDT (\_S5_)
//!                               ├─▶ 0xe0400 MADT (LAPIC per vCPU, IOAPIC, overrides)
//!                               ├─▶ 0xe0380 MCFG (the PCI ECAM window: segment 0, bus 0)
//!                               ├─▶ 0xe1000 SRAT (guest NUMA: node of each CPU and range)
//!                               └─▶ 0xe3000 SLIT (distances between nodes)
//! ```
//!
//! The SRAT and SLIT are written only for a VM with guest NUMA nodes.
use ray_guest_abi::POWEROFF_PORT;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{ACPI_TABLES, ACPI_TABLES_END, IOAPIC, LAPIC, PCI_ECAM, PCI_ECAM_BUSES};
use super::BootError;
use crate::memory::GuestMem;
use crate::numa::GuestNuma;

pub const RSDP: u64 = ACPI_TABLES;
const XSDT: u64 = ACPI_TABLES + 0x40;
const FADT: u64 = ACPI_TABLES + 0x100;
const DSDT: u64 = ACPI_TABLES + 0x300;
const MCFG: u64 = ACPI_TABLES + 0x380;
const MADT: u64 = ACPI_TABLES + 0x400;
const SRAT: u64 = ACPI_TABLES + 0x1000;
const SLIT: u64 = ACPI_TABLES + 0x3000;
/// PM1a event block; the control block ([`POWEROFF_PORT`]) follows it.
const PM1A_EVT: u16 = 0x600;
const SCI_IRQ: u16 = 9;

const OEM_ID: &[u8; 6] = b"RAYVSR";
const OEM_TABLE_ID: &[u8; 8] = b"RAYVISOR";
const CREATOR_ID: &[u8; 4] = b"RAYV";

const _: () = assert!(XSDT >= RSDP + 36);
const _: () = assert!(DSDT >= FADT + 276);
const _: () = assert!(MCFG + MCFG_LEN <= MADT);

/// Bytes that sum to zero over the whole table.
fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// A system description table: the 36-byte header, then the body.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Sdt {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(signature);
        b.extend_from_slice(&0u32.to_le_bytes()); // length, set in finish
        b.push(revision);
        b.push(0); // checksum, set in finish
        b.extend_from_slice(OEM_ID);
        b.extend_from_slice(OEM_TABLE_ID);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(CREATOR_ID);
        b.extend_from_slice(&1u32.to_le_bytes());
        Sdt(b)
    }

    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A Generic Address Structure in system I/O space.
    fn io_gas(&mut self, port: u16, bits: u8) -> &mut Self {
        let access = if bits >= 32 {
            3
        } else if bits >= 16 {
            2
        } else {
            1
        };
        self.u8(1).u8(bits).u8(0).u8(access).u64(u64::from(port))
    }
    fn pad_to(&mut self, len: usize) -> &mut Self {
        self.0.resize(len, 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = 0;
        self.0[9] = checksum(&self.0);
        self.0
    }
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(36);
    b.extend_from_slice(b"RSD PTR ");
    b.push(0); // checksum of the first 20 bytes
    b.extend_from_slice(OEM_ID);
    b.push(2); // revision: ACPI 2.0+, XSDT present
    b.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    b.extend_from_slice(&36u32.to_le_bytes());
    b.extend_from_slice(&xsdt.to_le_bytes());
    b.push(0); // extended checksum
    b.extend_from_slice(&[0; 3]);
    b[8] = checksum(&b[..20]);
    b[32] = checksum(&b);
    b
}

fn fadt() -> Vec<u8> {
    const WBINVD: u32 = 1 << 0;
    const PROC_C1: u32 = 1 << 2;
    const PWR_BUTTON_IS_CONTROL_METHOD: u32 = 1 << 4;
    const SLP_BUTTON_IS_CONTROL_METHOD: u32 = 1 << 5;
    // IAPC_BOOT_ARCH: no VGA, no CMOS RTC (the VMM has none: kvmclock gives the wall
    // clock); the 8042 bit is left clear, so Linux doesn't probe a keyboard controller
    // through costly port exits (the VMM still takes the i8042 reset write).
    const VGA_NOT_PRESENT: u16 = 1 << 2;
    const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
    let mut t = Sdt::new(b"FACP", 6);
    t.u32(0) // FIRMWARE_CTRL: no FACS (no firmware waking vectors)
        .u32(DSDT as u32)
        .u8(0)
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ)
        .u32(0) // SMI_CMD 0: ACPI mode is always on
        .bytes(&[0; 4]) // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        .u32(u32::from(PM1A_EVT))
        .u32(0)
        .u32(u32::from(POWEROFF_PORT)) // PM1a_CNT_BLK
        .u32(0)
        .u32(0) // PM2_CNT_BLK
        .u32(0) // PM_TMR_BLK: none
        .u32(0)
        .u32(0) // GPE0/1
        .u8(4) // PM1_EVT_LEN
        .u8(2) // PM1_CNT_LEN
        .bytes(&[0; 6]) // PM2_CNT_LEN, PM_TMR_LEN, GPE0/1 lengths, GPE1_BASE, CST_CNT
        .u16(101) // P_LVL2_LAT > 100: C2 unsupported
        .u16(1001) // P_LVL3_LAT > 1000: C3 unsupported
        .u16(0)
        .u16(0) // FLUSH_SIZE, FLUSH_STRIDE
        .bytes(&[0; 5]) // DUTY_*, alarms, CENTURY
        .u16(VGA_NOT_PRESENT | CMOS_RTC_NOT_PRESENT) // IAPC_BOOT_ARCH
        .u8(0)
        .u32(WBINVD | PROC_C1 | PWR_BUTTON_IS_CONTROL_METHOD | SLP_BUTTON_IS_CONTROL_METHOD)
        .bytes(&[0; 12]) // RESET_REG: none
        .u8(0) // RESET_VALUE
        .u16(0) // ARM_BOOT_ARCH
        .u8(5) // FADT minor version (ACPI 6.5)
        .u64(0) // X_FIRMWARE_CTRL
        .u64(DSDT)
        .io_gas(PM1A_EVT, 32) // X_PM1a_EVT_BLK
        .bytes(&[0; 12])
        .io_gas(POWEROFF_PORT, 16) // X_PM1a_CNT_BLK
        .pad_to(276);
    t.finish()
}

/// `Name (\_S5_, Package () { 5, 5, 0, 0 })`: S5 is SLP_TYP 5, the value the guest ABI's
/// power-off write carries.
const S5_AML: [u8; 14] = [
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
];

fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(&S5_AML);
    t.finish()
}

/// The MADT of `vcpus` CPUs: vCPU `i` has APIC ID `i` (and ACPI processor UID `i`), the
/// I/O APIC has ID `vcpus`.
///
/// **xAPIC or x2APIC entries:** ACPI (6.5, 5.2.12.12) wants a Processor Local APIC entry
/// (type 0) for every APIC ID below 255, whether the CPU runs in xAPIC or x2APIC mode, and a
/// Processor Local x2APIC entry (type 9) only for IDs of 255 and above. This VMM's limit
/// ([`super::MAX_VCPUS`] = 254, IDs 0..=253) keeps every vCPU, and the I/O APIC's ID, below
/// 255, so this MADT holds type-0 entries only; [`madt_for`] would switch to type-9 entries
/// (and add the x2APIC NMI entry) for larger IDs instead of truncating them.
fn madt(vcpus: u8) -> Vec<u8> {
    madt_for(0..u32::from(vcpus), vcpus)
}

/// The MADT for CPUs with APIC IDs `ids` and an I/O APIC with ID `ioapic_id`.
fn madt_for(ids: std::ops::Range<u32>, ioapic_id: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    const ENABLED: u32 = 1;
    const LINT1: u8 = 1;
    let mut t = Sdt::new(b"APIC", 5);
    t.u32(LAPIC as u32).u32(PCAT_COMPAT);
    let mut x2apic = false;
    for id in ids {
        match u8::try_from(id) {
            // Processor Local APIC: UID, APIC ID, flags.
            Ok(id8) if id8 != 0xff => t.u8(0).u8(8).u8(id8).u8(id8).u32(ENABLED),
            // Processor Local x2APIC: reserved, x2APIC ID, flags, UID.
            _ => {
                x2apic = true;
                t.u8(9).u8(16).u16(0).u32(id).u32(ENABLED).u32(id)
            }
        };
    }
    // I/O APIC with GSIs from 0.
    t.u8(1).u8(12).u8(ioapic_id).u8(0).u32(IOAPIC as u32).u32(0);
    // ISA IRQ 0 (PIT) arrives on GSI 2, as on every PC.
    t.u8(2).u8(10).u8(0).u8(0).u32(2).u16(0);
    // The SCI: level-triggered, active high.
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(SCI_IRQ as u8)
        .u32(u32::from(SCI_IRQ))
        .u16(0b1101);
    // NMI on LINT1 of every CPU (UID 0xff: all processors).
    t.u8(4).u8(6).u8(0xff).u16(0).u8(LINT1);
    if x2apic {
        // The same for the CPUs of type-9 entries (UID 0xffffffff: all processors).
        t.u8(0xa)
            .u8(12)
            .u16(0)
            .u32(u32::MAX)
            .u8(LINT1)
            .bytes(&[0; 3]);
    }
    t.finish()
}

/// Length of the MCFG: header, 8 reserved bytes, one 16-byte allocation.
const MCFG_LEN: u64 = 36 + 8 + 16;

/// The MCFG: one configuration space allocation, for PCI segment 0, buses
/// `0..=end_bus` of the ECAM window at `base` (bus 0's address).
fn mcfg(base: u64, end_bus: u8) -> Vec<u8> {
    let mut t = Sdt::new(b"MCFG", 1);
    t.u64(0); // reserved
    t.u64(base).u16(0).u8(0).u8(end_bus).u32(0);
    t.finish()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for e in entries {
        t.u64(*e);
    }
    t.finish()
}

/// The SRAT of `numa`: each vCPU's node (by APIC ID = vCPU index), each node's memory
/// ranges. Proximity domain = guest node id.
fn srat(numa: &GuestNuma) -> Vec<u8> {
    const ENABLED: u32 = 1;
    let mut t = Sdt::new(b"SRAT", 3);
    t.u32(1).u64(0); // reserved (1 for compatibility), reserved
    for n in &numa.nodes {
        let d = n.id.to_le_bytes();
        for &cpu in &n.cpus {
            // Processor Local APIC affinity: domain 7:0, APIC ID, flags, SAPIC EID,
            // domain 31:8, clock domain.
            t.u8(0).u8(16).u8(d[0]).u8(cpu).u32(ENABLED).u8(0);
            t.bytes(&d[1..4]).u32(0);
        }
    }
    for (gpa, len, node) in numa.regions() {
        // Memory affinity: domain, reserved, base, length, reserved, flags, reserved.
        t.u8(1).u8(40).u32(numa.nodes[node].id).u16(0);
        t.u64(gpa.0).u64(len as u64).u32(0).u32(ENABLED).u64(0);
    }
    t.finish()
}

/// The SLIT of `numa`: distances between its nodes, row by row.
fn slit(numa: &GuestNuma) -> Vec<u8> {
    let mut t = Sdt::new(b"SLIT", 1);
    t.u64(numa.distances.len() as u64);
    for row in &numa.distances {
        t.bytes(row);
    }
    t.finish()
}

/// Writes every table for `vcpus` CPUs (and `numa`'s nodes); returns the RSDP's address
/// (for the zero page's `acpi_rsdp_addr`; kernels that scan 0xe0000..0x100000 for it find
/// it there too).
pub fn write_acpi_tables(
    mem: &GuestMem,
    vcpus: u8,
    numa: Option<&GuestNuma>,
) -> Result<GuestAddress, BootError> {
    let mut entries = vec![FADT, MADT, MCFG];
    let mut tables = vec![
        (FADT, fadt()),
        (DSDT, dsdt()),
        (MADT, madt(vcpus)),
        (MCFG, mcfg(PCI_ECAM, (PCI_ECAM_BUSES - 1) as u8)),
    ];
    if let Some(numa) = numa {
        entries.extend([SRAT, SLIT]);
        tables.extend([(SRAT, srat(numa)), (SLIT, slit(numa))]);
    }
    tables.extend([(RSDP, rsdp(XSDT)), (XSDT, xsdt(&entries))]);
    let mut end_of_previous = 0;
    tables.sort_by_key(|t| t.0);
    for (addr, bytes) in tables {
        // Tables must not overlap (the SRAT of many vCPUs and nodes is the largest).
        if addr < end_of_previous {
            return Err(BootError::Write {
                what: "ACPI tables (they overlap)",
                addr,
            });
        }
        end_of_previous = addr + bytes.len() as u64;
        // The e820 map reserves only up to 1 MiB for firmware tables.
        if addr + bytes.len() as u64 > ACPI_TABLES_END {
            return Err(BootError::Write {
                what: "ACPI tables",
                addr,
            });
        }
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|_| BootError::Write {
                what: "ACPI tables",
                addr,
            })?;
    }
    Ok(GuestAddress(RSDP))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x)) == 0
    }

    #[test]
    fn checksums_and_lengths_are_right() {
        let r = rsdp(XSDT);
        assert_eq!(r.len(), 36);
        assert!(sums_to_zero(&r[..20]));
        assert!(sums_to_zero(&r));
        for t in [
            xsdt(&[FADT, MADT, MCFG]),
            fadt(),
            dsdt(),
            madt(4),
            mcfg(PCI_ECAM, 0),
        ] {
            assert!(sums_to_zero(&t), "{:?}", &t[..4]);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
        }
        assert_eq!(fadt().len(), 276);
        assert_eq!(mcfg(PCI_ECAM, 0).len() as u64, MCFG_LEN);
    }

    /// The (type, APIC ID, UID, enabled) of every processor entry of a MADT, after
    /// checking that its entries tile it.
    fn madt_cpus(t: &[u8]) -> Vec<(u8, u32, u32, bool)> {
        let mut at = 44;
        let mut cpus = Vec::new();
        while at < t.len() {
            let (kind, len) = (t[at], t[at + 1] as usize);
            let u32_at = |o: usize| u32::from_le_bytes(t[at + o..at + o + 4].try_into().unwrap());
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    cpus.push((0, t[at + 3].into(), t[at + 2].into(), t[at + 4] & 1 == 1));
                }
                9 => {
                    assert_eq!(len, 16);
                    cpus.push((9, u32_at(4), u32_at(12), u32_at(8) & 1 == 1));
                }
                _ => {}
            }
            at += len;
        }
        assert_eq!(at, t.len(), "entries tile the table");
        cpus
    }

    #[test]
    fn madt_lists_one_enabled_lapic_per_vcpu() {
        for vcpus in [1u8, 4, 64, 70, super::super::MAX_VCPUS] {
            let t = madt(vcpus);
            assert!(sums_to_zero(&t));
            let want: Vec<_> = (0..u32::from(vcpus)).map(|i| (0, i, i, true)).collect();
            assert_eq!(madt_cpus(&t), want, "xAPIC entries, APIC ids 0..n");
        }
    }

    #[test]
    fn apic_ids_from_255_get_x2apic_entries_and_an_x2apic_nmi() {
        // Not reachable with MAX_VCPUS = 254; here so a larger limit never truncates IDs.
        let t = madt_for(253..258, 0);
        assert!(sums_to_zero(&t));
        assert_eq!(
            madt_cpus(&t),
            vec![
                (0, 253, 253, true),
                (0, 254, 254, true),
                (9, 255, 255, true),
                (9, 256, 256, true),
                (9, 257, 257, true),
            ]
        );
        let nmi = |t: &[u8]| {
            let mut at = 44;
            let mut found = Vec::new();
            while at < t.len() {
                if t[at] == 0xa {
                    found.push(t[at..at + 12].to_vec());
                }
                at += t[at + 1] as usize;
            }
            found
        };
        assert_eq!(
            nmi(&t),
            vec![vec![0xa, 12, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]]
        );
        assert!(nmi(&madt(super::super::MAX_VCPUS)).is_empty());
    }

    #[test]
    fn fadt_points_at_the_dsdt_and_the_poweroff_port() {
        let t = fadt();
        assert_eq!(
            u32::from_le_bytes(t[40..44].try_into().unwrap()),
            DSDT as u32
        );
        assert_eq!(
            u32::from_le_bytes(t[64..68].try_into().unwrap()),
            u32::from(POWEROFF_PORT)
        );
        assert_eq!(u64::from_le_bytes(t[140..148].try_into().unwrap()), DSDT);
        let boot_arch = u16::from_le_bytes([t[109], t[110]]);
        assert_eq!(boot_arch & (1 << 1), 0, "no 8042 to probe");
        assert_ne!(boot_arch & (1 << 5), 0, "no CMOS RTC");
        assert_eq!(t[88..90], [4, 2], "PM1 event and control block lengths");
        let flags = u32::from_le_bytes(t[112..116].try_into().unwrap());
        assert_eq!(
            flags & (1 << 20),
            0,
            "not hardware-reduced: PM1a control is used"
        );
        assert_eq!(
            u64::from_le_bytes(t[176..184].try_into().unwrap()),
            u64::from(POWEROFF_PORT)
        );
    }

    /// Reads a table from guest memory by the length in its header.
    fn table_at(mem: &GuestMem, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut t = vec![0u8; len as usize];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn the_tables_in_guest_memory_chain_from_the_rsdp() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        let rsdp_addr = write_acpi_tables(&mem, 2, None).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(0xe0000));
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp_addr).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(r[15], 2, "revision");
        assert!(sums_to_zero(&r[..20]) && sums_to_zero(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let x = table_at(&mem, xsdt_addr);
        assert_eq!(&x[..4], b"XSDT");
        assert!(sums_to_zero(&x));
        let mut found = Vec::new();
        for entry in x[36..].chunks_exact(8) {
            let t = table_at(&mem, u64::from_le_bytes(entry.try_into().unwrap()));
            assert!(sums_to_zero(&t), "{:?}", &t[..4]);
            found.push(t[..4].to_vec());
            if &t[..4] == b"FACP" {
                let d = table_at(&mem, u64::from_le_bytes(t[140..148].try_into().unwrap()));
                assert_eq!(&d[..4], b"DSDT");
                assert!(sums_to_zero(&d));
                assert!(d.windows(4).any(|w| w == b"_S5_"));
            }
        }
        assert_eq!(
            found,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
    }

    #[test]
    fn the_madt_has_the_ioapic_after_the_cpus_and_irq0_on_gsi2() {
        let t = madt(4);
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let mut at = 44;
        let (mut ioapic, mut irq0) = (None, None);
        while at < t.len() {
            match t[at] {
                1 => {
                    ioapic = Some((
                        t[at + 2],
                        u32::from_le_bytes(t[at + 4..at + 8].try_into().unwrap()),
                        u32::from_le_bytes(t[at + 8..at + 12].try_into().unwrap()),
                    ))
                }
                2 if t[at + 3] == 0 => {
                    irq0 = Some(u32::from_le_bytes(t[at + 4..at + 8].try_into().unwrap()))
                }
                _ => {}
            }
            at += t[at + 1] as usize;
        }
        assert_eq!(
            ioapic,
            Some((4, 0xfec0_0000, 0)),
            "id = vcpus, address, GSI base"
        );
        assert_eq!(irq0, Some(2));
    }

    fn numa(vcpus: u8, nodes: u32, distance: u8) -> GuestNuma {
        let per = u64::from(vcpus).div_ceil(u64::from(nodes));
        let nodes: Vec<crate::numa::GuestNode> = (0..nodes)
            .map(|id| crate::numa::GuestNode {
                id,
                cpus: (0..vcpus)
                    .filter(|&c| u64::from(c) / per == u64::from(id))
                    .collect(),
                memory_bytes: 64 << 20,
                host_nodes: vec![],
                policy: ray_api::vmm::NumaPolicy::Bind,
                host_cpus: vec![],
            })
            .collect();
        let n = nodes.len();
        GuestNuma {
            distances: (0..n)
                .map(|i| (0..n).map(|j| if i == j { 10 } else { distance }).collect())
                .collect(),
            nodes,
        }
    }

    #[test]
    fn srat_and_slit_read_back_with_the_guests_parser() {
        use ray_guest_abi::acpi_numa::{self as g, SratEntry};
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        let n = numa(4, 2, 21);
        write_acpi_tables(&mem, 4, Some(&n)).unwrap();
        let x = table_at(&mem, XSDT);
        let found: Vec<u64> = g::xsdt_entries(&x).collect();
        assert_eq!(found, vec![FADT, MADT, MCFG, SRAT, SLIT]);
        let s = table_at(&mem, SRAT);
        assert!(g::table_ok(&s, b"SRAT"));
        let entries: Vec<SratEntry> = g::srat_entries(&s).collect();
        assert_eq!(
            entries,
            vec![
                SratEntry::Cpu {
                    apic_id: 0,
                    domain: 0
                },
                SratEntry::Cpu {
                    apic_id: 1,
                    domain: 0
                },
                SratEntry::Cpu {
                    apic_id: 2,
                    domain: 1
                },
                SratEntry::Cpu {
                    apic_id: 3,
                    domain: 1
                },
                SratEntry::Memory {
                    domain: 0,
                    base: 0,
                    len: 64 << 20
                },
                SratEntry::Memory {
                    domain: 1,
                    base: 64 << 20,
                    len: 64 << 20
                },
            ]
        );
        let l = table_at(&mem, SLIT);
        assert!(g::table_ok(&l, b"SLIT"));
        assert_eq!(g::slit_localities(&l), 2);
        assert_eq!(g::slit_distance(&l, 0, 1), Some(21));
        assert_eq!(g::slit_distance(&l, 1, 1), Some(10));
        assert_eq!(g::slit_distance(&l, 2, 0), None);
    }

    #[test]
    fn the_mcfg_describes_the_ecam_window_the_e820_map_reserves() {
        use ray_guest_abi::acpi_mcfg::{self, McfgEntry};
        use ray_guest_abi::acpi_numa as g;
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        write_acpi_tables(&mem, 2, None).unwrap();
        let x = table_at(&mem, XSDT);
        let at = g::xsdt_entries(&x)
            .find(|&a| table_at(&mem, a)[..4] == *b"MCFG")
            .expect("the XSDT lists an MCFG");
        let t = table_at(&mem, at);
        assert!(g::table_ok(&t, b"MCFG"), "signature, length and checksum");
        assert_eq!(t[8], 1, "revision");
        let window = McfgEntry {
            base: PCI_ECAM,
            segment: 0,
            start_bus: 0,
            end_bus: (PCI_ECAM_BUSES - 1) as u8,
        };
        assert_eq!(
            acpi_mcfg::mcfg_entries(&t).collect::<Vec<_>>(),
            vec![window]
        );
        assert_eq!(acpi_mcfg::segment0_bus0(&t), Some(window));
        // Linux takes the window only if the firmware reserved all of it.
        let size = u64::from(window.end_bus - window.start_bus + 1) << 20;
        for mem_bytes in [32 << 20, 3 << 30, 5 << 30] {
            let map = super::super::layout::e820(mem_bytes);
            assert!(
                map.iter().any(
                    |&(start, len, kind)| kind == super::super::layout::E820_RESERVED
                        && start <= window.base
                        && window.base + size <= start + len
                ),
                "{map:x?}"
            );
        }
        // ... and it lies in the MMIO hole, clear of the BARs and the interrupt controllers.
        assert!(window.base >= crate::pci::BAR_WINDOW_END && window.base + size <= IOAPIC);
    }

    #[test]
    fn the_largest_numa_tables_fit_without_overlapping() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        let most = numa(
            super::super::MAX_VCPUS,
            crate::numa::MAX_GUEST_NODES as u32,
            20,
        );
        write_acpi_tables(&mem, super::super::MAX_VCPUS, Some(&most)).unwrap();
        assert!(SRAT >= MADT + madt(super::super::MAX_VCPUS).len() as u64);
        assert!(SLIT >= SRAT + srat(&most).len() as u64);
        assert!(SLIT + slit(&most).len() as u64 <= ACPI_TABLES_END);
    }

    #[test]
    fn tables_fit_below_one_mib_without_overlapping() {
        assert!(FADT >= XSDT + xsdt(&[FADT, MADT, MCFG, SRAT, SLIT]).len() as u64);
        assert!(MCFG >= DSDT + dsdt().len() as u64);
        assert!(MADT >= MCFG + mcfg(PCI_ECAM, 0xff).len() as u64);
        assert!(MADT + madt(super::super::MAX_VCPUS).len() as u64 <= 0x10_0000);
    }
}
