//! The ACPI tables the VMM wrote, found from the RSDP the zero page points at. They lie
//! below 1 MiB, inside the boot identity map, and nothing writes them after boot.

use ray_guest_abi::acpi_numa as acpi;

use crate::bootparams;

/// The table at guest-physical `addr`, if it lies in the boot map and checks out.
fn table(addr: u64, signature: &[u8; 4]) -> Option<&'static [u8]> {
    if addr == 0 || addr.checked_add(acpi::HEADER_LEN as u64)? > crate::paging::BOOT_MAP_END {
        return None;
    }
    // SAFETY: the header lies inside the identity-mapped boot map (checked above); the
    // VMM wrote the tables before boot and nothing writes them since.
    let header = unsafe { core::slice::from_raw_parts(addr as *const u8, acpi::HEADER_LEN) };
    let len = acpi::table_len(header)?;
    if len < acpi::HEADER_LEN || addr.checked_add(len as u64)? > crate::paging::BOOT_MAP_END {
        return None;
    }
    // SAFETY: as above, for the length the header gives (inside the boot map).
    let t = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    acpi::table_ok(t, signature).then_some(t)
}

/// The XSDT's table with `signature` (signature, length and checksum checked).
pub fn find(signature: &[u8; 4]) -> Option<&'static [u8]> {
    let rsdp = bootparams::get().rsdp();
    if rsdp == 0 || rsdp + 36 > crate::paging::BOOT_MAP_END {
        return None;
    }
    // SAFETY: the RSDP (36 bytes) lies inside the boot map (checked above).
    let xsdt_addr =
        u64::from_le_bytes(unsafe { core::ptr::read_unaligned((rsdp + 24) as *const [u8; 8]) });
    let xsdt = table(xsdt_addr, b"XSDT")?;
    acpi::xsdt_entries(xsdt).find_map(|a| table(a, signature))
}
